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
from typing import TYPE_CHECKING

import numpy as np
import onnx_ir as ir
from datafree.runtime.model_file import is_selection_weight

if TYPE_CHECKING:
    from .groups import PruneGroup

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

    def spatial_at(self, positions: dict[str, int] | None = None) -> int | None:
        """Output positions per sample; where the shapes are symbolic, those ``positions``
        gives for this layer (at the input size assumed), else None."""
        s = self.spatial_out()
        if s is None and positions:
            s = positions.get(self.name)
        return s

    def macs(self, positions: dict[str, int] | None = None) -> int | None:
        """Multiply-accumulates per sample, at :meth:`spatial_at` positions (None where unknown)."""
        s = self.spatial_at(positions)
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


def clip_bounds(node: ir.Node) -> tuple[float, float]:
    """A Clip's (min, max) from its attributes or constant inputs; ±inf where it has none."""
    lo = attr(node, "min", None)
    hi = attr(node, "max", None)
    if len(node.inputs) > 1 and node.inputs[1] is not None and const_array(node.inputs[1]) is not None:
        lo = float(const_array(node.inputs[1]))
    if len(node.inputs) > 2 and node.inputs[2] is not None and const_array(node.inputs[2]) is not None:
        hi = float(const_array(node.inputs[2]))
    return (-np.inf if lo is None else float(lo)), (np.inf if hi is None else float(hi))


def added_constant(add: ir.Node) -> tuple[ir.Value, np.ndarray] | None:
    """(x, c) of ``Add(x, c)`` with ``c`` a constant, else None."""
    if add.op_type != "Add" or add.domain not in ("", "ai.onnx") or len(add.inputs) != 2:
        return None
    for i in (0, 1):
        c = const_array(add.inputs[1 - i])
        if c is not None and add.inputs[i] is not None and const_array(add.inputs[i]) is None:
            return add.inputs[i], c.astype(np.float32)
    return None


@dataclass
class SpelledHardSwish:
    """``x · clip((x + offset) / top, 0, 1)`` written with elementary ops; ``nodes`` in graph
    order, the last one making ``out``."""
    x: ir.Value
    offset: float
    top: float
    nodes: list[ir.Node]
    out: ir.Value


def spelled_out_hardswish(clip: ir.Node) -> SpelledHardSwish | None:
    """HardSwish as exporters write it below opset 14 (paddle2onnx, tf2onnx, keras), around
    ``Clip(Add(x, c), 0, M)``: ``Mul(x, clip) / M`` or ``x · (clip / M)``, the division a
    ``Div`` by M or a ``Mul`` by 1/M."""
    if clip.op_type != "Clip":
        return None
    lo, m = clip_bounds(clip)
    add = clip.inputs[0].producer()
    added = added_constant(add) if add is not None and lo == 0.0 and 0.0 < m < np.inf else None
    if added is None or added[1].size != 1 or single_consumer(add.outputs[0]) is not clip:
        return None
    x, offset = added[0], float(added[1].reshape(()))

    def divides(node: ir.Node | None, value: ir.Value) -> bool:
        k = const_array(node.inputs[1]) if node is not None and len(node.inputs) == 2 and \
            node.inputs[0] is value else None
        return k is not None and k.size == 1 and (
            (node.op_type == "Div" and np.isclose(float(k.reshape(())), m)) or
            (node.op_type == "Mul" and np.isclose(float(k.reshape(())) * m, 1.0)))

    def times_x(node: ir.Node | None, value: ir.Value) -> bool:
        return node is not None and node.op_type == "Mul" and len(node.inputs) == 2 and \
            {id(v) for v in node.inputs} == {id(x), id(value)} and x is not value

    first = single_consumer(clip.outputs[0])
    second = single_consumer(first.outputs[0]) if first is not None else None
    if not ((times_x(first, clip.outputs[0]) and divides(second, first.outputs[0])) or
            (divides(first, clip.outputs[0]) and times_x(second, first.outputs[0]))):
        return None
    return SpelledHardSwish(x, offset, m, [add, clip, first, second], second.outputs[0])


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
        clip = single_consumer(nodes["Add"].outputs[0]) if "Add" in nodes and "Mul" in nodes else None
        if clip is not None:   # HardSwish spelled out: x · Clip(x + 3, 0, 6) / 6
            hs = spelled_out_hardswish(clip)
            if hs is not None and hs.x is value and np.isclose(hs.offset, 3.0) and np.isclose(hs.top, 6.0):
                return hs.nodes, "hardswish"
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
    from .groups import build_groups

    layers, skipped = find_layers(model)
    return Analysis(layers=layers, groups=build_groups(model, layers), skipped=skipped)
