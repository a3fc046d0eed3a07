"""Write quantization into the graph as QuantizeLinear / DequantizeLinear (QDQ).

* weights: integer initializer (INT8, or INT4 at <= 4 bits on opset 21), written in
  the form a plain onnxruntime session with default options runs fastest
  (:func:`weight_form`):

  - a layer onnxruntime fuses into an integer kernel: ``DequantizeLinear(axis=output
    channels)`` → layer, with ``Cast(to=INT8)`` in front of the DequantizeLinear for
    INT4 weights.  onnxruntime has no INT4 convolution: it folds the Cast at load,
    sees an INT8 weight and fuses the layer (QLinearConv, QGemm, QLinearMatMul) while
    the file keeps 4-bit storage;
  - a layer between quantized activations that no integer kernel runs
    (ConvTranspose): ``DequantizeLinear`` → layer;
  - any other layer (weight-only, a conv whose output is not requantized):
    ``Cast(to=FLOAT) → Mul(scale)``, the same float32 values as DequantizeLinear but
    ordinary constants, which onnxruntime folds into a float weight at load (it
    never folds a DequantizeLinear unless the session disables QDQ handling);
* activations: ``QuantizeLinear → DequantizeLinear`` on a tensor, once, feeding all
  its consumers, in uint8 (a signed grid's zero point moved up by 128: the same
  values), the type onnxruntime's x86 kernels take: an int8 tensor between two ops
  that are not both layers (a SE block's Mul, a pool) stops their fusion into
  QLinearMul / QLinearGlobalAveragePool.  Narrower ones with a ``Clip`` to their grid
  between the two (:func:`act_container`), so that they too run on onnxruntime's
  8-bit integer kernels;
* biases of layers whose input is quantized: INT32 with scale ``s_x·s_w``, the form
  onnxruntime needs to fuse ``DQ → Conv → Q`` into an integer ``QLinearConv`` (float
  for INT4 weights of layers no integer kernel runs).
"""

from __future__ import annotations

from dataclasses import dataclass

import ml_dtypes
import numpy as np
import onnx_ir as ir

from ..ingest import STORED_INTEGERS
from ..recipe import Recipe
from ..graph import Layer, UniqueNames, add_initializer, attr, clip_bounds, const_array
from ..quant import act_range_grid
from .quantize import WeightQuant


@dataclass
class ActQuant:
    bits: int
    scale: float
    zero_point: int
    signed: bool


def activation_plan(layers: list[Layer], recipe: Recipe) -> dict[str, int]:
    """Which tensors get QDQ, at how many bits.

    The input of every layer with activation bits; and, so onnxruntime can run the
    layer as an integer kernel (DQ → Conv → Q), the output of every quantized
    convolution that also feeds something else (a residual Add, a pool), at no fewer
    than 8 bits.  Gemm and MatMul have integer kernels with float outputs (QGemm,
    MatMulIntegerToFloat): their outputs are quantized only where a layer reads them
    (a classifier's scores going to a Softmax are not).
    With ``recipe.integer_kernels``, also the points :func:`kernel_points` names, at
    8 bits or more.
    """
    wanted: dict[str, int] = {}
    for layer in layers:
        eff = recipe.for_layer(layer.name, layer.kind)
        if eff.skip or eff.abits is None:
            continue
        name = layer.node.inputs[0].name
        wanted[name] = max(wanted.get(name, 0), eff.abits)
    for layer in layers:
        eff = recipe.for_layer(layer.name, layer.kind)
        if eff.skip or eff.abits is None:
            continue
        points = kernel_points(layer) if recipe.integer_kernels else []
        out = [layer.output] if layer.op in ("Conv", "ConvTranspose") else []   # Gemm/MatMul: float output kernels
        for value in points + out:
            if not value.is_graph_output() and value.name not in wanted:
                wanted[value.name] = max(8, eff.abits)
    return wanted


# activations onnxruntime removes between a layer and its QuantizeLinear (the grid clips alike)
_FUSED_ACTS = (None, "relu", "clip")


def kernel_points(layer: Layer) -> list[ir.Value]:
    """The values between a layer and its output that must be quantized for onnxruntime
    to run the layer, and its activation, on integer kernels: in graph order.

    onnxruntime fuses ``DQ → Conv → Q`` into QLinearConv (Relu or Clip before the Q it
    drops), but has no integer kernel with SiLU, HardSwish, a Sigmoid gate and the like
    after it: with the activation between the layer and the next QuantizeLinear the layer
    runs in float, with float weights, slower than the float model because of the Q/DQ
    around it.  Quantizing the layer's own output (at 8 bits, before the activation) lets
    it fuse; a gated activation (``y·σ(y)``, ``y·hσ(y)``) also quantizes the gate, so the
    product runs as QLinearMul (and a Sigmoid as QLinearSigmoid).  onnxruntime's own
    quantizer places its Q/DQ the same way.  What it costs: one more 8-bit rounding of
    each such tensor, its range chosen by the error after the activation
    (``fit._range_after``)."""
    if layer.op != "Conv" or layer.act_type in _FUSED_ACTS or not layer.act:
        return []          # Gemm / MatMul: kernels with float outputs; ConvTranspose: no integer kernel
    points = [layer.act[0].inputs[0]]
    if len(layer.act) == 2:
        points.append(layer.act[0].outputs[0])
    return points


# ops that only move values: a quantized input gives outputs on the same grid
DATA_MOVEMENT = {"Slice", "Split", "Reshape", "Transpose", "Squeeze", "Unsqueeze", "Flatten", "MaxPool",
                 "DepthToSpace", "SpaceToDepth", "Gather"}


def through_data_movement(values: dict[str, ir.Value], acts: dict[str, ActQuant]) -> dict[str, ActQuant]:
    """``acts`` with the outputs of the data-movement ops that read a quantized tensor
    quantized alike (lossless: their values are already on that grid).

    onnxruntime would otherwise propagate the Q/DQ through them itself, and at opset 21
    its propagation writes a QuantizeLinear whose zero point type contradicts its
    ``output_dtype``: a chunk (Slice) of a quantized tensor going straight into a Concat
    made the model fail to load.  ``values``: the graph's values by name.
    """
    acts = dict(acts)
    todo = list(acts)
    while todo:
        name = todo.pop()
        for use in values[name].uses():
            node = use.node
            if node.op_type not in DATA_MOVEMENT or use.idx != 0 or node.domain not in ("", "ai.onnx"):
                continue
            for out in node.outputs:
                if out.name in acts or out.is_graph_output() or not list(out.uses()):
                    continue
                acts[out.name] = acts[name]
                todo.append(out.name)
    return acts


def _int_dtype(bits: int, signed: bool, packed4: bool):
    if bits <= 4 and packed4:
        return (ml_dtypes.int4, ir.DataType.INT4) if signed else (ml_dtypes.uint4, ir.DataType.UINT4)
    return (np.int8, ir.DataType.INT8) if signed else (np.uint8, ir.DataType.UINT8)


def _weight_layout(layer: Layer, q_oc: np.ndarray) -> tuple[np.ndarray, int]:
    """Integer weights back in the layer's own layout, and the channel axis for DQ."""
    if layer.op == "Gemm" and not attr(layer.node, "transB", 0) or layer.op == "MatMul":
        return q_oc.T, 1
    if layer.op == "ConvTranspose":
        return q_oc.swapaxes(0, 1), 1
    return q_oc, 0


def emit(model: ir.Model, layers: list[Layer], weights: dict[str, WeightQuant],
         acts: dict[str, ActQuant], *, int4: bool) -> None:
    graph = model.graph
    names = UniqueNames(graph)
    values = {v.name: v for n in graph for v in n.outputs} | {v.name: v for v in graph.inputs}
    for value_name, aq in through_data_movement(values, acts).items():
        insert_act_qdq(graph, names, values[value_name], aq)
    for layer in layers:
        wq = weights.get(layer.name)
        if wq is None:
            continue
        form = weight_form(layer)
        if form == "integer":
            _weight_dq(graph, names, layer, wq, int4, cast=True)
        elif form == "dequantized":
            _weight_dq(graph, names, layer, wq, int4, cast=False)
        else:
            _weight_folded(graph, names, layer, wq, int4)
        x = layer.node.inputs[0]
        p = x.producer()
        if layer.bias is not None and p is not None and p.op_type == "DequantizeLinear" and \
                layer.op in ("Conv", "Gemm") and wq.bits <= 8 and (form == "integer" or not (wq.bits <= 4 and int4)):
            s_x = float(const_array(p.inputs[1]))
            _bias_dq(graph, names, layer, wq.scale.astype(np.float64) * s_x)
    remove_unused(model)
    ir.passes.common.TopologicalSortPass()(model)


def weight_form(layer: Layer) -> str:
    """How the layer's quantized weight is written, its activations already QDQ:

    * ``"integer"``: onnxruntime's CPU fuses the layer into an integer kernel (QLinearConv,
      QGemm, QLinearMatMul, MatMulIntegerToFloat) once its weight comes from an 8-bit
      DequantizeLinear: the input comes from an 8-bit DequantizeLinear and, for a Conv,
      the output reaches an 8-bit QuantizeLinear (QLinearConv has no float output);
    * ``"dequantized"``: no integer kernel, but onnxruntime would requantize a float
      weight (per tensor, to 8 bits: other values) because the input is dequantized and
      the output quantized: the weight stays behind its DequantizeLinear, exact;
    * ``"folded"``: everything else (weight-only, ConvTranspose, a Conv whose output is
      not requantized): ``Cast → Mul``, folded into a float weight at load.
    """
    q = _path_to_quantize(layer.node)
    if layer.op in ("Gemm", "MatMul") or layer.op == "Conv" and q is not None and _zero_point_dtype(q) in _EIGHT_BIT:
        if _dequantized_8bit(layer.node.inputs[0]):
            return "integer"
    p = layer.node.inputs[0].producer()
    if layer.op in ("Conv", "ConvTranspose", "Gemm") and p is not None and p.op_type == "DequantizeLinear" \
            and q is not None:
        return "dequantized"
    return "folded"


def _path_to_quantize(node: ir.Node) -> ir.Node | None:
    """The QuantizeLinear the node's output reaches without branching, through Relu / Clip."""
    out = node.outputs[0]
    while not out.is_graph_output():
        uses = list(out.uses())
        if len(uses) != 1 or uses[0].idx != 0:
            return None
        nxt = uses[0].node
        if nxt.op_type == "QuantizeLinear" and nxt.domain in ("", "ai.onnx"):
            return nxt
        if nxt.op_type not in ("Relu", "Clip") or nxt.domain not in ("", "ai.onnx"):
            return None
        out = nxt.outputs[0]
    return None


_EIGHT_BIT = (ir.DataType.INT8, ir.DataType.UINT8)


def _dequantized_8bit(value: ir.Value) -> bool:
    p = value.producer()
    return p is not None and p.op_type == "DequantizeLinear" and _zero_point_dtype(p) in _EIGHT_BIT


def _zero_point_dtype(node: ir.Node) -> ir.DataType | None:
    """The integer type of a QuantizeLinear / DequantizeLinear (its zero point's)."""
    z = node.inputs[2] if len(node.inputs) > 2 else None
    if z is None or node.domain not in ("", "ai.onnx"):
        return None
    return z.dtype if z.dtype is not None else (z.const_value.dtype if z.const_value is not None else None)


def stores_quantized_weights(graph: ir.Graph) -> bool:
    """Whether the graph keeps weights as integers: an integer initializer read by a
    DequantizeLinear or a Cast (the forms :func:`emit` writes)."""
    for node in graph:
        x = node.inputs[0] if node.inputs else None
        if node.op_type in ("DequantizeLinear", "Cast") and node.domain in ("", "ai.onnx") and x is not None and \
                x.is_initializer() and x.const_value is not None and x.const_value.dtype in STORED_INTEGERS:
            return True
    return False


def remove_unused(model: ir.Model) -> None:
    """Drop nodes and initializers nothing reads (BN parameters after folding, old weights)."""
    ir.passes.common.RemoveUnusedNodesPass()(model)
    graph = model.graph
    for name, value in list(graph.initializers.items()):
        if not list(value.uses()) and not value.is_graph_output():
            del graph.initializers[name]


def _weight_dq(graph, names, layer: Layer, wq: WeightQuant, int4: bool, *, cast: bool) -> None:
    """The weight through DequantizeLinear; ``cast``: INT4 storage cast to INT8 in front of it."""
    np_dt, ir_dt = _int_dtype(wq.bits, True, int4)
    q, axis = _weight_layout(layer, wq.q)
    base = layer.weight.name
    q_val = add_initializer(graph, f"{base}_quantized", q.astype(np_dt), ir_dt, names=names)
    s_val = add_initializer(graph, f"{base}_scale", wq.scale.astype(np.float32), names=names)
    if cast and ir_dt != ir.DataType.INT8:
        q_val = _cast(graph, names, layer, q_val, ir.DataType.INT8, f"{base}_int8")
        np_dt, ir_dt = np.int8, ir.DataType.INT8
    z_val = add_initializer(graph, f"{base}_zero_point", np.zeros(len(wq.scale), dtype=np_dt), ir_dt, names=names)
    _dequantized_input(graph, names, layer, 1, (q_val, s_val, z_val), axis, "weight")


def _weight_folded(graph, names, layer: Layer, wq: WeightQuant, int4: bool) -> None:
    """The weight as ``Cast(to=FLOAT) → Mul(scale)``: DequantizeLinear's values, folded at load."""
    np_dt, ir_dt = _int_dtype(wq.bits, True, int4)
    q, axis = _weight_layout(layer, wq.q)
    base = layer.weight.name
    q_val = add_initializer(graph, f"{base}_quantized", q.astype(np_dt), ir_dt, names=names)
    shape = [1] * q.ndim
    shape[axis] = len(wq.scale)
    s_val = add_initializer(graph, f"{base}_scale", wq.scale.astype(np.float32).reshape(shape), names=names)
    w_int = _cast(graph, names, layer, q_val, ir.DataType.FLOAT, f"{base}_float")
    old = layer.node.inputs[1]
    out = ir.Value(name=names(f"{old.name}_dequantized"))
    mul = ir.Node("", "Mul", [w_int, s_val], outputs=[out], name=names(f"{layer.name}_weight_Mul"))
    graph.insert_before(layer.node, mul)
    layer.node.replace_input_with(1, out)
    if not list(old.uses()) and old.name in graph.initializers:
        del graph.initializers[old.name]


def _cast(graph, names, layer: Layer, value: ir.Value, to: ir.DataType, name: str) -> ir.Value:
    """``Cast(value, to)`` inserted before the layer."""
    out = ir.Value(name=names(name))
    cast = ir.Node("", "Cast", [value], attributes=[ir.AttrInt64("to", int(to))], outputs=[out],
                   name=names(f"{layer.name}_weight_Cast"))
    graph.insert_before(layer.node, cast)
    return out


def _bias_dq(graph, names, layer: Layer, scale: np.ndarray) -> None:
    b = const_array(layer.bias).astype(np.float64)
    scale = np.where(scale > 0, scale, 1e-12)
    q = np.clip(np.round(b / scale), -(2 ** 31), 2 ** 31 - 1).astype(np.int32)
    base = layer.bias.name
    q_val = add_initializer(graph, f"{base}_quantized", q, names=names)
    s_val = add_initializer(graph, f"{base}_scale", scale.astype(np.float32), names=names)
    z_val = add_initializer(graph, f"{base}_zero_point", np.zeros(len(q), dtype=np.int32), names=names)
    _dequantized_input(graph, names, layer, 2, (q_val, s_val, z_val), 0, "bias")


def _dequantized_input(graph, names, layer: Layer, index: int, qsz: tuple, axis: int, what: str) -> None:
    """Feed input ``index`` of the layer from ``DequantizeLinear(q, scale, zero point)``; drop the float one."""
    old = layer.node.inputs[index]
    out = ir.Value(name=names(f"{old.name}_dequantized"))
    dq = ir.Node("", "DequantizeLinear", list(qsz), attributes=[ir.AttrInt64("axis", axis)],
                 outputs=[out], name=names(f"{layer.name}_{what}_DequantizeLinear"))
    graph.insert_before(layer.node, dq)
    layer.node.replace_input_with(index, out)
    if not list(old.uses()) and old.name in graph.initializers:
        del graph.initializers[old.name]


def act_container(aq: ActQuant) -> tuple[int, tuple[int, int] | None]:
    """The zero point of ``aq`` in the uint8 its QuantizeLinear writes (a signed grid's
    moved up by 128, a narrower signed grid's by half its size), and the grid's bounds in
    it where narrower than 8 bits: a b-bit grid always lies in 0..2^b-1, so an input of 7
    bits or fewer cannot saturate the pair sums of x86 kernels without VNNI with +-127
    weights (``quant.kernel_bits``).

    Narrower activations get a ``Clip`` in the integer domain between the QuantizeLinear
    and the DequantizeLinear: onnxruntime fuses ``DQ → Conv → Q`` around it into its
    8-bit integer kernels (it has none for 4-bit activations), and the values are exactly
    the b-bit grid's."""
    shift = 2 ** (min(aq.bits, 8) - 1) if aq.signed else 0
    if aq.bits >= 8:
        return aq.zero_point + shift, None
    lo, hi = act_range_grid(aq.bits, aq.signed)
    return aq.zero_point + shift, (lo + shift, hi + shift)


def insert_act_qdq(graph, names, value: ir.Value, aq: ActQuant, only: list[ir.Node] | None = None) -> ir.Value:
    """``QuantizeLinear → [Clip] → DequantizeLinear`` after ``value``, feeding all its
    current uses, or those of the nodes ``only`` (:func:`act_container`); returns the
    dequantized value."""
    uses = [u for u in value.uses() if only is None or any(u.node is n for n in only)]
    zero_point, bounds = act_container(aq)
    np_dt, ir_dt = np.uint8, ir.DataType.UINT8
    s_val = add_initializer(graph, f"{value.name}_scale", np.array(aq.scale, dtype=np.float32), names=names)
    z_val = add_initializer(graph, f"{value.name}_zero_point", np.array(zero_point).astype(np_dt), ir_dt, names=names)
    q_out = ir.Value(name=names(f"{value.name}_quantized"))
    source = _unclipped(value, aq) if bounds is not None and only is None else value
    nodes = [ir.Node("", "QuantizeLinear", [source, s_val, z_val], outputs=[q_out],
                     name=names(f"{value.name}_QuantizeLinear"))]
    if bounds is not None:
        lo = add_initializer(graph, f"{value.name}_grid_min", np.array(bounds[0], np_dt), ir_dt, names=names)
        hi = add_initializer(graph, f"{value.name}_grid_max", np.array(bounds[1], np_dt), ir_dt, names=names)
        clipped = ir.Value(name=names(f"{value.name}_quantized{aq.bits}"))
        nodes.append(ir.Node("", "Clip", [q_out, lo, hi], outputs=[clipped],
                             name=names(f"{value.name}_Clip{aq.bits}")))
        q_out = clipped
    dq_out = ir.Value(name=names(f"{value.name}_dequantized"), shape=value.shape, type=value.type)
    nodes.append(ir.Node("", "DequantizeLinear", [q_out, s_val, z_val], outputs=[dq_out],
                         name=names(f"{value.name}_DequantizeLinear")))
    producer = value.producer()
    if producer is None:
        graph.insert_before(graph.node(0), nodes)
    else:
        graph.insert_after(producer, nodes)
    for u in uses:
        u.node.replace_input_with(u.idx, dq_out)
    if source is not value:                    # the redundant Clip goes: the layer before reaches the Q,
        graph.remove(producer, safe=True)      # its output under the name the tensor had
        name, value.name = value.name, None
        source.name = name
    return dq_out


def _unclipped(value: ir.Value, aq: ActQuant) -> ir.Value:
    """The input of the float ``Clip`` (ReLU6, ...) producing ``value`` where the grid's own
    clip makes it redundant, else ``value``.

    Rounding maps every input beyond ``(hi - z - 1/2)·s`` to ``hi`` as it maps the Clip's
    bound, so the Clip changes nothing when it reaches that far on both sides.  onnxruntime
    removes such a Clip before an 8-bit QuantizeLinear itself (and then fuses the layer
    before it); it cannot see the narrower grid's clip behind the QuantizeLinear."""
    p = value.producer()
    if p is None or p.op_type != "Clip" or p.domain not in ("", "ai.onnx") or value.is_graph_output():
        return value
    src = p.inputs[0]
    if src is None or src.is_graph_output() or len(list(src.uses())) != 1:
        return value
    if any(v is not None and const_array(v) is None for v in p.inputs[1:3]):
        return value                             # a bound computed at run time
    low, high = clip_bounds(p)                   # ±inf where the Clip has none
    lo, hi = act_range_grid(aq.bits, aq.signed)
    z = aq.zero_point
    if low > (lo - z + 0.5) * aq.scale or high < (hi - z - 0.5) * aq.scale:
        return value
    return src
