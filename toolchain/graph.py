"""Graph analysis: which layers can be compressed, and which channels move together.

A *layer* is a Conv / ConvTranspose / Gemm / MatMul with a constant weight, with the
BatchNormalization and elementwise activation that directly follow it.  A *prune
group* is one layer's output channels followed forward through every op that keeps
channels apart (BN, activations, depthwise convs, pools, Flatten) to the layers that
read them (their input channels).  Removing channel ``c`` of a group removes it from
every member.  Where the walk meets something that ties channels together (a
residual Add, Concat, a graph output, an op we do not know) the group is not
prunable and carries the reason, which the user sees in the summary.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import onnx_ir as ir

from datafree.runtime.model_file import is_selection_weight

LAYER_OPS = ("Conv", "ConvTranspose", "Gemm", "MatMul")
# elementwise, one input, channelwise: channels stay apart
UNARY_ACTS = {"Relu", "Clip", "LeakyRelu", "Sigmoid", "HardSigmoid", "HardSwish", "Tanh", "Elu",
              "Selu", "Softplus", "Softsign", "Gelu", "Mish", "PRelu", "ThresholdedRelu", "Celu",
              "Erf", "Neg", "Abs", "Exp", "Swish"}
SPATIAL_OPS = {"MaxPool", "AveragePool", "GlobalAveragePool", "GlobalMaxPool", "LpPool",
               "GlobalLpPool", "Resize", "Upsample", "DepthToSpace"} - {"DepthToSpace"}
BINARY = {"Add", "Mul", "Sub", "Div", "Max", "Min", "Pow"}


def const_array(value: ir.Value | None) -> np.ndarray | None:
    if value is None or value.const_value is None:
        return None
    return value.const_value.numpy()


def set_const(value: ir.Value, array: np.ndarray) -> None:
    """Replace a constant's data (shape may change), keeping its name and dtype."""
    array = np.ascontiguousarray(array)
    value.const_value = ir.tensor(array, name=value.name)
    value.shape = ir.Shape(array.shape)
    value.dtype = ir.DataType.from_numpy(array.dtype)


def attr(node: ir.Node, name: str, default=None):
    a = node.attributes.get(name)
    return default if a is None else a.value


def single_consumer(value: ir.Value) -> ir.Node | None:
    uses = list(value.uses())
    if len(uses) == 1 and not value.is_graph_output():
        return uses[0].node
    return None


def static_shape(value: ir.Value | None) -> tuple[int | None, ...] | None:
    if value is None or value.shape is None:
        return None
    return tuple(d if isinstance(d, int) else None for d in value.shape)


@dataclass
class Layer:
    """A compressible linear layer and the BN / activation right after it."""

    node: ir.Node
    kind: str                       # conv | depthwise | grouped | convtranspose | gemm | matmul
    weight: ir.Value
    bias: ir.Value | None
    bn: ir.Node | None = None
    act: list[ir.Node] = field(default_factory=list)
    act_type: str | None = None

    @property
    def name(self) -> str:
        return self.node.name

    @property
    def op(self) -> str:
        return self.node.op_type

    @property
    def output(self) -> ir.Value:
        """The value after the layer's own BN and activation."""
        if self.act:
            return self.act[-1].outputs[0]
        if self.bn is not None:
            return self.bn.outputs[0]
        return self.node.outputs[0]

    @property
    def groups(self) -> int:
        return int(attr(self.node, "group", 1)) if self.op in ("Conv", "ConvTranspose") else 1

    # Weights in a canonical layout: output channels first.
    def w_oc(self) -> np.ndarray:
        w = const_array(self.weight)
        if self.op == "ConvTranspose":
            g = self.groups
            ci, co_g = w.shape[:2]
            # (ci, co/g, k...) -> (co, ci/g, k...)
            w = w.reshape(g, ci // g, co_g, *w.shape[2:]).swapaxes(1, 2).reshape(g * co_g, ci // g, *w.shape[2:])
            return w
        if self.op == "Gemm":
            return w if attr(self.node, "transB", 0) else w.T
        if self.op == "MatMul":
            return w.T
        return w

    def set_w_oc(self, w: np.ndarray) -> None:
        dtype = const_array(self.weight).dtype
        w = w.astype(dtype, copy=False)
        if self.op == "ConvTranspose":
            g = self.groups
            co, ci_g = w.shape[:2]
            w = w.reshape(g, co // g, ci_g, *w.shape[2:]).swapaxes(1, 2).reshape(g * ci_g, co // g, *w.shape[2:])
        elif self.op == "Gemm" and not attr(self.node, "transB", 0):
            w = w.T
        elif self.op == "MatMul":
            w = w.T
        set_const(self.weight, w)

    @property
    def out_channels(self) -> int:
        return int(self.w_oc().shape[0])

    @property
    def in_channels(self) -> int:
        return int(self.w_oc().shape[1]) * self.groups

    def bias_array(self) -> np.ndarray:
        b = const_array(self.bias)
        return np.zeros(self.out_channels, dtype=np.float32) if b is None else b

    def set_bias(self, b: np.ndarray) -> None:
        """Set the bias, adding a bias input when the layer has none."""
        b = np.asarray(b, dtype=np.float32)
        if self.bias is None:
            if self.op == "MatMul":
                raise ValueError("MatMul has no bias input")
            val = add_initializer(self.node.graph, f"{self.name}.bias", b)
            self.node.resize_inputs(3)
            self.node.replace_input_with(2, val)
            self.bias = val
        else:
            set_const(self.bias, b)

    def bn_params(self) -> dict[str, np.ndarray] | None:
        """gamma, beta, mean, var, eps of the BN after this layer (None when folded)."""
        if self.bn is None:
            return None
        g, b, m, v = (const_array(x) for x in self.bn.inputs[1:5])
        return {"gamma": g, "beta": b, "mean": m, "var": v, "eps": float(attr(self.bn, "epsilon", 1e-5))}

    def preact_moments(self) -> tuple[np.ndarray, np.ndarray] | None:
        """Per-channel mean and std of the pre-activation (BN output) the BN promises."""
        p = self.bn_params()
        if p is None:
            return None
        return p["beta"].astype(np.float64), np.abs(p["gamma"]).astype(np.float64)

    def spatial_out(self) -> int | None:
        """Output positions per sample (1 for Gemm), or None when unknown."""
        if self.op in ("Gemm",):
            return 1
        shape = static_shape(self.node.outputs[0])
        if shape is None or any(d is None for d in shape[2 if self.op != "MatMul" else 1:-1 if self.op == "MatMul" else None]):
            return None
        if self.op == "MatMul":
            return int(np.prod(shape[1:-1])) if len(shape) > 2 else 1
        return int(np.prod(shape[2:]))

    def macs(self) -> int | None:
        """Multiply-accumulates per sample."""
        s = self.spatial_out()
        if s is None:
            return None
        w = self.w_oc()
        return int(s * w.size)

    def params(self) -> int:
        return int(const_array(self.weight).size + (0 if self.bias is None else const_array(self.bias).size))


class UniqueNames:
    """Fresh value names for one graph (remembers the ones it handed out)."""

    def __init__(self, graph: ir.Graph):
        self.taken = set(graph.initializers) | {v.name for n in graph for v in n.outputs} | \
            {v.name for v in graph.inputs}

    @classmethod
    def avoiding(cls, taken) -> "UniqueNames":
        """Fresh names avoiding ``taken`` (for graphs held as protos)."""
        names = cls.__new__(cls)
        names.taken = set(taken)
        return names

    def __call__(self, base: str) -> str:
        name, i = base, 1
        while name in self.taken:
            name, i = f"{base}_{i}", i + 1
        self.taken.add(name)
        return name


def add_initializer(graph: ir.Graph, base: str, array: np.ndarray, dtype: ir.DataType | None = None,
                    names: UniqueNames | None = None) -> ir.Value:
    """Register ``array`` as a new initializer named ``base`` (made unique)."""
    name = (names or UniqueNames(graph))(base)
    tensor = ir.Tensor(array, dtype=dtype, name=name) if dtype is not None else ir.tensor(array, name=name)
    value = ir.Value(name=name, const_value=tensor, shape=ir.Shape(array.shape), type=ir.TensorType(tensor.dtype))
    graph.register_initializer(value)
    return value


def _act_chain(value: ir.Value) -> tuple[list[ir.Node], str | None]:
    """Elementwise activation right after ``value`` (Relu, Clip, SiLU = x*Sigmoid(x), ...)."""
    uses = list(value.uses())
    if value.is_graph_output() or not uses:
        return [], None
    if len(uses) == 1:
        n = uses[0].node
        if n.op_type in UNARY_ACTS and n.op_type not in ("Erf", "Neg", "Abs", "Exp"):
            if n.op_type == "Clip":
                return [n], "clip"
            return [n], n.op_type.lower()
        if n.op_type == "Mul" and n.inputs[0] is value and n.inputs[1] is value:
            return [], None
    if len(uses) == 2:
        # SiLU / Swish: y * Sigmoid(y) ; HardSwish written as y * HardSigmoid(y)
        nodes = {u.node.op_type: u.node for u in uses}
        for gate in ("Sigmoid", "HardSigmoid"):
            if gate in nodes and "Mul" in nodes:
                g, m = nodes[gate], nodes["Mul"]
                if set(id(x) for x in m.inputs) == {id(value), id(g.outputs[0])} and single_consumer(g.outputs[0]) is m:
                    return [g, m], "silu" if gate == "Sigmoid" else "hardswish"
    return [], None


def find_layers(model: ir.Model) -> tuple[list[Layer], dict[str, str]]:
    """All compressible layers, and for the others ``{node name: reason}``."""
    layers: list[Layer] = []
    skipped: dict[str, str] = {}
    for node in model.graph:
        if node.op_type not in LAYER_OPS or node.domain not in ("", "ai.onnx"):
            continue
        why = _why_not_layer(node)
        if why:
            skipped[node.name] = why
            continue
        if node.op_type == "MatMul":
            weight, bias = node.inputs[1], None
        else:
            weight = node.inputs[1]
            bias = node.inputs[2] if len(node.inputs) > 2 and node.inputs[2] is not None else None
        layer = Layer(node=node, kind=_kind(node, weight), weight=weight, bias=bias)
        out = node.outputs[0]
        nxt = single_consumer(out)
        if nxt is not None and nxt.op_type == "BatchNormalization" and nxt.inputs[0] is out and \
                all(const_array(x) is not None for x in nxt.inputs[1:5]) and len(nxt.outputs) == 1:
            layer.bn = nxt
            out = nxt.outputs[0]
        layer.act, layer.act_type = _act_chain(out)
        layers.append(layer)
    return layers, skipped


def _kind(node: ir.Node, weight: ir.Value) -> str:
    if node.op_type == "Gemm":
        return "gemm"
    if node.op_type == "MatMul":
        return "matmul"
    g = int(attr(node, "group", 1))
    if node.op_type == "ConvTranspose":
        return "convtranspose"
    w = const_array(weight)
    if g == 1:
        return "conv"
    if w.shape[1] == 1 and w.shape[0] == g:
        return "depthwise"
    return "grouped"


def selects_channels(node: ir.Node, w: np.ndarray | None) -> bool:
    """A Conv that only moves channels (a zero-padded shortcut written as a conv, see
    ``passes/shortcut.py``): nothing to compress."""
    return node.op_type == "Conv" and int(attr(node, "group", 1)) == 1 and \
        not (len(node.inputs) > 2 and node.inputs[2] is not None) and is_selection_weight(w)


def _why_not_layer(node: ir.Node) -> str | None:
    if node.op_type == "MatMul":
        if const_array(node.inputs[1]) is None:
            return "MatMul of two activations (no constant weight)"
        if const_array(node.inputs[1]).ndim != 2:
            return "MatMul weight is not 2-D"
        return None
    w = node.inputs[1] if len(node.inputs) > 1 else None
    if w is None or w.const_value is None:
        p = w.producer() if w is not None else None
        if p is not None and p.op_type == "DequantizeLinear":
            return "already quantized (weight comes from DequantizeLinear)"
        return "weight is not a constant initializer"
    if const_array(w).dtype.kind != "f":
        return f"weight dtype {const_array(w).dtype} is not floating point"
    if selects_channels(node, const_array(w)):
        return "selects channels (a zero-padded shortcut): no weights to compress"
    if len(node.inputs) > 2 and node.inputs[2] is not None and node.inputs[2].const_value is None:
        return "bias is not a constant initializer"
    if node.op_type == "Gemm":
        if attr(node, "transA", 0):
            return "Gemm with transA=1"
        if const_array(w).ndim != 2:
            return "Gemm weight is not 2-D"
        if float(attr(node, "alpha", 1.0)) != 1.0 or (float(attr(node, "beta", 1.0)) != 1.0 and len(node.inputs) > 2):
            return "Gemm with alpha/beta other than 1"
    return None


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
    consumers: list[Consumer] = field(default_factory=list)
    reason: str | None = None                                  # why it cannot be pruned

    @property
    def name(self) -> str:
        return self.producer.name

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


@dataclass
class Analysis:
    layers: list[Layer]
    groups: list[PruneGroup]
    skipped: dict[str, str]

    def layer(self, name: str) -> Layer:
        return next(l for l in self.layers if l.name == name)

    @property
    def prunable(self) -> list[PruneGroup]:
        return [g for g in self.groups if g.prunable]


def analyse(model: ir.Model) -> Analysis:
    layers, skipped = find_layers(model)
    return Analysis(layers=layers, groups=build_groups(model, layers), skipped=skipped)
