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
    result = compress(load(zoo.export_model(module, tmp_path, "c2f")), Recipe(wbits=4, abits=4, synthetic=0))
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
        qdq.through_data_movement = lambda graph, acts: acts
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
    assert not any("closed form" in n for n in result.summary.notes)
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
