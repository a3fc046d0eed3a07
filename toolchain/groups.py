"""Prune groups: the channels of one layer's output followed forward to every consumer.

A group is the set of places one producer's output channels reach (convolutions,
normalisations, element-wise ops with per-channel constants, Concat offsets, Flatten
strides) until a layer consumes them, or the reason they cannot be removed on their
own (a residual Add ties them to another tensor, the graph output reads them, an op
mixes channels).  :func:`build_groups` finds them for :func:`graph.analyse`.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import onnx_ir as ir

from .graph import BINARY, SPATIAL_OPS, UNARY_ACTS, Layer, attr, const_array, static_shape


# --------------------------------------------------------------------------- groups
@dataclass
class Consumer:
    """A layer reading the group's channels: input feature = offset + channel*stride + k, k < stride."""

    layer: Layer
    stride: int = 1           # features per channel after a Flatten (spatial positions)


@dataclass
class PruneGroup:
    producer: Layer
    members: list[ir.Node] = field(default_factory=list)       # passthrough nodes to slice
    depthwise: list[Layer] = field(default_factory=list)       # depthwise layers carried along
    gates: list[Layer] = field(default_factory=list)           # layers making a per-channel gate of the
                                                               # channels from the channels (an SE block's
                                                               # last conv): their outputs carried along
    consumers: list[Consumer] = field(default_factory=list)
    reason: str | None = None                                  # why it cannot be pruned

    @property
    def name(self) -> str:
        return self.producer.name

    @property
    def carried(self) -> list[Layer]:
        """Layers whose output channels go with the producer's: depthwise convs and gates."""
        return self.depthwise + self.gates

    @property
    def prunable(self) -> bool:
        return self.reason is None

    @property
    def channels(self) -> int:
        return self.producer.out_channels


def build_groups(model: ir.Model, layers: list[Layer]) -> list[PruneGroup]:
    by_node = {id(l.node): l for l in layers}
    groups = []
    for layer in layers:
        if layer.kind in ("depthwise",):
            continue  # carried by the group of the layer before it
        g = PruneGroup(producer=layer)
        if layer.kind == "grouped":
            g.reason = "grouped convolution: channels are tied to groups"
        elif layer.kind == "convtranspose" and layer.groups != 1:
            g.reason = "grouped transposed convolution"
        else:
            _walk(g, layer, by_node)
        if g.reason is None and not g.consumers:
            g.reason = "no layer reads these channels"
        groups.append(g)
    gated = {id(gate.node): g for g in groups if g.prunable for gate in g.gates}
    for g in groups:
        if not g.prunable and id(g.producer.node) in gated:
            g.reason = f"a channel gate: pruned with the channels it gates ({gated[id(g.producer.node)].name!r})"
    return groups


def _walk(group: PruneGroup, producer: Layer, by_node: dict[int, Layer]) -> None:
    C = producer.out_channels
    own = [producer.node] + ([producer.bn] if producer.bn else []) + producer.act
    frontier: list[tuple[ir.Value, int]] = [(producer.output, 1)]
    seen: set[int] = {id(n) for n in own}
    tracked: set[int] = {id(producer.output)} | {id(n.outputs[0]) for n in own}
    while frontier:
        value, stride = frontier.pop()
        if value.is_graph_output():
            group.reason = f"channels reach the graph output {value.name!r}"
            return
        for use in list(value.uses()):
            node = use.node
            if id(node) in seen:
                continue
            why = _step(group, node, use.idx, value, stride, C, by_node, tracked, frontier)
            if why:
                group.reason = why
                return
            seen.add(id(node))


def _step(group, node, idx, value, stride, C, by_node, tracked, frontier) -> str | None:
    op = node.op_type
    where = f"{op} {node.name!r}"
    layer = by_node.get(id(node))
    if node.domain not in ("", "ai.onnx"):
        return f"channels feed custom op {where}"
    if layer is not None and idx == 0 and _channels_last(group) and layer.kind not in ("gemm", "matmul"):
        return f"channels (last axis) feed {layer.kind} layer {where}"
    if layer is not None and idx == 0:
        if layer.kind == "depthwise" and stride == 1 and layer.out_channels == C:
            group.depthwise.append(layer)
            for n in ([layer.bn] if layer.bn else []) + layer.act:
                tracked.add(id(n.outputs[0]))
            tracked.add(id(layer.node.outputs[0]))
            frontier.append((layer.output, 1))
            return None
        if layer.kind in ("conv", "convtranspose") and layer.groups == 1 and stride == 1:
            group.consumers.append(Consumer(layer, 1))
            return None
        if layer.kind in ("gemm", "matmul"):
            if layer.in_channels != C * stride:
                return f"{where} reads {layer.in_channels} features, not {C}x{stride}"
            group.consumers.append(Consumer(layer, stride))
            return None
        return f"channels feed {layer.kind} layer {where}"
    if op == "BatchNormalization" and _channels_last(group):
        return f"channels (last axis) feed {where}, which normalises axis 1"
    if op == "BatchNormalization" and idx == 0 and all(const_array(x) is not None for x in node.inputs[1:5]):
        group.members.append(node)
        return _follow(node, stride, tracked, frontier)
    if op in UNARY_ACTS and idx == 0:
        if op == "PRelu":
            return _const_operand(group, node, 1, C, stride, tracked, frontier)
        return _follow(node, stride, tracked, frontier)
    if op in BINARY:
        other_idx = 1 - idx
        other = node.inputs[other_idx]
        if id(other) in tracked or _derived_from(other, tracked):  # y * f(y): SiLU, Mish, GELU
            return _follow(node, stride, tracked, frontier)
        if const_array(other) is not None:
            return _const_operand(group, node, other_idx, C, stride, tracked, frontier)
        found = _gate_of(other, C, by_node, tracked) if op == "Mul" and stride == 1 else None
        if found is not None:                     # y * gate(pool(y)): a squeeze-and-excitation block
            gate, per_channel = found
            if gate not in group.gates:
                group.gates.append(gate)
                group.members.extend(n for n in per_channel if n not in group.members)
            return _follow(node, stride, tracked, frontier)
        return f"channels meet another tensor in {where} (residual: channels tied across layers)"
    if _channels_last(group):
        return f"channels (last axis) feed {where}"
    if stride == 1 and op in SPATIAL_OPS and idx == 0:
        return _follow(node, stride, tracked, frontier)
    if stride == 1 and op in ("ReduceMean", "ReduceMax", "ReduceSum") and idx == 0:
        axes = _reduce_axes(node)
        if axes is not None and 1 not in axes and all(a >= 2 for a in axes):
            return _follow(node, stride, tracked, frontier)
        return f"{where} reduces over channels"
    if op == "Pad" and idx == 0:
        pads = const_array(node.inputs[1]) if len(node.inputs) > 1 else None
        if pads is not None and len(pads) >= 4 and pads[1] == 0 and pads[len(pads) // 2 + 1] == 0:
            return _follow(node, stride, tracked, frontier)
        return f"{where} pads channels"
    if op in ("Flatten", "Reshape", "Squeeze") and idx == 0:
        return _flatten(group, node, value, stride, C, tracked, frontier)
    return f"channels feed {where}"


def _through_elementwise(value: ir.Value, C: int | None = None, depth: int = 8) -> tuple[ir.Node | None, list]:
    """The first node up from ``value`` that is not elementwise with constants (an
    activation, x * 0.2 + 0.5, Clip, a bias added per channel): the layer or pool it comes
    from, and the nodes passed whose constants hold one value per channel.  With ``C``,
    such a constant must hold ``C`` values (else the node is returned as the stop)."""
    per_channel = []
    for _ in range(depth):
        p = value.producer()
        if p is None or p.domain not in ("", "ai.onnx"):
            return None, []
        live = [v for v in p.inputs if v is not None and const_array(v) is None]
        consts = [const_array(v) for v in p.inputs if v is not None and const_array(v) is not None]
        if p.op_type not in UNARY_ACTS and p.op_type not in BINARY or len(live) != 1:
            return p, per_channel
        wide = [c for c in consts if c.size != 1]
        if wide:
            if p.op_type not in BINARY or any(sum(d != 1 for d in c.shape) != 1 or
                                              (C is not None and c.size != C) for c in wide):
                return p, per_channel
            per_channel.append(p)
        value = live[0]
    return None, []


def _gate_of(value: ir.Value, C: int, by_node: dict[int, Layer],
             tracked: set[int]) -> tuple[Layer, list] | None:
    """The layer making ``value`` as a squeeze-and-excitation gate of the tracked channels
    (pool(y) → conv → activation → conv (this layer, C outputs) → activation), and the
    nodes after it with per-channel constants (a bias added apart): its output channels are
    the group's, so they go with them; the first conv reads the group's channels (pooled)
    and is one of its consumers.  None when ``value`` is anything else."""
    end, per_channel = _through_elementwise(value, C)
    expand = by_node.get(id(end))
    if expand is None or expand.kind != "conv" or expand.groups != 1 or expand.out_channels != C:
        return None
    end, _ = _through_elementwise(expand.node.inputs[0])
    reduce = by_node.get(id(end))
    if reduce is None or reduce.kind != "conv" or reduce.groups != 1 or reduce.in_channels != C:
        return None
    pool = reduce.node.inputs[0].producer()
    if pool is None or pool.op_type not in ("GlobalAveragePool", "ReduceMean") or id(pool.inputs[0]) not in tracked:
        return None
    axes = _reduce_axes(pool) if pool.op_type == "ReduceMean" else None
    if pool.op_type == "ReduceMean" and (axes is None or 1 in axes):
        return None
    return expand, [n for n in per_channel if n not in (expand.bn, *expand.act)]


def _derived_from(value: ir.Value, tracked: set[int], depth: int = 8) -> bool:
    """Is ``value`` an elementwise function of a tracked value alone (e.g. tanh(softplus(y)))?"""
    for _ in range(depth):
        if id(value) in tracked:
            return True
        p = value.producer()
        if p is None or p.domain not in ("", "ai.onnx"):
            return False
        live = [v for v in p.inputs if v is not None and const_array(v) is None]
        consts = [v for v in p.inputs if v is not None and const_array(v) is not None]
        if len(live) != 1 or any(const_array(c).size != 1 for c in consts):
            return False
        if p.op_type not in UNARY_ACTS and p.op_type not in BINARY and \
                p.op_type not in ("Softplus", "Tanh", "Sqrt", "Reciprocal"):
            return False
        value = live[0]
    return False


def _follow(node, stride, tracked, frontier) -> None:
    out = node.outputs[0]
    tracked.add(id(out))
    frontier.append((out, stride))
    return None


def _channels_last(group: PruneGroup) -> bool:
    """A MatMul producer with a rank >= 3 output keeps its channels on the last axis
    ([N, tokens, C]), where the rules for [N, C, ...] do not hold."""
    if group.producer.kind != "matmul":
        return False
    shape = static_shape(group.producer.node.outputs[0])
    return shape is not None and len(shape) >= 3


def _const_operand(group, node, other_idx, C, stride, tracked, frontier):
    arr = const_array(node.inputs[other_idx])
    if arr.size == 1:
        return _follow(node, stride, tracked, frontier)
    if _channels_last(group):
        if arr.shape[-1] == C and sum(d != 1 for d in arr.shape) == 1:
            group.members.append(node)
            return _follow(node, stride, tracked, frontier)
        if arr.shape[-1] == 1:
            return _follow(node, stride, tracked, frontier)
        return f"constant operand of {node.op_type} {node.name!r} does not broadcast per channel"
    if stride == 1 and arr.ndim >= 1:
        out_rank = len(static_shape(node.outputs[0]) or ())
        # channel axis is 1 of the output (rank >= 2); a constant of rank r aligns to the right
        ax = arr.ndim - (out_rank - 1) if out_rank else None
        if ax is not None and 0 <= ax < arr.ndim and arr.shape[ax] == C and \
                sum(d != 1 for d in arr.shape) == 1:
            group.members.append(node)
            return _follow(node, stride, tracked, frontier)
        if ax is not None and 0 <= ax < arr.ndim and arr.shape[ax] == 1:
            return _follow(node, stride, tracked, frontier)
    if stride > 1 or (static_shape(node.outputs[0]) and len(static_shape(node.outputs[0])) == 2):
        if arr.ndim >= 1 and arr.shape[-1] == C * stride and sum(d != 1 for d in arr.shape) == 1:
            group.members.append(node)
            return _follow(node, stride, tracked, frontier)
    return f"constant operand of {node.op_type} {node.name!r} does not broadcast per channel"


def _reduce_axes(node: ir.Node) -> list[int] | None:
    axes = attr(node, "axes")
    if axes is None and len(node.inputs) > 1 and node.inputs[1] is not None:
        a = const_array(node.inputs[1])
        axes = None if a is None else a.tolist()
    if axes is None:
        return None
    rank = len(static_shape(node.inputs[0]) or ())
    return [a + rank if a < 0 else a for a in axes] if rank else list(axes)


def _flatten(group, node, value, stride, C, tracked, frontier) -> str | None:
    shape = static_shape(value)
    out = static_shape(node.outputs[0])
    if shape is None or out is None or len(out) != 2:
        return f"{node.op_type} {node.name!r} with unknown shapes"
    if node.op_type == "Flatten" and int(attr(node, "axis", 1)) != 1:
        return f"Flatten {node.name!r} not at axis 1"
    if len(shape) < 2 or shape[1] != C or any(d is None for d in shape[2:]):
        return f"{node.op_type} {node.name!r} input is not [N, C, ...] with static spatial size"
    spatial = int(np.prod(shape[2:])) if len(shape) > 2 else 1
    if out[1] is not None and out[1] != C * spatial:
        return f"{node.op_type} {node.name!r} does not flatten [N, C, ...] to [N, C*...]"
    if node.op_type == "Reshape":
        group.members.append(node)  # its target shape names the feature count
    tracked.add(id(node.outputs[0]))
    frontier.append((node.outputs[0], stride * spatial))
    return None
