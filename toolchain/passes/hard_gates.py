"""HardSigmoid and HardSwish between quantized tensors as onnxruntime's integer Add and Mul.

MobileNetV3-style networks follow most convolutions with ``HardSwish`` and gate their
squeeze-and-excitation blocks with ``HardSigmoid``.  onnxruntime has no integer kernel
for either, so where activations are quantized each runs as ``DequantizeLinear → op →
QuantizeLinear`` in float between two integer layers: three passes over the tensor,
four bytes per value, on the networks that have the least compute to hide them behind.

The same values come out of integer kernels onnxruntime does have.  With
``HardSigmoid(x) = clip(α·x + β, 0, 1) = clip(x + β/α, 0, 1/α) · α``::

    t = QuantizeLinear(x + β/α, scale 1/(255·α))     the clip is the integer grid's own
                                                      saturation: codes 0 … 255 are 0 … 1/α
    HardSigmoid(x) ≈ DequantizeLinear(t, scale 1/255)  the same codes read as 0 … 1
    HardSwish(x)   = x · HardSigmoid(x)                (α = 1/6, β = 1/2)

``DQ → Add → Q`` fuses into ``QLinearAdd`` and ``DQ, DQ → Mul → Q`` into ``QLinearMul``:
one byte per value in and out.  The gate is rounded to 1/255 (a HardSigmoid's output
quantized at 8 bits has that grid anyway); a HardSwish output moves by at most one step
of its own grid.  A HardSigmoid whose output was quantized at 8 bits keeps its codes:
the QuantizeLinear after it goes and its readers dequantize ``t`` at 1/255.

Exporters write these gates three ways, all matched: the operators themselves;
``HardSigmoid`` of a convolution's output plus a per-channel bias written apart
(paddle2onnx), whose bias joins the offset (quantized per tensor on the container's
grid); and HardSwish spelled out as ``x · Clip(x + 3, 0, 6) / 6`` or ``x · (Clip(x + 3, 0, 6) / 6)``
(``graph.spelled_out_hardswish``, which the layer analysis also reads as an activation).

Contract: an in-place pass over a model whose Q/DQ are written; it rewrites every such
gate whose input is dequantized from an 8-bit container (a HardSwish also needs its
output quantized again) and says for every other one why not (``refused``).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import onnx_ir as ir

from ..graph import UniqueNames, add_initializer, added_constant, attr, single_consumer, spelled_out_hardswish
from .qdq import remove_unused

REFUSED_FLOAT_INPUT = "its input is float (not dequantized)"
CODES = {ir.DataType.UINT8: (0, 255), ir.DataType.INT8: (-128, 127)}   # container: (zero point, top code)
DEFAULT_OPS = ("", "ai.onnx")


@dataclass
class _Gate:
    """``clip(alpha·(x + offset), 0, 1)``, times ``x`` where ``swish``, replacing ``out``."""
    x: ir.Value                   # the dequantized input
    offset: np.ndarray            # scalar, or per channel (broadcasting against x)
    alpha: float
    swish: bool
    out: ir.Value
    nodes: list[ir.Node]          # the nodes it replaces (the last one makes ``out``)
    container: ir.DataType | None = None


class IntegerHardGatesPass(ir.passes.InPlacePass):
    """Rewrite every matched HardSigmoid / HardSwish (module docstring); ``refused``:
    node name → why it was left as it is."""

    def __init__(self):
        super().__init__()
        self.rewritten: list[str] = []
        self.refused: dict[str, str] = {}

    def call(self, model: ir.Model) -> ir.passes.PassResult:
        graph = model.graph
        names = None
        for node in [n for n in graph if n.domain in DEFAULT_OPS and n.op_type in ("HardSigmoid", "HardSwish", "Clip")]:
            gate, why = _match(node)
            if gate is None:
                if why is not None:
                    self.refused[node.name or node.outputs[0].name] = why
                continue
            names = names or UniqueNames(graph)
            _rewrite(graph, names, gate)
            self.rewritten.append(node.name or node.outputs[0].name)
        if self.rewritten:
            remove_unused(model)
        return ir.passes.PassResult(model, bool(self.rewritten))


def _match(node: ir.Node) -> tuple[_Gate | None, str | None]:
    """(the gate, None); (None, why not); or (None, None) for a Clip that is no gate."""
    if node.op_type == "Clip":
        gate = _spelled_out_hardswish(node)
        if gate is None:
            return None, None
    else:
        alpha, beta = (1.0 / 6.0, 0.5) if node.op_type == "HardSwish" else \
            (float(attr(node, "alpha", 0.2)), float(attr(node, "beta", 0.5)))
        if alpha <= 0:
            return None, f"alpha {alpha:g}: the gate does not rise with its input"
        x, offset, nodes = node.inputs[0], np.float32(beta / alpha), [node]
        add = x.producer()
        bias = added_constant(add) if add is not None and single_consumer(x) is node else None
        if bias is not None and node.op_type == "HardSigmoid":      # a bias written apart from its conv
            x, offset, nodes = bias[0], (bias[1] + beta / alpha).astype(np.float32), [add, node]
        gate = _Gate(x, offset, alpha, node.op_type == "HardSwish", node.outputs[0], nodes)
    dq = gate.x.producer()
    if dq is None or dq.op_type != "DequantizeLinear":
        return None, REFUSED_FLOAT_INPUT
    zero = dq.inputs[2] if len(dq.inputs) > 2 else None
    gate.container = dq.inputs[0].dtype or (zero.dtype if zero is not None else None)
    if gate.container not in CODES:
        return None, f"its input is dequantized from {gate.container or 'an unknown type'}, not an 8-bit container"
    uses = list(gate.out.uses())
    if gate.out.is_graph_output() or not uses:
        return None, "its output is a graph output"
    if gate.swish and not all(u.node.op_type == "QuantizeLinear" for u in uses):
        return None, "its output stays float: no integer Mul to fuse into"
    if not gate.swish and not all(_integer_reader(u.node, gate.out) for u in uses):
        # a gate read in float gains no kernel, and its rounding scales whole channels alike
        return None, "it gates float values: no integer Mul to fuse into"
    return gate, None


def _integer_reader(node: ir.Node, gate: ir.Value) -> bool:
    """Whether ``node`` reads the gate as an integer kernel would: a QuantizeLinear, or a Mul
    of a dequantized tensor whose product is quantized again."""
    if node.op_type == "QuantizeLinear":
        return True
    if node.op_type != "Mul" or len(node.inputs) != 2:
        return False
    other = node.inputs[1] if node.inputs[0] is gate else node.inputs[0]
    producer = other.producer() if other is not None else None
    uses = list(node.outputs[0].uses())
    return producer is not None and producer.op_type == "DequantizeLinear" and bool(uses) and \
        all(u.node.op_type == "QuantizeLinear" for u in uses)


def _spelled_out_hardswish(clip: ir.Node) -> _Gate | None:
    hs = spelled_out_hardswish(clip)
    if hs is None:
        return None
    return _Gate(hs.x, np.float32(hs.offset), 1.0 / hs.top, True, hs.out, hs.nodes)


def _offset_codes(c: np.ndarray, container: ir.DataType) -> tuple[np.ndarray, float, int]:
    """``c`` on a per-tensor grid of the container: (codes, scale, zero point).  A positive
    scalar is exact (the top code); a per-channel vector is rounded to 1/255 of its span."""
    zero, top = CODES[container]
    lo, hi = min(float(c.min()), 0.0), max(float(c.max()), 0.0)
    scale = (hi - lo) / (top - zero) or 1.0
    zp = zero + int(round(-lo / scale))
    codes = np.clip(np.round(c / scale) + zp, zero, top)
    return codes, scale, zp


def _rewrite(graph: ir.Graph, names: UniqueNames, gate: _Gate) -> None:
    zero, top = CODES[gate.container]
    np_dt = np.uint8 if gate.container == ir.DataType.UINT8 else np.int8
    last = gate.nodes[-1]
    base = last.name or gate.out.name

    def const(name: str, value, integer: bool = False) -> ir.Value:
        array = np.asarray(value, dtype=np_dt if integer else np.float32)
        return add_initializer(graph, f"{base}/{name}", array, gate.container if integer else None, names=names)

    codes, scale, zp = _offset_codes(np.asarray(gate.offset, np.float64), gate.container)
    z = const("zero_point", zero, integer=True)
    offset = ir.node("DequantizeLinear", [const("offset_codes", codes, integer=True), const("offset_scale", scale),
                                          const("offset_zero_point", zp, integer=True)],
                     name=names(f"{base}/offset"), num_outputs=1)
    shifted = ir.node("Add", [gate.x, offset.outputs[0]], name=names(f"{base}/Add"), num_outputs=1)
    ramp = ir.node("QuantizeLinear", [shifted.outputs[0], const("ramp_scale", 1.0 / ((top - zero) * gate.alpha)), z],
                   name=names(f"{base}/QuantizeLinear"), num_outputs=1)
    read = ir.node("DequantizeLinear", [ramp.outputs[0], const("gate_scale", 1.0 / (top - zero)), z],
                   name=names(f"{base}/DequantizeLinear"), num_outputs=1)
    nodes = [offset, shifted, ramp, read]
    if gate.swish:
        nodes.append(ir.node("Mul", [gate.x, read.outputs[0]], name=names(f"{base}/Mul"), num_outputs=1))
    for n in nodes:
        n.outputs[0].name = names(f"{n.name}_output")
    graph.insert_before(gate.nodes[0], nodes)
    ir.convenience.replace_all_uses_with(gate.out, nodes[-1].outputs[0])
    graph.remove(gate.nodes[::-1], safe=True)
    if not gate.swish:
        _drop_requantization(read, ramp, gate.container)


def _drop_requantization(gate: ir.Node, t: ir.Node, container: ir.DataType) -> None:
    """Where the gate is quantized again at 8 bits in the same container and only read
    dequantized, its readers read ``t`` at 1/255 instead (the same codes)."""
    uses = list(gate.outputs[0].uses())
    if len(uses) != 1 or uses[0].node.op_type != "QuantizeLinear":
        return
    q = uses[0].node
    readers = [u.node for u in q.outputs[0].uses()]
    if q.outputs[0].dtype not in (None, container) or q.outputs[0].is_graph_output() or not readers or \
            not all(r.op_type == "DequantizeLinear" for r in readers):
        return
    zp = q.inputs[2] if len(q.inputs) > 2 else None
    if zp is None or zp.dtype != container:
        return
    for r in readers:
        r.replace_input_with(0, t.outputs[0])
        r.replace_input_with(1, gate.inputs[1])
        r.replace_input_with(2, gate.inputs[2])
