"""Patterns from exports users bring that once broke compression (each found on a model
of that kind): dynamo's flatten, a chunk going straight into a Concat at opset 21, and
``x.view(x.size(0), -1)`` in the differentiable copy."""

from __future__ import annotations

import numpy as np
import onnx_ir as ir
import pytest

import zoo
from datafree.toolchain.compress import compress
from datafree.toolchain.ingest import load
from datafree.toolchain.recipe import Recipe

QUICK = dict(synthetic=16, synthetic_steps=5, joint_steps=10)


@pytest.mark.parametrize("fitted", [False, True])
def test_dynamo_flatten_survives_pruning_the_channels_it_flattens(tmp_path, fitted):
    """dynamo writes the flatten as Reshape(x, [-1, C], allowzero=1); pruned, it becomes
    [0, -1], which only means 'keep the batch' without allowzero."""
    module = zoo.conv_bn_relu_conv()
    path = zoo.dynamo(module, tmp_path)
    result = compress(load(path), Recipe(prune=0.5, wbits=8, **(QUICK if fitted else {"synthetic": 0})))
    reshapes = [n for n in result.model.graph if n.op_type == "Reshape"]
    assert reshapes and all(n.attributes.get("allowzero") is None for n in reshapes)
    assert result.summary.totals["macs_after"] < result.summary.totals["macs_before"]
    x = zoo.images(5)
    y = zoo.run(result.model, x)
    assert y.shape == (5, 10) and np.isfinite(y).all()


def _session(model, level):
    import onnxruntime as ort

    opts = ort.SessionOptions()
    opts.graph_optimization_level = level
    opts.log_severity_level = 3
    return ort.InferenceSession(ir.serde.serialize_model(model).SerializeToString(), opts,
                                providers=["CPUExecutionProvider"])


def test_chunk_into_concat_loads_at_opset_21(tmp_path):
    """A Slice of a quantized tensor into a Concat: its output is quantized alike, so
    onnxruntime's own propagation (which writes an invalid QuantizeLinear at opset 21)
    has nothing to do, and the optimised session computes what the plain graph does."""
    import onnxruntime as ort

    module = zoo.chunk_concat_net()
    result = compress(load(zoo.export_model(module, tmp_path, "c2f")), Recipe(wbits=4, abits=4, synthetic=0, max_activation_loss=None))
    model = result.model
    slices = [n for n in model.graph if n.op_type == "Slice"]
    assert len(slices) == 2
    assert all(u.node.op_type == "QuantizeLinear" for s in slices for u in s.outputs[0].uses())
    x = zoo.images(4)
    fast = _session(model, ort.GraphOptimizationLevel.ORT_ENABLE_ALL).run(None, {"input": x})[0]
    plain = _session(model, ort.GraphOptimizationLevel.ORT_DISABLE_ALL).run(None, {"input": x})[0]
    np.testing.assert_allclose(fast, plain, atol=0.02 * np.abs(plain).max())


def test_quantizing_through_data_movement_is_lossless(tmp_path):
    """The Q/DQ added after a Slice uses its input's grid: the graph computes the same
    values with and without it."""
    from datafree.toolchain.passes import qdq

    module = zoo.chunk_concat_net()
    src = load(zoo.export_model(module, tmp_path, "c2f"))
    with_copy = compress(src, Recipe(wbits=8, abits=8, synthetic=0)).model
    original = qdq.through_data_movement
    try:
        qdq.through_data_movement = lambda values, acts: acts
        without = compress(src, Recipe(wbits=8, abits=8, synthetic=0)).model
    finally:
        qdq.through_data_movement = original
    import onnxruntime as ort

    level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    x = zoo.images(4)
    np.testing.assert_allclose(_session(with_copy, level).run(None, {"input": x})[0],
                               _session(without, level).run(None, {"input": x})[0], rtol=0, atol=1e-5)


def test_view_flatten_head_fits_on_synthetic_images(tmp_path):
    """x.view(x.size(0), -1) exports as Shape -> Gather(scalar index) -> Concat -> Reshape;
    the differentiable copy gathers a scalar."""
    module = zoo.view_flatten_net()
    path = zoo.export_model(module, tmp_path, "view")
    result = compress(load(path), Recipe(prune=0.5, wbits=4, **QUICK))
    assert not any("closed form" in n for n in result.summary.headline)
    x = zoo.images(3)
    assert zoo.run(result.model, x).shape == (3, 10)


def test_depthwise_weights_keep_8_bits_unless_asked(tmp_path):
    import json

    from datafree.toolchain import graph as G

    path = zoo.export_model(zoo.mobilenet_like(), tmp_path, "mbv2")
    kinds = {l.name: l.kind for l in G.analyse(load(path)).layers}
    depthwise = sorted(n for n, k in kinds.items() if k == "depthwise")
    assert depthwise

    def bits(recipe):
        result = compress(load(path), recipe)
        layers = json.loads(result.model.metadata_props["datafree.layers"])
        return {n: v["wbits"] for n, v in layers.items()}, result.summary.notes

    got, notes = bits(Recipe(wbits=4, synthetic=0))
    assert {n: got[n] for n in depthwise} == {n: 8 for n in depthwise}
    assert {b for n, b in got.items() if n not in depthwise} == {4}
    assert any(f"{len(depthwise)} depthwise layers keep 8-bit weights" in n for n in notes)
    got, notes = bits(Recipe(wbits=4, depthwise_wbits=None, synthetic=0))
    assert set(got.values()) == {4} and not any("depthwise layers keep" in n for n in notes)
    got, _ = bits(Recipe(wbits=4, synthetic=0, layers={depthwise[0]: {"wbits": 4}}))
    assert got[depthwise[0]] == 4 and all(got[n] == 8 for n in depthwise[1:])
    assert bits(Recipe(wbits=8, synthetic=0))[0] == {n: 8 for n in kinds}


# ----------------------------------------------------------- more inputs users bring
def _export(module, path, args, names, dynamic=True):
    import warnings

    import torch

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(module.eval(), args, str(path), dynamo=False, opset_version=17, input_names=names,
                          output_names=["out"], training=torch.onnx.TrainingMode.EVAL, do_constant_folding=False,
                          dynamic_axes={**{n: {0: "b"} for n in names}, "out": {0: "b"}} if dynamic else None)
    return path


def _ort(path_or_model, feeds):
    import onnxruntime as ort

    m = path_or_model
    data = ir.serde.serialize_model(m).SerializeToString() if isinstance(m, ir.Model) else str(m)
    return ort.InferenceSession(data, providers=["CPUExecutionProvider"]).run(None, feeds)[0]


def test_a_module_applied_twice_is_compressed_as_two_layers(tmp_path):
    """Tied weights (one initializer read by two convs, each with its own BN): every
    use gets its own copy, so folding and pruning one leaves the other alone."""
    import torch
    from torch import nn

    class Tied(nn.Module):
        def __init__(self):
            super().__init__()
            self.stem = nn.Sequential(*zoo._cbr(3, 16))
            self.shared, self.b1, self.b2 = nn.Conv2d(16, 16, 3, 1, 1), nn.BatchNorm2d(16), nn.BatchNorm2d(16)
            self.head = nn.Sequential(*zoo._cbr(16, 32, stride=2), nn.AdaptiveAvgPool2d(1), nn.Flatten(),
                                      nn.Linear(32, 10))

        def forward(self, x):
            x = torch.relu(self.b1(self.shared(self.stem(x))))
            return self.head(torch.relu(self.b2(self.shared(x))))

    module = zoo.randomize(Tied())
    path = _export(module, tmp_path / "tied.onnx", (torch.zeros(1, 3, 32, 32),), ["input"])
    x = zoo.images(4)
    float_model = compress(load(path), Recipe(wbits=None, synthetic=0)).model
    np.testing.assert_allclose(zoo.run(float_model, x), zoo.run_torch(module, x), rtol=1e-4, atol=1e-4)
    pruned = compress(load(path), Recipe(prune=0.3, wbits=8, synthetic=0))
    assert pruned.summary.totals["macs_after"] < pruned.summary.totals["macs_before"]
    assert zoo.run(pruned.model, x).shape == (4, 10)


def test_16_bit_float_models_are_refused_with_one_line(tmp_path):
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    w = numpy_helper.from_array(np.random.default_rng(0).standard_normal((4, 3, 3, 3)).astype(np.float16), "w")
    graph = helper.make_graph([helper.make_node("Conv", ["x", "w"], ["y"], pads=[1, 1, 1, 1])], "half",
                              [helper.make_tensor_value_info("x", TensorProto.FLOAT16, [1, 3, 8, 8])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT16, [1, 4, 8, 8])], [w])
    path = tmp_path / "half.onnx"
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]), str(path))
    from datafree.toolchain.errors import UserError

    with pytest.raises(UserError, match="16-bit floats .*float32 export"):
        compress(load(path), Recipe(synthetic=0))


def test_token_ids_get_valid_probes_and_no_synthetic_images(tmp_path):
    """An int64 input: activation ranges from ids the embedding table holds; no synthetic
    inputs (they are made by gradient descent on floats), the closed form with a note."""
    import torch
    from torch import nn

    class Text(nn.Module):
        def __init__(self):
            super().__init__()
            self.emb, self.fc1, self.fc2 = nn.Embedding(50, 32), nn.Linear(32, 64), nn.Linear(64, 4)

        def forward(self, ids):
            return self.fc2(torch.relu(self.fc1(self.emb(ids).mean(1))))

    module = zoo.randomize(Text())
    path = _export(module, tmp_path / "text.onnx", (torch.zeros(1, 16, dtype=torch.long),), ["ids"])
    ids = np.random.default_rng(1).integers(0, 50, size=(8, 16)).astype(np.int64)
    ref = _ort(path, {"ids": ids})
    result = compress(load(path), Recipe(wbits=8, abits=8, synthetic=16, synthetic_steps=2))
    assert any("is int64, not float32" in n and "closed form used" in n for n in result.summary.headline)
    assert any("stay float" in n and "'emb.weight' (Gather, 6 KiB)" in n for n in result.summary.notes)
    y = _ort(result.model, {"ids": ids})
    assert np.linalg.norm(y - ref) / np.linalg.norm(ref) < 0.05


def test_two_inputs_and_a_fixed_batch(tmp_path):
    import torch
    from torch import nn

    class TwoInputs(nn.Module):
        def __init__(self):
            super().__init__()
            self.body = nn.Sequential(*zoo._cbr(3, 16), *zoo._cbr(16, 16), nn.AdaptiveAvgPool2d(1), nn.Flatten())
            self.fc = nn.Linear(16 + 4, 10)

        def forward(self, img, vec):
            return self.fc(torch.cat([self.body(img), vec], 1))

    module = zoo.randomize(TwoInputs())
    args = (torch.zeros(2, 3, 32, 32), torch.zeros(2, 4))
    for dynamic in (True, False):           # fixed batch of 2: probes go in runs of 2
        path = _export(module, tmp_path / f"two{dynamic}.onnx", args, ["img", "vec"], dynamic=dynamic)
        result = compress(load(path), Recipe(wbits=8, abits=8, synthetic=16, synthetic_steps=2))
        assert any("the model has 2 inputs" in n for n in result.summary.headline)
        feeds = {"img": zoo.images(2), "vec": np.ones((2, 4), np.float32)}
        ref = _ort(path, feeds)
        assert np.linalg.norm(_ort(result.model, feeds) - ref) / np.linalg.norm(ref) < 0.05


def test_run_feeds_a_fixed_batch_model_in_runs_of_its_batch(tmp_path):
    import torch
    from click.testing import CliRunner

    from datafree.toolchain.cli import main

    module = zoo.conv_bn_relu_conv()
    one = _export(module, tmp_path / "b2.onnx", (torch.zeros(2, 3, 32, 32),), ["input"], dynamic=False)
    np.savez(tmp_path / "x.npz", x=zoo.images(5))     # 2 + 2 + 1 padded
    r = CliRunner().invoke(main, ["run", str(one), "--images", str(tmp_path / "x.npz"), "--json"])
    assert r.exit_code == 0, r.output
    import json

    preds = json.loads(r.output)["predictions"]
    assert preds == zoo.run_torch(module, zoo.images(5)).argmax(1).tolist()


def test_recipe_pattern_matching_no_layer_is_noted(tmp_path):
    path = zoo.export_model(zoo.conv_bn_relu_conv(), tmp_path, "cbrc")
    notes = compress(load(path), Recipe(synthetic=0, layers={"/nothing/*": {"wbits": 4}})).summary.notes
    assert any("'/nothing/*' matches no layer" in n for n in notes)


@pytest.mark.parametrize("wbits", [None, 8])
def test_a_batchnorm_that_is_the_graph_output_folds_and_keeps_its_name(wbits):
    """Feature extractors end in Conv -> BN: folding crashed where the BN wrote the graph output."""
    import onnxruntime as ort
    from onnx import TensorProto, helper, numpy_helper

    rng = np.random.default_rng(0)
    inits = [numpy_helper.from_array(rng.normal(size=(4, 3, 3, 3)).astype(np.float32), "w")]
    for name, value in (("g", 1.3), ("b", 0.1), ("m", 0.2), ("v", 1.5)):
        inits.append(numpy_helper.from_array(np.full(4, value, np.float32), name))
    nodes = [helper.make_node("Conv", ["x", "w"], ["c"], name="conv", pads=[1, 1, 1, 1]),
             helper.make_node("BatchNormalization", ["c", "g", "b", "m", "v"], ["features"], name="bn")]
    graph = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [None, 3, 8, 8])],
                              [helper.make_tensor_value_info("features", TensorProto.FLOAT, None)], inits)
    proto = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    out = ir.serde.serialize_model(compress(proto, Recipe(wbits=wbits, synthetic=0)).model)
    assert [o.name for o in out.graph.output] == ["features"]
    assert "BatchNormalization" not in {n.op_type for n in out.graph.node}
    x = rng.normal(size=(2, 3, 8, 8)).astype(np.float32)
    ref = ort.InferenceSession(proto.SerializeToString()).run(None, {"x": x})[0]
    got = ort.InferenceSession(out.SerializeToString()).run(None, {"x": x})[0]
    np.testing.assert_allclose(got, ref, rtol=0, atol=(1e-5 if wbits is None else 2e-2) * np.abs(ref).max())


def test_a_crnn_text_recogniser_with_an_lstm_is_fitted(tmp_path):
    """A CRNN (convs, then a bidirectional LSTM over the width, then per-step class scores)
    gets synthetic images and 4-bit fitting: the LSTM runs in the differentiable copy (such
    models once fell back to the closed form)."""
    import torch
    from torch import nn

    class CRNN(nn.Module):
        def __init__(self):
            super().__init__()
            self.convs = nn.Sequential(*zoo._cbr(1, 16, stride=2), *zoo._cbr(16, 32, stride=2))
            self.rnn = nn.LSTM(32, 24, bidirectional=True)
            self.head = nn.Linear(48, 12)

        def forward(self, x):
            seq = self.convs(x).mean(2).permute(2, 0, 1)             # width x batch x channels
            return self.head(self.rnn(seq)[0]).softmax(-1)

    module = zoo.randomize(CRNN())
    path = _export(module, tmp_path / "crnn.onnx", (torch.zeros(1, 1, 32, 128),), ["input"])
    result = compress(path, Recipe(wbits=4, abits=8, **QUICK))
    assert not any("closed form" in h or "not supported" in h for h in result.summary.headline)
    x = np.random.default_rng(0).random((4, 1, 32, 128), dtype=np.float32)
    ref, got = zoo.run_torch(module, x), zoo.run(result.model, x)
    assert np.mean(ref.argmax(-1) == got.argmax(-1)) >= 0.9
