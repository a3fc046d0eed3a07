"""Dynamic precision, one configuration in the form onnxruntime runs on integer kernels.

A configuration (bits per group) is written as the static path writes a quantized
model (:func:`..qdq.emit`): each dynamic layer's input quantized at its group's bits
with the plan's range for those bits (narrower than 8 bits: uint8 with a Clip to the
grid), its weights dequantized per output channel, its bias in INT32 at ``s_x·s_w``;
and, so onnxruntime can fuse ``DQ → Conv → Q`` into its 8-bit kernels, the output of
every such layer that feeds something else (a residual Add) requantized at 8 bits
(ranges measured in :func:`.plan.make_plan`).

Every configuration reads the same stored integers: a layer's weights at ``b`` bits
are ``Cast(int8, Clip(Round(Cast(w_int)·w_scale / s_b)))`` of the one INT8 tensor
(:func:`datafree.ops.reference.derive_weight`, the same operations in the same order),
a constant subgraph onnxruntime folds at load before it fuses the layer; at the top
bit-width the weights are the stored integers themselves.  A cascade's two passes
thus share their weights, as the function bodies of the upfront mode do.
"""

from __future__ import annotations

import numpy as np
import onnx
import onnx_ir as ir

from datafree.ops import reference

from ...graph import UniqueNames, add_initializer, analyse
from .. import qdq
from ..quantize import WeightQuant
from ..shortcut import ShortcutAsConvPass
from .plan import DynLayer, Plan


def weight_ints(layer: DynLayer, bits: int) -> np.ndarray:
    """The layer's integers at ``bits`` (output channels first), as ``derive_weight`` makes them."""
    shape = (-1,) + (1,) * (layer.w_int.ndim - 1)
    w = layer.w_int.astype(np.float32) * layer.w_scale.astype(np.float32).reshape(shape)
    q = np.round(w / layer.scale_table[bits].astype(np.float32).reshape(shape))
    qmax = reference.weight_qmax(bits)
    return np.clip(q, -qmax, qmax).astype(np.int8)


def layer_bits(plan: Plan, config) -> dict[str, int]:
    """Bits of every dynamic layer at ``config`` (the stem at the highest candidate)."""
    out = {plan.stem.name: plan.max_bits}
    out.update({l.name: int(np.asarray(config).ravel()[l.group]) for l in plan.layers})
    return out


def write_config(model: ir.Model, plan: Plan, config) -> tuple[dict[str, int], set[str]]:
    """Quantize ``model`` (a copy of ``plan.base``) in place at ``config``; returns each
    layer's bits and the names of the stored integers every weight is derived from
    (``<layer>/w_int``: two configurations written alike name them alike, and a model
    holding both passes keeps one copy)."""
    biases = plan.biases_for(config)
    bits = layer_bits(plan, config)
    dyn = {l.name: l for l in [plan.stem] + plan.layers}
    layers = [l for l in analyse(model).layers if l.name in dyn]
    weights = {}
    for layer in layers:
        d, b = dyn[layer.name], bits[layer.name]
        if layer.name in biases:
            layer.set_bias(biases[layer.name])
        weights[layer.name] = WeightQuant(bits=b, q=weight_ints(d, b), scale=d.scale_table[b].astype(np.float32))
    _quantize_inputs(model, layers, dyn, bits, plan.out_acts)
    qdq.emit(model, layers, weights, {}, int4=False)
    ShortcutAsConvPass()(model)            # zero-padded shortcuts: 8-bit selection convs, as the static path
    return bits, _share_weights(model, layers, dyn, bits, weights)


def config_model(plan: Plan, config) -> tuple[ir.Model, dict[str, int], set[str]]:
    """:func:`write_config` on a copy of ``plan.base``, in graph order."""
    model = ir.serde.deserialize_model(plan.base)
    bits, stored = write_config(model, plan, config)
    ir.passes.common.TopologicalSortPass()(model)
    return model, bits, stored


def _quantize_inputs(model: ir.Model, layers, dyn: dict[str, DynLayer], bits: dict[str, int],
                     out_acts: dict) -> None:
    """Each layer's input quantized at its bits for that layer alone, after an 8-bit
    quantization of every layer input or output that something else also reads (a
    residual stream and its Add, as the static path writes them): onnxruntime then fuses
    the layer producing it and the Add into integer kernels, while the residual stream
    keeps 8 bits whatever the bits of the layers reading it."""
    graph = model.graph
    names = UniqueNames(graph)
    readers: dict[str, dict[int, list[ir.Node]]] = {}
    for layer in layers:
        readers.setdefault(layer.node.inputs[0].name, {}).setdefault(bits[layer.name], []).append(layer.node)
    values = {l.output.name: l.output for l in layers} | {l.node.inputs[0].name: l.node.inputs[0] for l in layers}
    eight = {}
    for name, value in values.items():
        if value.is_graph_output() or value.is_graph_input() or name not in out_acts:
            continue
        by_bits = readers.get(name, {})
        mine = [n for nodes in by_bits.values() for n in nodes]
        if len(by_bits) > 1 or any(not any(u.node is n for n in mine) for u in value.uses()):
            scale, zero_point, signed = out_acts[name]
            eight[name] = qdq.ActQuant(8, float(scale), int(zero_point), bool(signed))
    every = {v.name: v for n in graph for v in n.outputs} | {v.name: v for v in graph.inputs}
    for name, aq in qdq.through_data_movement(every, eight).items():   # a shortcut's Slice, a pool
        qdq.insert_act_qdq(graph, names, every[name], aq)
    for by_bits in readers.values():
        for b, nodes in by_bits.items():
            a = dyn[nodes[0].name].act
            qdq.insert_act_qdq(graph, names, nodes[0].inputs[0],
                               qdq.ActQuant(b, float(a.scale[b]), int(a.zero_point[b]), bool(a.signed)), only=nodes)


def _share_weights(model: ir.Model, layers, dyn: dict[str, DynLayer], bits: dict[str, int],
                   weights: dict[str, WeightQuant]) -> set[str]:
    """Each layer's DequantizeLinear reads integers derived from the stored ones; returns
    the stored integers' names."""
    graph = model.graph
    names = UniqueNames(graph)
    stored = set()
    for layer in layers:
        d, b = dyn[layer.name], bits[layer.name]
        reader = layer.node.inputs[1].producer()      # DequantizeLinear, or Mul(Cast(q), scale) (qdq.weight_form)
        if reader.op_type == "Mul":
            reader = reader.inputs[0].producer()
        own = reader.inputs[0]
        w_layout, axis = qdq._weight_layout(layer, d.w_int)
        w_int = add_initializer(graph, f"{layer.name}/w_int", np.ascontiguousarray(w_layout), ir.DataType.INT8,
                                names=names)
        stored.add(w_int.name)
        if np.array_equal(weights[layer.name].q, d.w_int):            # the top bit-width
            reader.replace_input_with(0, w_int)
        else:
            reader.replace_input_with(0, _derived(graph, names, reader, w_int, d, b, axis))
        if not list(own.uses()) and own.name in graph.initializers:
            del graph.initializers[own.name]
    return stored


def _derived(graph, names, before: ir.Node, w_int: ir.Value, d: DynLayer, bits: int, axis: int) -> ir.Value:
    """``Cast(int8, Clip(Round(Cast(w_int)·w_scale / s_b)))`` inserted before ``before``."""
    rank = d.w_int.ndim
    shape = [1] * rank
    shape[axis] = -1
    p = f"{before.name}/w{bits}"
    col = lambda name, v: add_initializer(graph, f"{p}/{name}", np.asarray(v, np.float32).reshape(shape),  # noqa: E731
                                          names=names)
    qmax = reference.weight_qmax(bits)
    steps = [("Cast", [w_int], {"to": int(ir.DataType.FLOAT)}),
             ("Mul", [None, col("w_scale", d.w_scale)], {}),
             ("Div", [None, col("scale", d.scale_table[bits])], {}),
             ("Round", [None], {}),
             ("Clip", [None, add_initializer(graph, f"{p}/qmin", np.float32(-qmax), names=names),
                       add_initializer(graph, f"{p}/qmax", np.float32(qmax), names=names)], {}),
             ("Cast", [None], {"to": int(ir.DataType.INT8)})]
    value = None
    for op, ins, attrs in steps:
        ins = [value if v is None else v for v in ins]
        out = ir.Value(name=names(f"{p}/{op.lower()}"))
        node = ir.Node("", op, ins, attributes=[ir.AttrInt64(k, v) for k, v in attrs.items()], outputs=[out],
                       name=names(f"{p}/{op}"))
        graph.insert_before(before, node)
        value = out
    return value


def build_fixed(plan: Plan, config, extra_outputs: list[str] = ()) -> onnx.ModelProto:
    """The fixed-precision model of one configuration (bit-width per group), standard ops
    only: in the integer-kernel form, or fake-quantized in float where the plan says so
    (the upfront model's layers, which its function bodies run that way)."""
    if not plan.integer:
        from .writing import fake_quant_fixed

        return fake_quant_fixed(plan, config, extra_outputs)
    return with_outputs(config_model(plan, config)[0], extra_outputs)


def with_outputs(model: ir.Model, names: list[str] = ()) -> onnx.ModelProto:
    """``model`` serialized, with the values ``names`` as extra outputs (their shapes
    left open: they are read at whatever batch the session runs)."""
    values = {v.name: v for n in model.graph.all_nodes() for v in n.outputs}
    for name in names:
        values[name].shape = None
        model.graph.outputs.append(values[name])
    return ir.serde.serialize_model(model)
