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

Contract: an in-place pass over a model whose Q/DQ are written; it rewrites every
``HardSigmoid``/``HardSwish`` whose input is dequantized from an 8-bit container and
whose output is quantized again, and says for every other one why not (``refused``).
"""

from __future__ import annotations

import numpy as np
import onnx_ir as ir

from ..graph import UniqueNames, add_initializer, attr
from .qdq import remove_unused

OPS = ("HardSigmoid", "HardSwish")
REFUSED_FLOAT_INPUT = "its input is float (not dequantized)"
CODES = {ir.DataType.UINT8: (0, 255), ir.DataType.INT8: (-128, 127)}   # container: (zero point, top code)


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
        for node in [n for n in graph if n.op_type in OPS and n.domain in ("", "ai.onnx")]:
            container, why = _match(node)
            if why is not None:
                self.refused[node.name or node.outputs[0].name] = why
                continue
            names = names or UniqueNames(graph)
            _rewrite(graph, names, node, container)
            self.rewritten.append(node.name or node.outputs[0].name)
        if self.rewritten:
            remove_unused(model)
        return ir.passes.PassResult(model, bool(self.rewritten))


def _alpha_beta(node: ir.Node) -> tuple[float, float]:
    if node.op_type == "HardSwish":
        return 1.0 / 6.0, 0.5
    return float(attr(node, "alpha", 0.2)), float(attr(node, "beta", 0.5))


def _match(node: ir.Node) -> tuple[ir.DataType | None, str | None]:
    """(the 8-bit container of the input, None), or (None, why not)."""
    alpha, beta = _alpha_beta(node)
    if alpha <= 0 or beta <= 0:
        return None, f"alpha {alpha:g} and beta {beta:g}: the gate is not a saturating ramp up from 0"
    dq = node.inputs[0].producer()
    if dq is None or dq.op_type != "DequantizeLinear":
        return None, REFUSED_FLOAT_INPUT
    zero = dq.inputs[2] if len(dq.inputs) > 2 else None
    container = dq.inputs[0].dtype or (zero.dtype if zero is not None else None)
    if container not in CODES:
        return None, f"its input is dequantized from {container or 'an unknown type'}, not an 8-bit container"
    uses = list(node.outputs[0].uses())
    if node.outputs[0].is_graph_output() or not uses:
        return None, "its output is a graph output"
    if node.op_type == "HardSwish" and not all(u.node.op_type == "QuantizeLinear" for u in uses):
        return None, "its output stays float: no integer Mul to fuse into"
    return container, None


def _rewrite(graph: ir.Graph, names: UniqueNames, node: ir.Node, container: ir.DataType) -> None:
    alpha, beta = _alpha_beta(node)
    zero, top = CODES[container]
    np_dt = np.uint8 if container == ir.DataType.UINT8 else np.int8
    base = node.name or node.outputs[0].name
    x = node.inputs[0]

    def const(name: str, value, dtype=None) -> ir.Value:
        return add_initializer(graph, f"{base}/{name}", np.array(value, dtype=dtype or np.float32),
                               container if dtype is np_dt else None, names=names)

    z = const("zero_point", zero, np_dt)
    offset = ir.node("DequantizeLinear", [const("offset_code", top, np_dt),
                                          const("offset_scale", beta / alpha / (top - zero)), z],
                     name=names(f"{base}/offset"), num_outputs=1)
    shifted = ir.node("Add", [x, offset.outputs[0]], name=names(f"{base}/Add"), num_outputs=1)
    t = ir.node("QuantizeLinear", [shifted.outputs[0], const("ramp_scale", 1.0 / (255.0 * alpha)), z],
                name=names(f"{base}/QuantizeLinear"), num_outputs=1)
    gate = ir.node("DequantizeLinear", [t.outputs[0], const("gate_scale", 1.0 / 255.0), z],
                   name=names(f"{base}/DequantizeLinear"), num_outputs=1)
    nodes = [offset, shifted, t, gate]
    if node.op_type == "HardSwish":
        nodes.append(ir.node("Mul", [x, gate.outputs[0]], name=names(f"{base}/Mul"), num_outputs=1))
    for n in nodes:
        n.outputs[0].name = names(f"{n.name}_output")
    out = nodes[-1].outputs[0]
    graph.insert_before(node, nodes)
    ir.convenience.replace_all_uses_with(node.outputs[0], out)
    graph.remove(node, safe=True)
    if node.op_type == "HardSigmoid":
        _drop_requantization(gate, t, container)


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
