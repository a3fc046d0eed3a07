"""The ai.datafree ops: function bodies (stock onnxruntime) and Python kernels agree."""

from __future__ import annotations

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx import TensorProto, helper, numpy_helper

from datafree.ops import domain, functions, kernels, reference, schemas
from datafree.runtime import InferenceSession

CANDIDATES = (4, 6, 8)
OPSET = 17
rng = np.random.default_rng(0)


def _model(node: onnx.NodeProto, inputs: dict[str, np.ndarray], consts: dict[str, np.ndarray],
           outputs: list[tuple[str, int]]) -> onnx.ModelProto:
    graph = helper.make_graph(
        [node], "g",
        [helper.make_tensor_value_info(k, helper.np_dtype_to_tensor_dtype(v.dtype), None) for k, v in inputs.items()],
        [helper.make_tensor_value_info(name, dtype, None) for name, dtype in outputs],
        initializer=[numpy_helper.from_array(v, k) for k, v in consts.items()],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", OPSET), domain.opset_import()])
    return functions.attach(model, CANDIDATES)


def _both(model, feeds):
    stock = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"]).run(None, feeds)
    fast = InferenceSession(model, use_kernels=True, grouped=False)
    assert fast.uses_kernels
    return stock, fast.run(None, feeds)


def _tables(n_out: int | None = None):
    shape = (9,) if n_out is None else (9, n_out)
    return rng.uniform(0.01, 0.1, size=shape).astype(np.float32)


def _bits(n):
    b = np.array([4, 6, 8, 6, 4, 8, 8][:n], dtype=np.float32)
    return b


@pytest.mark.parametrize("signed", [0, 1])
def test_dynquant_function_equals_kernel_and_reference(signed):
    x = rng.normal(size=(6, 3, 5, 5)).astype(np.float32) * (1 if signed else 0.5) + (0 if signed else 0.6)
    bits = _bits(6)
    scale = _tables()
    zp = np.where(np.arange(9) % 2 == 0, 0.0, 3.0).astype(np.float32) * (1 - signed)
    node = helper.make_node("DynQuant", ["x", "bits", "scale", "zp"], ["y"], domain=domain.DOMAIN, signed=signed)
    model = _model(node, {"x": x, "bits": bits}, {"scale": scale, "zp": zp}, [("y", TensorProto.FLOAT)])
    (stock,), (fast,) = _both(model, {"x": x, "bits": bits})
    expect = reference.dyn_quant(x, bits, scale, zp, bool(signed))
    np.testing.assert_allclose(stock, expect, atol=1e-6)
    np.testing.assert_allclose(fast, expect, atol=1e-6)
    # a sample alone gives what it gives in the mixed batch
    (alone,), _ = _both(model, {"x": x[2:3], "bits": bits[2:3]})
    np.testing.assert_array_equal(alone, stock[2:3])
    # and it really is quantized to its own grid
    levels = np.unique(np.round(stock[0] / scale[4]))
    assert len(levels) <= 16


def _weights(o, i, k):
    w = rng.normal(size=(o, i, k, k)).astype(np.float32) if k else rng.normal(size=(o, i)).astype(np.float32)
    flat = np.abs(w.reshape(o, -1)).max(axis=1)
    w_scale = (flat / 127).astype(np.float32)
    w_int = np.clip(np.round(w / w_scale.reshape((-1,) + (1,) * (w.ndim - 1))), -127, 127).astype(np.int8)
    table = np.ones((9, o), np.float32)
    for b in CANDIDATES:
        table[b] = flat / (2 ** (b - 1) - 1) * (0.8 if b == 4 else 1.0)   # a clipped 4-bit scale
    return w_int, w_scale, table, rng.normal(size=o).astype(np.float32)


@pytest.mark.parametrize("attrs", [dict(strides=[1, 1], pads=[1, 1, 1, 1], dilations=[1, 1], group=1),
                                   dict(strides=[2, 2], pads=[0, 1, 1, 0], dilations=[1, 1], group=2),
                                   dict(strides=[1, 2], pads=[2, 1, 2, 1], dilations=[2, 1], group=4)])
def test_dynqconv_function_equals_kernel(attrs):
    w_int, w_scale, table, bias = _weights(8, 4 // attrs["group"], 3)
    x = rng.normal(size=(7, 4, 9, 9)).astype(np.float32)
    bits = _bits(7)
    node = helper.make_node("DynQConv", ["x", "bits", "w", "ws", "st", "b"], ["y"], domain=domain.DOMAIN, **attrs)
    model = _model(node, {"x": x, "bits": bits}, {"w": w_int, "ws": w_scale, "st": table, "b": bias},
                   [("y", TensorProto.FLOAT)])
    (stock,), (fast,) = _both(model, {"x": x, "bits": bits})
    np.testing.assert_allclose(fast, stock, atol=1e-5, rtol=1e-5)
    # each sample equals a plain Conv with its own derived weights
    for n in (0, 1, 2):
        w = reference.derive_weight(w_int, w_scale, table, int(bits[n]))
        conv = helper.make_node("Conv", ["x", "w", "b"], ["y"], **attrs)
        g = helper.make_graph([conv], "c", [helper.make_tensor_value_info("x", TensorProto.FLOAT, None)],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, None)],
                              [numpy_helper.from_array(w, "w"), numpy_helper.from_array(bias, "b")])
        plain = ort.InferenceSession(helper.make_model(g, opset_imports=[helper.make_opsetid("", OPSET)])
                                     .SerializeToString()).run(None, {"x": x[n:n + 1]})[0]
        np.testing.assert_allclose(stock[n:n + 1], plain, atol=1e-5)


def test_derived_weights_at_highest_precision_are_the_stored_ones():
    w_int, w_scale, table, _ = _weights(8, 4, 3)
    table[8] = w_scale
    w = reference.derive_weight(w_int, w_scale, table, 8)
    np.testing.assert_array_equal(w, w_int.astype(np.float32) * w_scale[:, None, None, None])
    w4 = reference.derive_weight(w_int, w_scale, table, 4)
    assert np.all(np.abs(np.round(w4 / table[4][:, None, None, None])) <= 7)


def test_dynqgemm_function_equals_kernel():
    w_int, w_scale, table, bias = _weights(10, 16, 0)
    x = rng.normal(size=(5, 16)).astype(np.float32)
    bits = _bits(5)
    node = helper.make_node("DynQGemm", ["x", "bits", "w", "ws", "st", "b"], ["y"], domain=domain.DOMAIN)
    model = _model(node, {"x": x, "bits": bits}, {"w": w_int, "ws": w_scale, "st": table, "b": bias},
                   [("y", TensorProto.FLOAT)])
    (stock,), (fast,) = _both(model, {"x": x, "bits": bits})
    np.testing.assert_allclose(fast, stock, atol=1e-5, rtol=1e-5)
    w6 = reference.derive_weight(w_int, w_scale, table, 6)
    np.testing.assert_allclose(stock[1], x[1] @ w6.T + bias, atol=1e-4)


def test_bitselect_function_equals_kernel():
    feats = rng.normal(size=(32, 16, 4, 4)).astype(np.float32)
    w1, b1 = rng.normal(size=(16, 8)).astype(np.float32), rng.normal(size=8).astype(np.float32)
    w2, b2 = rng.normal(size=(8, 5)).astype(np.float32), rng.normal(size=5).astype(np.float32)
    table = np.array([[4, 4, 4], [6, 6, 6], [8, 8, 8], [4, 6, 8], [8, 6, 4]], np.float32)
    node = helper.make_node("BitSelect", ["f", "w1", "b1", "w2", "b2", "t"], ["config", "bits"], domain=domain.DOMAIN)
    model = _model(node, {"f": feats}, {"w1": w1, "b1": b1, "w2": w2, "b2": b2, "t": table},
                   [("config", TensorProto.INT64), ("bits", TensorProto.FLOAT)])
    (c1, bits1), (c2, bits2) = _both(model, {"f": feats})
    np.testing.assert_array_equal(c1, c2)
    np.testing.assert_array_equal(bits1, bits2)
    assert len(np.unique(c1)) > 1
    np.testing.assert_array_equal(bits1, table[c1])


def test_model_with_ops_passes_full_check():
    schemas.register()
    schemas.register()  # idempotent
    x = rng.normal(size=(2, 4, 6, 6)).astype(np.float32)
    w_int, w_scale, table, bias = _weights(8, 4, 3)
    nodes = [helper.make_node("DynQuant", ["x", "bits", "s", "z"], ["xq"], domain=domain.DOMAIN, signed=1),
             helper.make_node("DynQConv", ["xq", "bits", "w", "ws", "st", "b"], ["y"], domain=domain.DOMAIN,
                              pads=[1, 1, 1, 1])]
    g = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 4, 6, 6]),
                                       helper.make_tensor_value_info("bits", TensorProto.FLOAT, ["N"])],
                          [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", 8, 6, 6])],
                          [numpy_helper.from_array(a, k) for k, a in
                           {"s": _tables(), "z": np.zeros(9, np.float32), "w": w_int, "ws": w_scale, "st": table,
                            "b": bias}.items()])
    model = functions.attach(helper.make_model(g, opset_imports=[helper.make_opsetid("", OPSET),
                                                                  domain.opset_import()]), CANDIDATES)
    onnx.checker.check_model(model, full_check=True)
    (y,) = ort.InferenceSession(model.SerializeToString()).run(None, {"x": x, "bits": np.array([4, 8], np.float32)})
    assert y.shape == (2, 8, 6, 6)


def test_kernel_model_rewrite_leaves_the_source_alone():
    node = helper.make_node("DynQConv", ["x", "bits", "w", "ws", "st", "b"], ["y"], domain=domain.DOMAIN,
                            strides=[1, 1], pads=[1, 1, 1, 1])
    model = _model(node, {"x": np.zeros((1, 4, 5, 5), np.float32), "bits": np.zeros(1, np.float32)}, {},
                   [("y", TensorProto.FLOAT)])
    rewritten = kernels.to_kernel_model(model)
    assert rewritten.graph.node[0].domain == domain.KERNEL_DOMAIN
    assert not [f for f in rewritten.functions if f.domain == domain.DOMAIN]
    assert model.graph.node[0].domain == domain.DOMAIN and len(model.functions) == 4
