"""Zero-padded strided shortcuts become 1x1 convolutions with the same outputs."""

from __future__ import annotations

import numpy as np
import onnx
import onnx_ir as ir
import onnxruntime as ort
import pytest
from onnx import TensorProto, helper, numpy_helper

from datafree.toolchain import ingest
from datafree.toolchain.compress import compress
from datafree.toolchain.passes.shortcut import ShortcutAsConvPass
from datafree.toolchain.recipe import Recipe

BIG = np.iinfo(np.int64).max


def _shortcut_model(starts=(0, 0), steps=(2, 2), pads=(0, 4, 0, 0, 0, 4, 0, 0), pad_value=None,
                    opset: int = 17) -> onnx.ModelProto:
    """x (1x8x8x8) → Conv(16, stride 2) + [Slice..., Pad](x) → Relu."""
    rng = np.random.default_rng(0)
    inits = [numpy_helper.from_array(rng.normal(size=(16, 8, 3, 3)).astype(np.float32), "w"),
             numpy_helper.from_array(np.array(pads, np.int64), "pads")]
    nodes = [helper.make_node("Conv", ["x", "w"], ["c"], name="conv", strides=[2, 2], pads=[1, 1, 1, 1])]
    prev = "x"
    for i, (axis, start, step) in enumerate(zip((2, 3), starts, steps)):
        for n, v in (("st", start), ("en", BIG), ("ax", axis), ("sp", step)):
            inits.append(numpy_helper.from_array(np.array([v], np.int64), f"{n}{i}"))
        nodes.append(helper.make_node("Slice", [prev, f"st{i}", f"en{i}", f"ax{i}", f"sp{i}"], [f"s{i}"],
                                      name=f"slice{i}"))
        prev = f"s{i}"
    pad_inputs = [prev, "pads"]
    if pad_value is not None:
        inits.append(numpy_helper.from_array(np.array(pad_value, np.float32), "pv"))
        pad_inputs.append("pv")
    nodes += [helper.make_node("Pad", pad_inputs, ["p"], name="pad"),
              helper.make_node("Add", ["c", "p"], ["a"], name="add"),
              helper.make_node("Relu", ["a"], ["y"], name="relu")]
    graph = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 8, 8, 8])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, None)], inits)
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)])


def _run(proto: onnx.ModelProto, x: np.ndarray) -> np.ndarray:
    return ort.InferenceSession(proto.SerializeToString(), providers=["CPUExecutionProvider"]).run(None, {"x": x})[0]


def _rewritten(proto: onnx.ModelProto) -> tuple[onnx.ModelProto, bool]:
    model = ingest.load(proto)
    result = ShortcutAsConvPass()(model)
    return ir.serde.serialize_model(model), result.modified


def test_option_a_shortcut_becomes_a_selection_conv_with_the_same_outputs():
    proto = _shortcut_model()
    x = np.random.default_rng(1).normal(size=(3, 8, 8, 8)).astype(np.float32)
    out, modified = _rewritten(proto)
    assert modified
    ops = [n.op_type for n in out.graph.node]
    assert "Slice" not in ops and "Pad" not in ops and ops.count("Conv") == 2
    conv = [n for n in out.graph.node if n.op_type == "Conv" and n.name != "conv"][0]
    assert [a.ints for a in conv.attribute if a.name == "strides"][0] == [2, 2]
    w = numpy_helper.to_array([i for i in out.graph.initializer if i.name == conv.input[1]][0])
    assert w.shape == (16, 8, 1, 1) and w.sum() == 8 and w[4:12, :, 0, 0].tolist() == np.eye(8).tolist()
    ref = _run(proto, x)     # the Add is fused into the conv: sums in another order
    np.testing.assert_allclose(_run(out, x), ref, rtol=0, atol=1e-6 * np.abs(ref).max())
    assert {i.name for i in out.graph.initializer} == {"w", conv.input[1]}


@pytest.mark.parametrize("kwargs, why", [
    (dict(pads=(0, 4, 1, 0, 0, 4, 0, 0)), "it pads more than the channel axis"),     # spatial padding too
    (dict(pad_value=1.0), "its pad value is not a constant zero"),                   # padded with ones
])
def test_other_slices_and_pads_stay_and_say_why(kwargs, why):
    proto = _shortcut_model(**kwargs)
    proto.graph.node[-2].input[0] = "p"     # Add(p, p): valid whatever shape the pad gives
    model = ingest.load(proto)
    shortcuts = ShortcutAsConvPass()
    assert not shortcuts(model).modified
    assert shortcuts.refused == {"pad": why}
    assert [n.op_type for n in model.graph].count("Pad") == 1


def test_an_offset_slice_stays_in_front_of_the_conv():
    proto = _shortcut_model(starts=(1, 0))    # x[:, :, 1::2, ::2]: the conv can only take the ::2
    proto.graph.node[-2].input[0] = "p"
    x = np.random.default_rng(2).normal(size=(2, 8, 8, 8)).astype(np.float32)
    out, modified = _rewritten(proto)
    assert modified and [n.op_type for n in out.graph.node].count("Slice") == 1
    np.testing.assert_allclose(_run(out, x), _run(proto, x), rtol=0, atol=1e-6)


def test_compressed_float_resnet20_has_no_slices_and_the_same_outputs(resnet20_bn):
    x = np.random.default_rng(0).normal(size=(4, 3, 32, 32)).astype(np.float32)
    original = onnx.load(resnet20_bn)
    name = original.graph.input[0].name
    ref = ort.InferenceSession(str(resnet20_bn), providers=["CPUExecutionProvider"]).run(None, {name: x})[0]
    proto = ir.serde.serialize_model(compress(resnet20_bn, Recipe(wbits=None, synthetic=0)).model)
    assert not {"Pad", "Slice"} & {n.op_type for n in proto.graph.node}
    out = ort.InferenceSession(proto.SerializeToString(), providers=["CPUExecutionProvider"]).run(None, {name: x})[0]
    np.testing.assert_allclose(out, ref, rtol=0, atol=1e-4 * np.abs(ref).max())


def test_quantized_shortcuts_become_integer_copies(resnet20_bn, monkeypatch):
    import datafree.toolchain.stages.quantize as C

    recipe = Recipe(wbits=8, abits=8, synthetic=0)
    rewritten = ir.serde.serialize_model(compress(resnet20_bn, recipe).model)
    monkeypatch.setattr(C, "ShortcutAsConvPass", lambda: (lambda model: None))
    kept = ir.serde.serialize_model(compress(resnet20_bn, recipe).model)
    ops = [n.op_type for n in rewritten.graph.node]
    assert "Pad" not in ops and "Slice" not in ops and ops.count("Conv") == 21
    assert [n.op_type for n in kept.graph.node].count("Pad") == 2
    x = np.random.default_rng(0).normal(size=(8, 3, 32, 32)).astype(np.float32)
    for level in (ort.GraphOptimizationLevel.ORT_DISABLE_ALL, ort.GraphOptimizationLevel.ORT_ENABLE_ALL):
        options = ort.SessionOptions()
        options.graph_optimization_level = level
        a, b = (ort.InferenceSession(m.SerializeToString(), options, providers=["CPUExecutionProvider"])
                .run(None, {"input": x})[0] for m in (rewritten, kept))
        if level == ort.GraphOptimizationLevel.ORT_DISABLE_ALL:
            np.testing.assert_array_equal(a, b)      # the integers are copied, not recomputed
        else:   # onnxruntime's fused QLinearAdd rounds a few values a step off its float Add
            np.testing.assert_allclose(a, b, atol=0.1)
            assert (a.argmax(1) == b.argmax(1)).all()


def test_weight_only_models_store_the_selection_in_int8(resnet20_bn):
    proto = ir.serde.serialize_model(compress(resnet20_bn, Recipe(wbits=4, synthetic=0)).model)
    assert "Pad" not in [n.op_type for n in proto.graph.node]
    select = [i for i in proto.graph.initializer if i.name.endswith("_select_quantized")]
    assert len(select) == 2 and all(i.data_type == TensorProto.INT8 for i in select)
    assert not [i for i in proto.graph.initializer if i.name.endswith("_select")]
    onnx.checker.check_model(proto)
    x = np.random.default_rng(0).normal(size=(2, 3, 32, 32)).astype(np.float32)
    ort.InferenceSession(proto.SerializeToString(), providers=["CPUExecutionProvider"]).run(None, {"input": x})


@pytest.mark.parametrize("wbits", [None, 4])
def test_selection_convs_are_not_layers_to_compress_or_report(resnet20_bn, wbits):
    from datafree.toolchain import graph as G
    from datafree.toolchain.report import cost

    model = compress(resnet20_bn, Recipe(wbits=wbits, synthetic=0)).model
    names = [l.name for l in cost.compute_layers(model)]
    assert len(names) == 20 and not [n for n in names if "Pad" in n]
    layers, skipped = G.find_layers(model)
    if wbits is None:
        assert len(layers) == 20 and sum("selects channels" in why for why in skipped.values()) == 2


def test_four_bit_residuals_become_selection_convs_and_load(resnet20_bn):
    """4-bit activations sit in uint8 (clipped to their grid), so the padded shortcuts
    become 8-bit selection convs as at A8: the model loads, and onnxruntime's fused
    graph gives what the graph defines."""
    proto = ir.serde.serialize_model(compress(resnet20_bn, Recipe(wbits=4, abits=4, synthetic=0, max_activation_loss=None)).model)
    assert [n.op_type for n in proto.graph.node].count("Pad") == 0
    x = np.random.default_rng(0).normal(size=(2, 3, 32, 32)).astype(np.float32)
    fused = ort.InferenceSession(proto.SerializeToString(), providers=["CPUExecutionProvider"]).run(None, {"input": x})[0]
    options = ort.SessionOptions()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    plain = ort.InferenceSession(proto.SerializeToString(), options, providers=["CPUExecutionProvider"])
    np.testing.assert_allclose(fused, plain.run(None, {"input": x})[0], rtol=0, atol=0.05 * np.abs(fused).max())


def test_one_dimensional_shortcuts_too():
    """Conv1d models (signals): x[:, :, ::2] with zero channels padded on."""
    rng = np.random.default_rng(3)
    inits = [numpy_helper.from_array(rng.normal(size=(8, 4, 3)).astype(np.float32), "w"),
             numpy_helper.from_array(np.array([0, 2, 0, 0, 2, 0], np.int64), "pads")]
    for n, v in (("st", 0), ("en", BIG), ("ax", 2), ("sp", 2)):
        inits.append(numpy_helper.from_array(np.array([v], np.int64), n))
    nodes = [helper.make_node("Conv", ["x", "w"], ["c"], name="conv", strides=[2], pads=[1, 1]),
             helper.make_node("Slice", ["x", "st", "en", "ax", "sp"], ["s"], name="slice"),
             helper.make_node("Pad", ["s", "pads"], ["p"], name="pad"),
             helper.make_node("Add", ["c", "p"], ["y"], name="add")]
    graph = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 4, 16])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, None)], inits)
    proto = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    x = rng.normal(size=(2, 4, 16)).astype(np.float32)
    out, modified = _rewritten(proto)
    assert modified and not {"Slice", "Pad"} & {n.op_type for n in out.graph.node}
    ref = _run(proto, x)
    np.testing.assert_allclose(_run(out, x), ref, rtol=0, atol=1e-6 * np.abs(ref).max())


def test_a_shortcut_that_is_a_graph_output_keeps_its_name():
    proto = _shortcut_model()
    del proto.graph.output[:]
    proto.graph.output.append(helper.make_tensor_value_info("p", TensorProto.FLOAT, None))
    x = np.random.default_rng(4).normal(size=(2, 8, 8, 8)).astype(np.float32)
    out, modified = _rewritten(proto)
    assert modified and [o.name for o in out.graph.output] == ["p"]
    assert "Pad" not in {n.op_type for n in out.graph.node}
    np.testing.assert_array_equal(_run(out, x), _run(proto, x))
