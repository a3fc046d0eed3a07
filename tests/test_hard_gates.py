"""HardSigmoid / HardSwish between quantized tensors rewritten as integer Add and Mul:
the codes stay within one step of the float op's, onnxruntime fuses every node into
QLinearAdd / QLinearMul, and what cannot be rewritten says why."""

from __future__ import annotations

from collections import Counter

import numpy as np
import onnx
import onnx_ir as ir
import onnxruntime as ort
import pytest
from onnx import TensorProto, helper, numpy_helper

from datafree.toolchain.passes.hard_gates import REFUSED_FLOAT_INPUT, IntegerHardGatesPass

CODES = np.arange(256, dtype=np.uint8).reshape(1, 1, 16, 16)


def _spelled_out(inits: list) -> list:
    """HardSwish as exporters write it below opset 14: x · Clip(x + 3, 0, 6) / 6."""
    for name, v in (("three", 3.0), ("lo", 0.0), ("six", 6.0)):
        inits.append(numpy_helper.from_array(np.float32(v), name))
    return [helper.make_node("Add", ["xf", "three"], ["a"], name="add"),
            helper.make_node("Clip", ["a", "lo", "six"], ["c"], name="clip"),
            helper.make_node("Mul", ["xf", "c"], ["m"], name="mul"),
            helper.make_node("Div", ["m", "six"], ["g"], name="gate")]


def _spelled_out_gate_first(inits: list) -> list:
    """The same as keras and tf2onnx write it: x · (Clip(x + 3, 0, 6) · 1/6)."""
    for name, v in (("three", 3.0), ("lo", 0.0), ("six", 6.0), ("sixth", 1 / 6)):
        inits.append(numpy_helper.from_array(np.float32(v), name))
    return [helper.make_node("Add", ["xf", "three"], ["a"], name="add"),
            helper.make_node("Clip", ["a", "lo", "six"], ["c"], name="clip"),
            helper.make_node("Mul", ["c", "sixth"], ["h"], name="scale"),
            helper.make_node("Mul", ["h", "xf"], ["g"], name="gate")]


def _bias_apart(inits: list) -> list:
    """paddle2onnx's SE gate: a per-channel bias added apart, then HardSigmoid(0.2, 0.5)."""
    inits.append(numpy_helper.from_array(np.array([0.3, -1.2], np.float32).reshape(1, 2, 1, 1), "bias"))
    return [helper.make_node("Add", ["xf", "bias"], ["a"], name="add"),
            helper.make_node("HardSigmoid", ["a"], ["g"], name="gate", alpha=0.2, beta=0.5)]


def _gate_model(op, attrs: dict, x_grid: tuple[float, int], y_grid: tuple[float, int],
                dequantized_input: bool = True) -> onnx.ModelProto:
    """codes → DequantizeLinear → op (or the nodes ``op(inits)`` makes) → QuantizeLinear → codes (opset 17)."""
    inits = [numpy_helper.from_array(np.float32(x_grid[0]), "xs"), numpy_helper.from_array(np.uint8(x_grid[1]), "xz"),
             numpy_helper.from_array(np.float32(y_grid[0]), "ys"), numpy_helper.from_array(np.uint8(y_grid[1]), "yz")]
    nodes = [helper.make_node("DequantizeLinear", ["x", "xs", "xz"], ["xf"], name="dq")] if dequantized_input else \
        [helper.make_node("Identity", ["x"], ["xf"], name="id")]
    nodes += op(inits) if callable(op) else [helper.make_node(op, ["xf"], ["g"], name="gate", **attrs)]
    nodes.append(helper.make_node("QuantizeLinear", ["g", "ys", "yz"], ["y"], name="q"))
    dtype = TensorProto.UINT8 if dequantized_input else TensorProto.FLOAT
    channels = 2 if op is _bias_apart else 1
    graph = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("x", dtype, [1, channels, 16, 16 // channels])],
                              [helper.make_tensor_value_info("y", TensorProto.UINT8, None)], inits)
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])


def _rewritten(proto: onnx.ModelProto) -> tuple[onnx.ModelProto, IntegerHardGatesPass]:
    model = ir.serde.deserialize_model(proto)
    gates = IntegerHardGatesPass()
    gates(model)
    return ir.serde.serialize_model(model), gates


def _run(proto: onnx.ModelProto, x: np.ndarray, optimized: bool, path=None) -> np.ndarray:
    options = ort.SessionOptions()
    options.log_severity_level = 3
    if not optimized:
        options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    if path is not None:
        options.optimized_model_filepath = str(path)
    session = ort.InferenceSession(proto.SerializeToString(), options, providers=["CPUExecutionProvider"])
    return session.run(None, {"x": x})[0]


# op, attributes, input grid (scale, zero point), output grid, whether it multiplies by x: HardSwish
# over -3.5 .. 8 (the operator, and spelled out), the SE gate's HardSigmoid at torch's slope and at
# ONNX's default one, and after a bias added apart, onto the gate's 1/255 grid
CASES = [("HardSwish", {}, (11.5 / 255, 78), (8.4 / 255, 11), True),
         (_spelled_out, {}, (11.5 / 255, 78), (8.4 / 255, 11), True),
         (_spelled_out_gate_first, {}, (11.5 / 255, 78), (8.4 / 255, 11), True),
         ("HardSigmoid", {"alpha": 1 / 6, "beta": 0.5}, (11.3 / 255, 128), (1 / 255, 0), False),
         ("HardSigmoid", {"alpha": 0.2, "beta": 0.5}, (9.0 / 255, 100), (1 / 255, 0), False),
         (_bias_apart, {}, (9.0 / 255, 100), (1 / 255, 0), False)]
IDS = ["hardswish", "hardswish-spelled-out", "hardswish-spelled-out-gate-first", "hardsigmoid", "hardsigmoid-0.2", "hardsigmoid-bias-apart"]


@pytest.mark.parametrize("op, attrs, x_grid, y_grid, swish", CASES, ids=IDS)
def test_codes_stay_within_one_step_and_fuse_into_integer_kernels(op, attrs, x_grid, y_grid, swish, tmp_path):
    proto = _gate_model(op, attrs, x_grid, y_grid)
    codes = CODES.reshape(proto.graph.input[0].type.tensor_type.shape.dim[1].dim_value, 16, -1)[None]
    new, gates = _rewritten(proto)
    assert len(gates.rewritten) == 1 and not gates.refused
    assert {n.op_type for n in new.graph.node} == {"DequantizeLinear", "Add", "QuantizeLinear"} | ({"Mul"} if swish else set())
    before = _run(proto, codes, optimized=False).astype(np.int32)
    after = _run(new, codes, optimized=False).astype(np.int32)
    assert np.abs(after - before).max() <= 1 and np.mean(after != before) < 0.15
    fused = _run(new, codes, optimized=True, path=tmp_path / "optimized.onnx").astype(np.int32)
    assert np.abs(fused - before).max() <= 1
    ops = Counter(n.op_type for n in onnx.load(tmp_path / "optimized.onnx").graph.node)
    assert ops["QLinearAdd"] == 1 and ops["QLinearMul"] == swish
    assert not {"HardSwish", "HardSigmoid", "Clip", "Div", "Add", "Mul"} & set(ops)


def test_hardsigmoid_output_requantized_at_8_bits_keeps_its_codes():
    """The gate's own QuantizeLinear goes: its readers dequantize the ramp's codes at 1/255."""
    proto = _gate_model("HardSigmoid", {"alpha": 1 / 6, "beta": 0.5}, (12.0 / 255, 128), (1 / 255, 0))
    proto.graph.node.append(helper.make_node("DequantizeLinear", ["y", "ys", "yz"], ["yf"], name="read"))
    proto.graph.output[0].CopyFrom(helper.make_tensor_value_info("yf", TensorProto.FLOAT, [1, 1, 16, 16]))
    new, _ = _rewritten(proto)
    assert [n.op_type for n in new.graph.node].count("QuantizeLinear") == 1
    before, after = _run(proto, CODES, optimized=False), _run(new, CODES, optimized=False)
    assert np.abs(after - before).max() <= 1 / 255 + 1e-6


def test_what_is_not_rewritten_says_why():
    _, gates = _rewritten(_gate_model("HardSwish", {}, (0.05, 0), (0.05, 0), dequantized_input=False))
    assert gates.refused == {"gate": REFUSED_FLOAT_INPUT} and not gates.rewritten
    _, gates = _rewritten(_gate_model("HardSigmoid", {"alpha": -0.2, "beta": 0.5}, (0.05, 0), (1 / 255, 0)))
    assert "does not rise" in gates.refused["gate"]
    proto = _gate_model("HardSwish", {}, (0.05, 0), (0.05, 0))
    proto.graph.node[-1].CopyFrom(helper.make_node("Relu", ["g"], ["y_float"], name="relu"))
    proto.graph.output[0].CopyFrom(helper.make_tensor_value_info("y_float", TensorProto.FLOAT, [1, 1, 16, 16]))
    _, gates = _rewritten(proto)
    assert "stays float" in gates.refused["gate"]
    proto = _gate_model("HardSigmoid", {"alpha": 0.2, "beta": 0.5}, (0.05, 0), (0.05, 0))   # gating float values
    proto.graph.node.insert(-1, helper.make_node("Mul", ["g", "w"], ["gw"], name="apply"))
    proto.graph.node.insert(0, helper.make_node("Relu", ["xf"], ["w"], name="float_values"))
    proto.graph.node[-1].input[0] = "gw"
    _, gates = _rewritten(proto)
    assert "gates float values" in gates.refused["gate"] and not gates.rewritten
