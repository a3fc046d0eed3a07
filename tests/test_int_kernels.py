"""Quantized models in a plain onnxruntime session with default options: W4A8 layers fuse
into integer kernels while the file keeps INT4 weights, weight-only layers are folded
into float weights at load, and the values are the ones the model's ONNX graph defines."""

from __future__ import annotations

import json
from collections import Counter

import numpy as np
import onnx
import onnx_ir as ir
import onnxruntime as ort
import pytest

import zoo
from datafree.runtime import InferenceSession
from datafree.toolchain import graph as G, ingest
from datafree.toolchain.compress import compress
from datafree.toolchain.recipe import Recipe
from datafree.toolchain.report import cost

INTEGER_KERNELS = {"QLinearConv", "QGemm", "QLinearMatMul", "MatMulIntegerToFloat"}


def _model(name: str, tmp_path, **recipe) -> onnx.ModelProto:
    _, path = zoo.build(name, tmp_path)
    return ir.serde.serialize_model(compress(path, Recipe(synthetic=0, **recipe)).model)


def _plain(proto: onnx.ModelProto, tmp_path, tag: str, **config) -> tuple[ort.InferenceSession, onnx.ModelProto]:
    """A default-options session and the optimized graph onnxruntime made at load."""
    options = ort.SessionOptions()
    options.log_severity_level = 3
    options.optimized_model_filepath = str(tmp_path / f"{tag}_optimized.onnx")
    for key, value in config.items():
        options.add_session_config_entry(key, value)
    session = ort.InferenceSession(proto.SerializeToString(), options, providers=["CPUExecutionProvider"])
    return session, onnx.load(options.optimized_model_filepath)


def _unoptimized(proto: onnx.ModelProto, x: np.ndarray) -> np.ndarray:
    """The outputs the ONNX graph defines: onnxruntime with every optimisation off."""
    options = ort.SessionOptions()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    session = ort.InferenceSession(proto.SerializeToString(), options, providers=["CPUExecutionProvider"])
    return session.run(None, {session.get_inputs()[0].name: x})[0]


def _run(session: ort.InferenceSession, x: np.ndarray) -> np.ndarray:
    return session.run(None, {session.get_inputs()[0].name: x})[0]


def _stored_weight_types(proto: onnx.ModelProto) -> set[int]:
    """Types of the stored integer weights (INT32 biases left out)."""
    return {t.data_type for t in proto.graph.initializer
            if t.name.endswith("_quantized") and t.data_type != onnx.TensorProto.INT32}


def _dequantized_constants(optimized: onnx.ModelProto) -> list[str]:
    """DequantizeLinear nodes of the optimized graph that read an initializer (a weight)."""
    inits = {t.name for t in optimized.graph.initializer}
    return [n.name for n in optimized.graph.node if n.op_type == "DequantizeLinear" and n.input[0] in inits]


# name, layers onnxruntime fuses (op type -> count), depthwise at 4 bits too
W4A8_CASES = [
    ("conv_bn_relu_conv", {"QLinearConv": 2, "QGemm": 1}),
    ("mobilenet_like", {"QLinearConv": 5, "QGemm": 1}),        # the depthwise conv among them
    ("token_mlp", {"MatMulIntegerToFloat": 2}),     # outputs no layer reads stay float
    ("vgg_like", {"QLinearConv": 5, "QGemm": 2}),
]


@pytest.mark.parametrize("abits", [8, 4])
@pytest.mark.parametrize("name, fused", W4A8_CASES, ids=[c[0] for c in W4A8_CASES])
def test_w4_runs_on_integer_kernels_from_int4_storage(name, fused, abits, tmp_path):
    """W4A8 and W4A4 alike: 4-bit activations sit in uint8 with a Clip to their grid."""
    recipe = dict(wbits=4, abits=abits, depthwise_wbits=None)
    int4 = _model(name, tmp_path, **recipe)
    int8 = _model(name, tmp_path, int4=False, **recipe)
    assert _stored_weight_types(int4) == {onnx.TensorProto.INT4}
    assert _stored_weight_types(int8) == {onnx.TensorProto.INT8}

    session, optimized = _plain(int4, tmp_path, "int4")
    ops = Counter(n.op_type for n in optimized.graph.node)
    assert {op: ops[op] for op in fused} == fused
    assert not {"Conv", "Gemm", "MatMul"} & set(ops)          # every layer on an integer kernel
    assert not _dequantized_constants(optimized)
    int8_session, int8_optimized = _plain(int8, tmp_path, "int8")
    assert Counter(n.op_type for n in int8_optimized.graph.node) == ops

    x = zoo.images(8, zoo.INPUT_SHAPES[name][1:])
    np.testing.assert_array_equal(_run(session, x), _run(int8_session, x))
    np.testing.assert_array_equal(_unoptimized(int4, x), _unoptimized(int8, x))


@pytest.mark.parametrize("name", ["conv_bn_relu_conv", "mobilenet_like", "tconv_net", "token_mlp", "mlp"])
@pytest.mark.parametrize("wbits", [4, 8])
def test_weight_only_weights_are_folded_at_load(name, wbits, tmp_path):
    proto = _model(name, tmp_path, wbits=wbits, depthwise_wbits=None)
    assert _stored_weight_types(proto) == {onnx.TensorProto.INT4 if wbits == 4 else onnx.TensorProto.INT8}
    session, optimized = _plain(proto, tmp_path, "plain")
    assert not [n for n in optimized.graph.node if n.op_type in ("DequantizeLinear", "Cast", "MatMulNBits")]
    # folded at load: what the session with QDQ handling disabled computes, and the graph's own values
    folded, _ = _plain(proto, tmp_path, "folded", **{"session.disable_quant_qdq": "1"})
    x = zoo.images(8, zoo.INPUT_SHAPES[name][1:])
    y = _run(session, x)
    np.testing.assert_array_equal(y, _run(folded, x))
    np.testing.assert_allclose(y, _unoptimized(proto, x), rtol=0, atol=1e-5 * np.abs(y).max())


def test_weight_only_shortcut_selection_is_int8_and_folded(resnet20_bn, tmp_path):
    """The zero-padded shortcuts of a weight-only ResNet: 1x1 selection convs stored in INT8."""
    proto = ir.serde.serialize_model(compress(resnet20_bn, Recipe(wbits=4, synthetic=0)).model)
    select = [t for t in proto.graph.initializer if "_select" in t.name]
    assert select and {t.data_type for t in select} == {onnx.TensorProto.INT8}
    _, optimized = _plain(proto, tmp_path, "plain")
    assert not [n for n in optimized.graph.node if n.op_type in ("DequantizeLinear", "Cast")]


def test_low_bit_activations_are_exactly_on_their_grid(tmp_path):
    """A 4-bit activation: QuantizeLinear to uint8, Clip to 16 levels, DequantizeLinear;
    the fused integer kernels give the values the graph defines, and datafree.runtime
    adds nothing."""
    proto = _model("conv_bn_relu_conv", tmp_path, wbits=4, abits=4)
    inits = {t.name: onnx.numpy_helper.to_array(t) for t in proto.graph.initializer}
    consumers = {i: n for n in proto.graph.node for i in n.input}
    clips = [consumers[q.output[0]] for q in proto.graph.node if q.op_type == "QuantizeLinear" and
             consumers[q.output[0]].op_type == "Clip"]       # the others: 8-bit outputs before an Add
    assert len(clips) >= 2
    for clip in clips:
        assert inits[clip.input[1]].dtype == np.uint8
        assert int(inits[clip.input[2]]) - int(inits[clip.input[1]]) == 15
        assert consumers[clip.output[0]].op_type == "DequantizeLinear"
    meta = {p.key: p.value for p in proto.metadata_props}
    assert {v["abits"] for v in json.loads(meta["datafree.layers"]).values()} == {4}
    session = InferenceSession(proto)
    assert not session.weights_folded
    x = zoo.images(8)
    y = session.run(None, {"input": x})[0]
    np.testing.assert_allclose(y, _unoptimized(proto, x), rtol=0, atol=0.02 * np.abs(y).max())


@pytest.mark.parametrize("abits", [8, None])
def test_datafree_session_adds_nothing_for_w4(abits, tmp_path):
    proto = _model("conv_bn_relu_conv", tmp_path, wbits=4, abits=abits)
    session = InferenceSession(proto)
    assert not session.weights_folded
    x = zoo.images(8)
    plain, _ = _plain(proto, tmp_path, "plain")
    np.testing.assert_array_equal(session.run(None, {"input": x})[0], _run(plain, x))


@pytest.mark.parametrize("abits", [8, None])
def test_report_reads_both_weight_forms(abits, tmp_path):
    """The report finds every layer with its 4-bit weights and INT4 storage in either form."""
    proto = _model("mobilenet_like", tmp_path, wbits=4, abits=abits, depthwise_wbits=None)
    model = ir.serde.deserialize_model(proto)
    meta = dict(model.metadata_props)
    model.metadata_props.clear()           # bits from the stored integers, not from the metadata
    rows = cost.layer_costs(model)
    assert len(rows) == 6 and {(r.wbits, r.wstore) for r in rows} == {(4, 4)}
    assert {r.abits for r in rows} == ({8} if abits else {32})
    model.metadata_props.update(meta)
    assert {(r.wbits, r.bits_from) for r in cost.layer_costs(model)} == {(4, "metadata")}


def test_a_weight_only_model_counts_as_quantized(tmp_path):
    """Its Cast of stored integers is neither folded on loading nor compressed again."""
    from datafree.toolchain.errors import UserError
    from datafree.toolchain.ingest import is_quantized, load

    proto = _model("conv_bn_relu_conv", tmp_path, wbits=4)
    model = load(proto)
    assert is_quantized(model) and sum(n.op_type == "Cast" for n in model.graph) == 3
    with pytest.raises(UserError, match="already quantized"):
        compress(proto, Recipe(synthetic=0))


@pytest.mark.parametrize("integer_kernels", [True, False])
def test_layers_before_silu_and_hardswish_run_on_integer_kernels(integer_kernels, tmp_path):
    """A conv followed by SiLU or HardSwish: with integer_kernels its output is quantized
    (8 bits, uint8) before the activation, the SiLU's gate too, so every conv fuses into
    QLinearConv, the SiLU into QLinearSigmoid and QLinearMul and the HardSwish into
    QLinearAdd and QLinearMul (passes/hard_gates.py); without, they run in float."""
    _, path = zoo.build("silu_net", tmp_path)
    result = compress(path, Recipe(synthetic=0, wbits=8, abits=8, integer_kernels=integer_kernels))
    proto = ir.serde.serialize_model(result.model)
    noted = [n for n in result.summary.notes if "integer kernels" in n]
    assert (noted[0].startswith("2 layers before hardswish, silu") if integer_kernels else not noted)
    zero_points = [t for t in proto.graph.initializer if t.name.endswith("_zero_point") and t.dims == []]
    assert zero_points and {t.data_type for t in zero_points} == {onnx.TensorProto.UINT8}
    session, optimized = _plain(proto, tmp_path, "plain")
    ops = Counter(n.op_type for n in optimized.graph.node)
    if integer_kernels:
        assert ops["QLinearConv"] == 2 and not {"Conv", "FusedConv"} & set(ops)
        assert ops["QLinearSigmoid"] == 1 and ops["QLinearMul"] == 2 and ops["QLinearAdd"] == 1
        assert "HardSwish" not in ops
        assert any(n.startswith("1 HardSigmoid / HardSwish run as") for n in result.summary.notes)
    else:
        assert ops["QLinearConv"] == 0 and ops["Conv"] + ops["FusedConv"] == 2
    x = zoo.images(8)
    y = _run(session, x)
    np.testing.assert_allclose(y, _unoptimized(proto, x), rtol=0, atol=0.02 * np.abs(y).max())


def test_spelled_out_hardswish_and_its_se_block_run_on_integer_kernels(tmp_path):
    """HardSwish written as x · Clip(x + 3, 0, 6) / 6 is the layer's activation, as the
    operator is: its output is quantized, so the squeeze-and-excitation block reading it
    pools, gates and multiplies on integer kernels, with no float op left in between."""
    _, path = zoo.build("hswish_se_net", tmp_path)
    layers, _ = G.find_layers(ingest.load(path))
    assert [l.act_type for l in layers[:2]] == ["hardswish", "hardswish"]
    result = compress(path, Recipe(synthetic=0, wbits=8, abits=8))
    assert any(n.startswith("3 HardSigmoid / HardSwish run as") for n in result.summary.notes)
    proto = ir.serde.serialize_model(result.model)
    session, optimized = _plain(proto, tmp_path, "plain")
    ops = Counter(n.op_type for n in optimized.graph.node)
    assert ops["QLinearConv"] == 5 and ops["QLinearMul"] == 3 and ops["QLinearAdd"] == 3
    assert ops["QLinearGlobalAveragePool"] == 1          # the SE block's pool; the head's reads a float Relu
    assert not {"Conv", "FusedConv", "Clip", "Div", "Mul", "Add", "HardSigmoid", "HardSwish"} & set(ops)
    x = zoo.images(8)
    y = _run(session, x)
    np.testing.assert_allclose(y, _unoptimized(proto, x), rtol=0, atol=0.02 * np.abs(y).max())


def _kernel_weight_range(proto: onnx.ModelProto, depthwise: bool = False) -> int:
    """The largest |integer weight| of a Conv/Gemm/MatMul whose input is quantized (a layer
    onnxruntime runs on its u8 x s8 integer kernels): of the depthwise convolutions, or of
    the others."""
    producer = {o: n for n in proto.graph.node for o in n.output}
    inits = {t.name: t for t in proto.graph.initializer}
    largest = 0
    for node in proto.graph.node:
        if node.op_type not in ("Conv", "Gemm", "MatMul") or len(node.input) < 2:
            continue
        x, w = producer.get(node.input[0]), producer.get(node.input[1])
        if x is None or x.op_type != "DequantizeLinear" or w is None or w.op_type != "DequantizeLinear":
            continue
        src = producer.get(w.input[0])
        name = src.input[0] if src is not None and src.op_type == "Cast" else w.input[0]
        group = next((a.i for a in node.attribute if a.name == "group"), 1)
        if name in inits:
            q = onnx.numpy_helper.to_array(inits[name]).astype(np.int32)
            if (group > 1 and q.shape[0] == group and q.shape[1] == 1) == depthwise:
                largest = max(largest, int(np.abs(q).max()))
    return largest


@pytest.mark.parametrize("reduce_range", [True, False])
def test_8bit_weights_on_integer_kernels_keep_the_range_x86_kernels_do_not_saturate(resnet20_bn, dev_images,
                                                                                     reduce_range, tmp_path):
    """x86 without VNNI (AVX2) adds pairs of u8 x s8 products in int16 with saturation: 8-bit
    weights of integer-kernel layers keep to +-63, so a plain session gives the outputs the
    graph defines on any CPU (with +-127, ResNet-20 W8A8 lost 8 points on an AVX2 EPYC)."""
    proto = ir.serde.serialize_model(compress(resnet20_bn, Recipe(wbits=8, abits=8, synthetic=0,
                                                                  reduce_range=reduce_range)).model)
    assert _kernel_weight_range(proto) == (63 if reduce_range else 127)
    if reduce_range:
        x = dev_images[0][:64]
        plain, _ = _plain(proto, tmp_path, "rr")
        got, want = _run(plain, x), _unoptimized(proto, x)
        assert float(((got - want) ** 2).sum() / (want ** 2).sum()) < 1e-3      # SQNR above 30 dB
        assert (got.argmax(1) == want.argmax(1)).mean() >= 0.98


def test_depthwise_8bit_weights_keep_their_full_range_and_run_exactly(tmp_path):
    """onnxruntime's depthwise integer kernel widens both operands to int16 and adds pairs in
    int32, so it cannot saturate: depthwise 8-bit weights keep +-127 while the other layers on
    integer kernels keep to +-63, and a plain session computes what the graph defines."""
    proto = _model("mobilenet_like", tmp_path, wbits=8, abits=8)
    assert _kernel_weight_range(proto, depthwise=True) == 127
    assert _kernel_weight_range(proto) == 63
    x = zoo.images(16, zoo.INPUT_SHAPES["mobilenet_like"][1:])
    plain, optimized = _plain(proto, tmp_path, "dw")
    assert Counter(n.op_type for n in optimized.graph.node)["QLinearConv"] == 5
    got, want = _run(plain, x), _unoptimized(proto, x)
    assert float(((got - want) ** 2).sum() / (want ** 2).sum()) < 1e-4      # SQNR above 40 dB


def _narrow_grid_tops(proto: onnx.ModelProto) -> list[int]:
    """The upper bounds of the integer-domain Clips of activations narrower than 8 bits."""
    inits = {t.name: t for t in proto.graph.initializer}
    return [int(onnx.numpy_helper.to_array(inits[n.input[2]])) for n in proto.graph.node
            if n.op_type == "Clip" and len(n.input) == 3 and n.input[2] in inits
            and inits[n.input[2]].data_type == onnx.TensorProto.UINT8]


def test_7bit_inputs_lie_in_0_127_and_keep_full_range_weights(tmp_path):
    """A 7-bit input grid, signed ones (after HardSwish) too, lies in u8 0..127, where +-127
    weights cannot saturate x86 pair sums: its layers keep +-127, and a plain session
    computes what the graph defines."""
    proto = _model("mobilenet_like", tmp_path, wbits=8, abits=7)
    tops = _narrow_grid_tops(proto)
    assert tops and max(tops) == 127
    assert _kernel_weight_range(proto) == 127
    x = zoo.images(16, zoo.INPUT_SHAPES["mobilenet_like"][1:])
    plain, _ = _plain(proto, tmp_path, "a7")
    got, want = _run(plain, x), _unoptimized(proto, x)
    assert float(((got - want) ** 2).sum() / (want ** 2).sum()) < 1e-4      # SQNR above 40 dB
