"""What a model costs: MACs, bit-operations, parameters and bytes, per layer.

``BOPs = MACs x b_w x b_a`` (HAWQ-V3 convention; a float layer counts 32 x 32).
Every number the report prints comes from one function here, which the tests call
too.  Besides the float layers ``graph.analyse`` finds, this module reads layers
of QDQ models (weight from ``DequantizeLinear``, or from ``Cast → Mul(scale)`` of
stored integers, through a Cast in either case).  Their bit-widths come, in this
order, from the compressor's ``metadata_props["datafree.layers"]``, from the recipe
in ``metadata_props["datafree.recipe"]``, and last from the integers themselves:
the container dtype (int8/uint8 -> 8, int4/uint4 -> 4) narrowed by the largest
stored magnitude (a symmetric b-bit grid never exceeds 2^(b-1)-1).
"""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass

import numpy as np
import onnx_ir as ir

from datafree.ops import domain
from datafree.toolchain import graph
from datafree.toolchain.errors import UserError
from datafree.toolchain.recipe import LAYERS_KEY, METADATA_KEY as RECIPE_KEY, Recipe

FLOAT_BITS = 32
_INT_BITS = {ir.DataType.INT8: 8, ir.DataType.UINT8: 8, ir.DataType.INT4: 4, ir.DataType.UINT4: 4,
             ir.DataType.INT16: 16, ir.DataType.UINT16: 16, ir.DataType.INT2: 2, ir.DataType.UINT2: 2}


# ------------------------------------------------------------ the formulas
def bops(macs: int, wbits: int, abits: int) -> int:
    """Bit-operations of ``macs`` multiply-accumulates at ``wbits`` x ``abits``."""
    return int(macs) * int(wbits) * int(abits)


def storage_bits(bits: int) -> int:
    """Container width a ``bits``-bit tensor is stored in (int4, int8, int16 or float32)."""
    for width in (4, 8, 16):
        if bits <= width:
            return width
    return FLOAT_BITS


def tensor_bytes(elements: int, bits: int) -> float:
    """Bytes of ``elements`` values stored at ``bits`` each (int4 packs two per byte)."""
    return elements * bits / 8.0


@dataclass
class LayerCost:
    """One compute layer: its size, its precision, and what that costs per sample."""

    name: str
    op: str
    kind: str
    macs: int
    weights: int                 # weight elements
    biases: int
    wbits: int                   # grid the weights use (32 = float)
    abits: int                   # grid the input activations use (32 = float)
    wstore: int                  # container bits of the stored weights
    astore: int                  # container bits of the activations
    act_in: int                  # input activation elements per sample
    act_out: int                 # output activation elements per sample
    bits_from: str = "float"     # metadata | recipe | dtype | float | assumed

    @property
    def bops(self) -> int:
        return bops(self.macs, self.wbits, self.abits)

    @property
    def params(self) -> int:
        return self.weights + self.biases

    @property
    def weight_bytes(self) -> float:
        return tensor_bytes(self.weights, self.wstore) + tensor_bytes(self.biases, 32)

    @property
    def act_bytes(self) -> float:
        return tensor_bytes(self.act_in + self.act_out, self.astore)

    @property
    def precision(self) -> str:
        return "FP32" if self.wbits >= FLOAT_BITS else f"W{self.wbits}A{self.abits if self.abits < 32 else 'f'}"

    def with_bits(self, wbits: int, abits: int) -> "LayerCost":
        """The same layer if it were run at ``wbits`` x ``abits`` (32 = float)."""
        return dataclasses.replace(self, wbits=wbits, abits=abits, wstore=storage_bits(wbits),
                                   astore=storage_bits(abits), bits_from="assumed")


def totals(costs: list[LayerCost]) -> dict[str, float]:
    return {
        "macs": sum(c.macs for c in costs),
        "bops": sum(c.bops for c in costs),
        "params": sum(c.params for c in costs),
        "weight_bytes": sum(c.weight_bytes for c in costs),
        "act_bytes": sum(c.act_bytes for c in costs),
    }


# ------------------------------------------------------- layers of any model
def compute_layers(model: ir.Model) -> list[graph.Layer]:
    """Float layers from ``graph.analyse`` plus layers whose weight is dequantized.

    For a QDQ layer the returned ``Layer`` carries a detached float copy of the
    dequantized weight, so ``w_oc()`` and ``macs()`` work as for float layers.
    """
    float_layers = {id(l.node): l for l in graph.find_layers(model)[0]}
    out = []
    for node in model.graph:
        if id(node) in float_layers:
            out.append(float_layers[id(node)])
        elif node.op_type in graph.LAYER_OPS and node.domain in ("", "ai.onnx"):
            layer = _dequantized_layer(node)
            if layer is not None and not graph.selects_channels(node, layer.w_oc()):
                out.append(layer)
    return out


def _stored_integers(value: ir.Value | None) -> ir.Value | None:
    """The constant ``value`` is, or the constant a Cast turns into ``value``."""
    if value is None:
        return None
    if value.const_value is not None:
        return value
    p = value.producer()
    if p is not None and p.op_type == "Cast" and p.inputs and p.inputs[0] is not None \
            and p.inputs[0].const_value is not None:
        return p.inputs[0]
    folded = _fold(value)
    if folded is not None and folded.dtype.kind in "iu":
        return _detached(value.name or "derived", folded)
    return None


_FOLDABLE = {"Cast", "Mul", "Div", "Round", "Clip"}


def _fold(value: ir.Value, depth: int = 8) -> np.ndarray | None:
    """The value of a small constant subgraph (a dynamic model's weights at some bits,
    derived from its stored integers: Cast, Mul, Div, Round, Clip), else None."""
    if value is None or depth < 0:
        return None
    if value.const_value is not None:
        return graph.const_array(value)
    p = value.producer()
    if p is None or p.op_type not in _FOLDABLE or p.domain not in ("", "ai.onnx"):
        return None
    xs = [_fold(v, depth - 1) if v is not None else None for v in p.inputs]
    if xs[0] is None or any(x is None for x, v in zip(xs, p.inputs) if v is not None):
        return None
    x = xs[0]
    if p.op_type == "Cast":
        return x.astype(ir.DataType(graph.attr(p, "to", 1)).numpy())
    if p.op_type == "Round":
        return np.round(x)
    if p.op_type == "Clip":
        lo = xs[1] if len(xs) > 1 and xs[1] is not None else -np.inf
        hi = xs[2] if len(xs) > 2 and xs[2] is not None else np.inf
        return np.clip(x, lo, hi).astype(x.dtype)
    return (x * xs[1] if p.op_type == "Mul" else x / xs[1]).astype(np.result_type(x, xs[1]))


def _dq_source(value: ir.Value | None) -> ir.Node | None:
    """The node that dequantizes stored integers into ``value``: a DequantizeLinear, or a
    ``Mul(Cast(integers), scale)`` (the form weights onnxruntime folds at load take)."""
    p = value.producer() if value is not None else None
    if p is None:
        return None
    if p.op_type == "DequantizeLinear" and p.inputs[0] is not None and _stored_integers(p.inputs[0]) is not None:
        return p
    if p.op_type == "Mul" and len(p.inputs) == 2 and p.inputs[0] is not None and p.inputs[0].const_value is None \
            and p.inputs[1] is not None and p.inputs[1].const_value is not None:
        q = _stored_integers(p.inputs[0])
        if q is not None and q.const_value.dtype in _INT_BITS:
            return p
    return None


def _integers(dq: ir.Node) -> ir.Value:
    return _stored_integers(dq.inputs[0])


def _dequantize(dq: ir.Node) -> np.ndarray:
    q = graph.const_array(_integers(dq)).astype(np.float64)
    scale = graph.const_array(dq.inputs[1]).astype(np.float64)
    if dq.op_type == "Mul":
        return (q * scale).astype(np.float32)
    zp = graph.const_array(dq.inputs[2]) if len(dq.inputs) > 2 and dq.inputs[2] is not None else None
    zp = np.zeros_like(scale) if zp is None else zp.astype(np.float64)
    if scale.ndim == 1 and scale.size > 1 and q.ndim > 1:
        axis = int(graph.attr(dq, "axis", 1)) % q.ndim
        shape = [1] * q.ndim
        shape[axis] = scale.size
        scale, zp = scale.reshape(shape), zp.reshape(shape)
    return ((q - zp) * scale).astype(np.float32)


def _detached(name: str, array: np.ndarray) -> ir.Value:
    return ir.Value(name=name, const_value=ir.tensor(array, name=name), shape=ir.Shape(array.shape),
                    type=ir.TensorType(ir.DataType.from_numpy(array.dtype)))


def _dequantized_layer(node: ir.Node) -> graph.Layer | None:
    dq = _dq_source(node.inputs[1] if len(node.inputs) > 1 else None)
    if dq is None:
        return None
    weight = _detached(f"{node.name}.weight", _dequantize(dq))
    bias = None
    if node.op_type != "MatMul" and len(node.inputs) > 2 and node.inputs[2] is not None:
        b = node.inputs[2]
        bdq = _dq_source(b)
        if bdq is not None:
            bias = _detached(f"{node.name}.bias", _dequantize(bdq))
        elif b.const_value is not None:
            bias = b
    return graph.Layer(node=node, kind=graph._kind(node, weight), weight=weight, bias=bias)


# ------------------------------------------------------------------ bits
def _metadata(model: ir.Model) -> tuple[dict, Recipe | None]:
    props = model.metadata_props
    layers, recipe = {}, None
    if LAYERS_KEY in props:
        try:
            layers = json.loads(props[LAYERS_KEY])
        except json.JSONDecodeError as exc:
            raise UserError(f"metadata {LAYERS_KEY!r} is not valid JSON: {exc}") from None
        if not isinstance(layers, dict):
            raise UserError(f"metadata {LAYERS_KEY!r} must map layer names to bits")
    if RECIPE_KEY in props:
        recipe = Recipe.from_json(props[RECIPE_KEY])
    return layers, recipe


def _dtype_bits(value: ir.Value | None, *, weight: bool) -> int:
    if weight:
        dq = _dq_source(value)
        return FLOAT_BITS if dq is None else _INT_BITS.get(_integers(dq).const_value.dtype, FLOAT_BITS)
    dq = value.producer() if value is not None else None
    if dq is None or dq.op_type != "DequantizeLinear":
        return FLOAT_BITS
    dtype = dq.inputs[0].dtype
    if dtype is None and dq.inputs[0].const_value is not None:
        dtype = dq.inputs[0].const_value.dtype
    return _INT_BITS.get(dtype, FLOAT_BITS)


def _range_bits(dq: ir.Node, container: int) -> int:
    """Narrowest symmetric grid holding the stored integers (max |q| <= 2^(b-1)-1)."""
    q = graph.const_array(_integers(dq))
    zp = graph.const_array(dq.inputs[2]) if dq.op_type == "DequantizeLinear" and len(dq.inputs) > 2 and \
        dq.inputs[2] is not None else None
    if zp is not None and np.any(zp != 0):
        return container
    m = int(np.abs(q.astype(np.int64)).max()) if q.size else 0
    return min(container, max(2, int(np.ceil(np.log2(m + 1))) + 1))


def layer_bits(layer: graph.Layer, meta: dict, recipe: Recipe | None) -> tuple[int, int, int, int, str]:
    """(wbits, abits, weight container bits, activation container bits, where from)."""
    node = layer.node
    w_dq = _dq_source(node.inputs[1])
    wstore = _dtype_bits(node.inputs[1], weight=True) if w_dq is not None else FLOAT_BITS
    astore = _dtype_bits(node.inputs[0], weight=False)
    if layer.name in meta and isinstance(meta[layer.name], dict):
        e = meta[layer.name]
        wb, ab = int(e.get("wbits") or FLOAT_BITS), int(e.get("abits") or FLOAT_BITS)
        ws = wstore if w_dq is not None else storage_bits(wb)
        as_ = astore if astore < FLOAT_BITS else storage_bits(ab)
        return wb, ab, ws, as_, "metadata"
    if w_dq is None:
        return FLOAT_BITS, astore, FLOAT_BITS, astore, "float"
    if recipe is not None:
        o = recipe.for_layer(layer.name, layer.kind)
        if o.wbits is not None:
            ab = o.abits or FLOAT_BITS
            return o.wbits, ab, wstore, astore if astore < FLOAT_BITS else storage_bits(ab), "recipe"
    return _range_bits(w_dq, wstore), astore, wstore, astore, "dtype"


def _elements(value: ir.Value) -> int:
    shape = graph.static_shape(value)
    if not shape:
        return 0
    dims = [1 if (i == 0 and d is None) else d for i, d in enumerate(shape)]
    return 0 if any(d is None for d in dims) else int(np.prod(dims))


def layer_costs(model: ir.Model) -> list[LayerCost]:
    """Per-layer cost of ``model`` at the precision it is stored in."""
    meta, recipe = _metadata(model)
    dyn = domain.dynamic_metadata(model.metadata_props)
    if dyn.get("stem") and dyn.get("stem_bits") and dyn["stem"] not in meta:
        # a dynamic model's stem: fake-quantized at the highest candidate, stored dequantized
        meta = {**meta, dyn["stem"]: {"wbits": dyn["stem_bits"], "abits": dyn["stem_bits"]}}
    for name, bits in (dyn.get("first_layers") or {}).items():
        # a cascade's first pass: fake-quantized at its configuration, weights derived from the stored integers
        meta.setdefault(name, {"wbits": bits, "abits": bits})
    rows = []
    for layer in compute_layers(model):
        macs = layer.macs()
        wb, ab, ws, as_, src = layer_bits(layer, meta, recipe)
        rows.append(LayerCost(
            name=layer.name, op=layer.op, kind=layer.kind, macs=int(macs or 0),
            weights=int(layer.w_oc().size), biases=0 if layer.bias is None else int(graph.const_array(layer.bias).size),
            wbits=wb, abits=ab, wstore=ws, astore=as_,
            act_in=_elements(layer.node.inputs[0]), act_out=_elements(layer.node.outputs[0]), bits_from=src))
    return rows


def assume_bits(costs: list[LayerCost], wbits: int, abits: int) -> list[LayerCost]:
    """Every layer at ``wbits`` x ``abits``: the cost of a uniform choice before compressing."""
    return [c.with_bits(wbits, abits) for c in costs]


# ------------------------------------------------------ dynamic precision


@dataclass
class DynamicCosts:
    """Cost of a model whose precision is chosen per input by an embedded selector."""

    images: int
    mean_bits: list[float]          # per group, averaged over the images
    expected_bops: float
    min_bops: float
    max_bops: float
    selector_macs: int
    selector_bops: int
    selector_params: int
    note: str = ""


def dynamic_costs(model: ir.Model, probes: np.ndarray) -> DynamicCosts | None:
    """Expected / min / max BOPs over ``probes`` and the selector's own cost.

    Applies to models with nodes of domain ``ai.datafree`` whose second graph
    output is the bit-width chosen per image ([N] or [N, groups]); None for every
    other model.  A dynamic layer at ``b`` bits quantizes weights and activations
    to ``b`` (``MACs x b x b``); per-group MACs, the stem and its bits come from the
    model's ``datafree.dynamic`` metadata when present, otherwise from the dynamic
    nodes themselves.  The selector (``BitSelect``: pooling and a small float MLP)
    is counted apart, at 32 x 32.
    """
    dyn = [n for n in model.graph if n.domain == domain.DOMAIN]
    if not dyn or len(model.graph.outputs) < 2:
        return None
    from .probes import run_model  # onnxruntime only when needed

    meta = domain.dynamic_metadata(model.metadata_props)
    bits_name = meta.get("bits_output") or model.graph.outputs[1].name
    chosen = np.asarray(run_model(model, probes)[bits_name], dtype=np.float64).reshape(len(probes), -1)
    note = ""
    if meta.get("mode") == "cascade" and meta.get("config_bops"):
        # a cascade: every image pays the first pass, a rerun image also the pass of its
        # configuration (each pass's BOPs, stem included, from the metadata)
        table = np.asarray(meta["configs"], np.float64)
        first = np.all(chosen == table[0], axis=1)
        rows = [int(np.flatnonzero(np.all(table == c, axis=1))[0]) for c in chosen]
        config_bops = np.asarray(meta["config_bops"], np.float64)
        per_image = config_bops[0] + np.where(first, 0.0, config_bops[rows])
    else:
        static = float(sum(c.bops for c in layer_costs(model)))     # the stem at its metadata bits
        group_macs = np.asarray(meta.get("group_macs") or [], dtype=np.float64)
        if len(group_macs) != chosen.shape[1]:
            layers = [n for n in dyn if n.op_type not in ("BitSelect", "DynQuant")]
            macs = np.array([_dynamic_macs(n) for n in layers], dtype=np.float64)
            group_macs = np.array([macs.sum()]) if chosen.shape[1] == 1 else macs
            if len(group_macs) != chosen.shape[1]:
                group_macs = np.full(chosen.shape[1], macs.sum() / chosen.shape[1])
                note = "dynamic MACs split evenly over the bit outputs (no datafree.dynamic metadata)"
        per_image = static + (chosen ** 2) @ group_macs
    sel_macs, sel_params, pool = _selector(dyn)
    return DynamicCosts(images=len(probes), mean_bits=chosen.mean(axis=0).round(4).tolist(),
                        expected_bops=float(per_image.mean()), min_bops=float(per_image.min()),
                        max_bops=float(per_image.max()), selector_macs=sel_macs,
                        selector_bops=bops(sel_macs + pool, 32, 32), selector_params=sel_params, note=note)


def _selector(dyn: list[ir.Node]) -> tuple[int, int, int]:
    """(MACs of the selector MLP, its parameters, additions of its pooling)."""
    macs = params = pool = 0
    for n in dyn:
        if n.op_type != "BitSelect":
            continue
        consts = [graph.const_array(v) for v in n.inputs[1:] if v is not None and v.const_value is not None]
        mats = [c for c in consts[:-1] if c.ndim == 2]      # the last input is the table of configurations
        macs += sum(int(c.size) for c in mats)
        params += sum(int(c.size) for c in consts[:-1])
        shape = graph.static_shape(n.inputs[0])
        if shape and len(shape) > 2 and all(d is not None for d in shape[1:]):
            pool += int(np.prod(shape[1:]))
    return macs, params, pool


def _dynamic_macs(node: ir.Node) -> int:
    """MACs of a dynamic layer: output positions x its largest constant (weight) tensor."""
    consts = [graph.const_array(v) for v in node.inputs if v is not None and v.const_value is not None]
    weights = [c for c in consts if c.ndim >= 2]
    shape = graph.static_shape(node.outputs[0]) if node.outputs else None
    if not weights or not shape or len(shape) < 2 or any(d is None for d in shape[2:]):
        return 0
    w = max(weights, key=lambda a: a.size)
    return int(np.prod(shape[2:], dtype=np.int64) if len(shape) > 2 else 1) * int(w.size)
