"""Zero-padded shortcuts as 1x1 convolutions, so onnxruntime keeps a stage in one layout.

CIFAR ResNets (option-A shortcuts) and other exports downsample a residual by
slicing it (``x[:, :, ::2, ::2]``) and pad zero channels onto it to widen it::

    x ─ Slice(axis 2, step 2) ─ Slice(axis 3, step 2) ─ Pad(channels, zeros) ─ Add

The same values come out of one ``Conv(kernel 1, stride 2)`` whose weight is a 0/1
selection matrix (input channel ``c`` → output channel ``before + c``; every other
product is an exact zero).  onnxruntime's CPU runs its convolutions in a blocked
channel layout (NCHWc) and reorders tensors back to NCHW for anything else: the
Slices and the Pad cost reorders as well as their own copies, and keep the Add and
the ReLU after it outside the next conv.  As a convolution the shortcut stays in
the blocked layout and the Add and ReLU fuse into the conv: the float ResNet-20
runs ~10 % faster at batch 64, pruned or not, with the same outputs.

Where the residual is quantized (8 bits) the selection conv is too (INT8 0/1 weights, the
output requantized on the input's own grid): onnxruntime runs it as a ``QLinearConv``
that copies the integers exactly, and the Add after it as a ``QLinearAdd`` instead
of a float Add of a dequantized, padded tensor (W8A8 ResNet-20 ~7 % faster; the
same values in ONNX semantics, though onnxruntime's integer Add rounds a little
differently from its float one).  4-bit residuals keep their Pad.  In a model whose
weights are stored quantized (weight-only) the selection weight is INT8 too, cast to
float like those weights (folded at load).
"""

from __future__ import annotations

import numpy as np
import onnx_ir as ir

from ..graph import UniqueNames, add_initializer, attr, const_array
from .qdq import ActQuant, insert_act_qdq, remove_unused, stores_quantized_weights

INT64_MAX = np.iinfo(np.int64).max


class ShortcutAsConvPass(ir.passes.InPlacePass):
    """Rewrite every matched ``[Slice ...] → Pad`` shortcut (see the module docstring);
    ``refused``: every other Pad, and why."""

    def __init__(self):
        super().__init__()
        self.refused: dict[str, str] = {}      # Pad node name -> why it was left as it is

    def call(self, model: ir.Model) -> ir.passes.PassResult:
        graph, names, modified = model.graph, None, False
        quantized = stores_quantized_weights(graph)
        for pad in [n for n in graph if n.op_type == "Pad" and n.domain in ("", "ai.onnx")]:
            match, why = _match(pad)
            if match is None:
                self.refused[pad.name or pad.outputs[0].name] = why
                continue
            x, strides, before, after, grid = match
            names = names or UniqueNames(graph)
            base = pad.name or "shortcut"
            cin = x.shape[1]
            w = np.zeros((before + cin + after, cin) + (1,) * len(strides), np.float32)
            w[before + np.arange(cin), np.arange(cin)] = 1.0
            weight = _selection_weight(graph, names, f"{base}_select", w, quantized, grid is not None, pad)
            out = pad.outputs[0]
            conv = ir.node("Conv", [x, weight], attributes={"kernel_shape": [1] * len(strides),
                                                             "strides": list(strides)},
                           name=names(f"{base}_conv"), num_outputs=1)
            result = conv.outputs[0]
            result.shape, result.dtype = out.shape, out.dtype
            graph.insert_before(pad, conv)
            if out.is_graph_output():      # the graph output keeps its name (and stays float)
                name = out.name
                ir.convenience.replace_all_uses_with(out, result, replace_graph_outputs=True)
                out.name = None
                result.name = name
            else:
                result.name = names(f"{base}_selected" if grid is not None else out.name or "shortcut")
                ir.convenience.replace_all_uses_with(out, result)
                if grid is not None:
                    # on the input's own grid: onnxruntime runs the selection as an integer
                    # QLinearConv (requantization factor exactly 1: it copies the integers, the
                    # padded channels come out as the zero point) and the Add after it as a QLinearAdd
                    insert_act_qdq(graph, names, result, grid)
            modified = True
        if modified:
            remove_unused(model)
        return ir.passes.PassResult(model, modified)


def _selection_weight(graph: ir.Graph, names: UniqueNames, base: str, w: np.ndarray, quantized: bool,
                      integer: bool, before: ir.Node) -> ir.Value:
    """The 0/1 weight: float32; on a quantized residual (``integer``), INT8 through
    ``DequantizeLinear(scale 1)`` for an integer kernel; in a model whose weights are
    stored quantized, INT8 through ``Cast(to=FLOAT)`` (exact; a quarter of the bytes, and
    folded at load like the model's other weights)."""
    if not quantized and not integer:
        return add_initializer(graph, base, w, names=names)
    q = add_initializer(graph, f"{base}_quantized", w.astype(np.int8), ir.DataType.INT8, names=names)
    if not integer:
        cast = ir.node("Cast", [q], attributes={"to": int(ir.DataType.FLOAT)}, name=names(f"{base}_Cast"),
                       num_outputs=1)
        cast.outputs[0].name = names(f"{base}_float")
        graph.insert_before(before, cast)
        return cast.outputs[0]
    scale = add_initializer(graph, f"{base}_scale", np.array(1.0, np.float32), names=names)
    zero = add_initializer(graph, f"{base}_zero_point", np.array(0, np.int8), ir.DataType.INT8, names=names)
    dq = ir.node("DequantizeLinear", [q, scale, zero], name=names(f"{base}_DequantizeLinear"), num_outputs=1)
    dq.outputs[0].name = names(f"{base}_dequantized")
    graph.insert_before(before, dq)
    return dq.outputs[0]


def _match(pad: ir.Node):
    """((input, strides, channels padded before, after, activation grid or None), None) for
    a zero channel-pad of a strided spatial subsampling starting at 0, else (None, why not).
    Through the Q/DQ pairs that requantize each Slice's output on its input's grid."""
    if attr(pad, "mode", "constant") != "constant":
        return None, f"mode {attr(pad, 'mode', 'constant')!r}: only a constant pad adds zero channels"
    if len(pad.inputs) > 2 and pad.inputs[2] is not None:
        value = const_array(pad.inputs[2])
        if value is None or np.any(value != 0):
            return None, "its pad value is not a constant zero"
    pads = const_array(pad.inputs[1]) if len(pad.inputs) > 1 and pad.inputs[1] is not None else None
    x = pad.inputs[0]
    shape = x.shape
    if pads is None:
        return None, "its pads are not constant"
    if shape is None or len(shape) < 3 or x.dtype != ir.DataType.FLOAT:
        return None, "its input is not a float tensor of known rank with spatial axes"
    rank = len(shape)
    axes = list(range(rank))
    if len(pad.inputs) > 3 and pad.inputs[3] is not None:
        given = const_array(pad.inputs[3])
        if given is None:
            return None, "its axes are not constant"
        axes = [int(a) % rank for a in given.reshape(-1)]
    pads = pads.reshape(-1).astype(np.int64)
    if len(pads) != 2 * len(axes):
        return None, "its pads do not match its axes"
    begin = dict(zip(axes, pads[:len(axes)].tolist()))
    end = dict(zip(axes, pads[len(axes):].tolist()))
    if any(v != 0 for a, v in [*begin.items(), *end.items()] if a != 1):
        return None, "it pads more than the channel axis"
    before, after = begin.get(1, 0), end.get(1, 0)
    if before < 0 or after < 0 or before + after == 0:
        return None, "it adds no channels (or crops them)"
    strides = [1] * (rank - 2)
    grid = _grid(x)
    if grid is not None and grid.bits != 8:
        return None, (f"its input is on a {grid.bits}-bit grid: onnxruntime would fuse the selection into a "
                      "QLinearConv that rejects inputs narrower than 8 bits")
    while True:
        p = x.producer()
        if grid is not None and _grid(x) == grid and p.inputs[0].producer() is not None and \
                p.inputs[0].producer().op_type == "QuantizeLinear":
            # DQ(Q(slice output)) on the same grid: the Slice's own requantization, lossless
            inner = p.inputs[0].producer().inputs[0].producer()
            if inner is not None and inner.op_type == "Slice":
                p = inner
        if p is None or p.op_type != "Slice" or p.domain not in ("", "ai.onnx"):
            break
        steps = _slice_steps(p, rank)
        if steps is None:
            break
        for axis, step in steps.items():
            strides[axis - 2] *= step
        x = p.inputs[0]
    if x.shape is None or not isinstance(x.shape[1], int) or x.dtype != ir.DataType.FLOAT:
        return None, "the tensor it widens has no known channel count"
    p = x.producer()
    if x.const_value is not None or x.is_initializer() or \
            (p is not None and p.op_type == "DequantizeLinear" and p.inputs[0].is_initializer()):
        return None, "it pads a constant, not a shortcut"
    if p is not None and p.op_type == "DequantizeLinear" and _grid(x) != grid:
        return None, "the tensor is requantized on another grid on the way"
    return (x, strides, before, after, grid), None


def _grid(value: ir.Value) -> ActQuant | None:
    """The per-tensor activation grid of the DequantizeLinear producing ``value``, else None."""
    p = value.producer()
    if p is None or p.op_type != "DequantizeLinear" or p.inputs[0].is_initializer() or len(p.inputs) < 3:
        return None
    scale, zero = const_array(p.inputs[1]), const_array(p.inputs[2])
    if scale is None or zero is None or scale.size != 1 or zero.size != 1:
        return None
    dtype = p.inputs[2].dtype
    return ActQuant(bits=dtype.bitwidth, scale=float(scale.reshape(())), zero_point=int(zero.reshape(())),
                    signed=dtype.is_signed())


def _slice_steps(node: ir.Node, rank: int) -> dict[int, int] | None:
    """{spatial axis: step} of a Slice that only subsamples spatial axes from 0 to the end."""
    ins = list(node.inputs) + [None] * (5 - len(node.inputs))
    starts, ends = const_array(ins[1]), const_array(ins[2])
    if starts is None or ends is None:
        return None
    axes = const_array(ins[3]) if ins[3] is not None else np.arange(len(starts))
    steps = const_array(ins[4]) if ins[4] is not None else np.ones(len(starts), np.int64)
    if axes is None or steps is None:
        return None
    shape = node.inputs[0].shape
    out: dict[int, int] = {}
    for s, e, a, st in zip(starts.reshape(-1), ends.reshape(-1), axes.reshape(-1), steps.reshape(-1)):
        a = int(a) % rank
        dim = shape[a] if shape is not None else None
        if a < 2 or int(st) < 1 or int(s) != 0:
            return None
        if not (int(e) >= INT64_MAX // 2 or (isinstance(dim, int) and int(e) >= dim)):
            return None
        out[a] = out.get(a, 1) * int(st)
    return out
