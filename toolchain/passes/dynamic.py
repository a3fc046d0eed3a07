"""Dynamic precision (DynaDFQ, methods.md §2): each input image gets its own bit-widths.

    model, stats = apply_dynamic(load("m.onnx"), DynamicConfig(bits=(4, 6, 8), target_bits=5))
    logits, bits = InferenceSession(model).run(None, {"input": x})     # bits: [N, G]

Two modes choose the bits.

``mode="cascade"`` (default, :func:`build_cascade`): every image runs the whole
network at a low configuration ``configs[0]`` (standard ops; its weights are derived
from the same stored integers by constant subgraphs onnxruntime folds at load).
``BitSelect`` reads that first pass's *margin* (largest logit minus the second) and
either keeps its result or reruns the image at ``configs[1]``: the rows to rerun are
gathered, run through the dynamic layers (inside an ``If``, so that no graph ever
sees an empty batch) and scattered back into the logits; an image that is rerun
costs both passes.  Models whose output is not one score per class (or that have
more than one output) get the upfront selector, with a note.  The pair of configurations and the selector
are fitted on synthetic images (:func:`fit_cascade`).  Each pass runs at one
configuration, so each gets its own biases (:func:`correct_biases`: the mean shift
that rounding and clipping cause at that configuration taken out, layer by layer; a
few floats per layer) and the selector is refitted on the corrected first pass;
measured on ResNet-20 (dev top-1, mean of three synthetic sets) 4/4/4 gains 0.9 pt
(79.6 -> 80.5 %), 4/4/6 1.4 (80.0 -> 81.5), 6/4/4, 6/6/6 and 8/8/8 -0.1 to +0.3.  The price per bit is set on
the probes generated for confident targets (``CONFIDENT_TARGET``), because images
made for spread targets are far less sure than real ones and a threshold set on
them reruns too few real images.  Measured on ResNet-20 (benchmarks/dynamic_bench.py)
the first pass's margin tells images that need more bits from the others; the
stem's pooled output does not.

``mode="upfront"``: the selector reads the stem's pooled output and every image runs
once, at the configuration it picked.  What the pass writes (BN folded first; the
layers' weights and activations are fake-quantized as a device would run them):

* The first layer (the *stem*) runs at the highest candidate precision for every
  image: its output is what the selector looks at, so it must exist before the
  choice.  Weights are stored dequantized, its input is fake-quantized with
  standard ops.
* Every other Conv / Gemm belongs to one of G *groups* (``groups="stage"``: one per
  spatial resolution, the Gemm joins the last; ``groups="3"``: three groups of about
  equal MACs along the depth).  Its input goes through ``DynQuant`` and the layer
  becomes ``DynQConv`` / ``DynQGemm`` (``datafree.ops``), both at the bit-width of
  its group for that image.
* ``BitSelect`` reads the global-average-pooled stem output, runs a tiny MLP
  (C → 16 → K, ReLU) and picks one of K candidate *configurations* (a bit-width
  per group).  The model's second output ``bits`` is float [N, G]: the bit-width of
  each group for each image.  The MAC-weighted mean over groups ("average bits",
  the quantity ``target_bits`` constrains; the stem is not counted) uses the group
  MACs stored in the model's ``datafree.dynamic`` metadata.

Candidate configurations: every combination of the candidate bit-widths over the
groups (at most 64) is simulated on the synthetic images; the ones on the Pareto
front of (average bits, loss against the float model) are kept, at most
``MAX_CONFIGS``, from the cheapest to the one with the lowest loss.

Data (no real image).  A quarter of the synthetic images is held out as probes;
each part gains mirrored and shifted copies of its own images (``augment``), which
calibrates the activation ranges and trains the selector on four times the images
without generating more.

Training.  The configurations are fixed, so the selector only
needs, for each synthetic image, the loss of every configuration:
``CE(logits_k, argmax FP) + KL(FP ‖ logits_k)``, computed once by running the
fixed-precision model of each configuration in onnxruntime.  The selector is
trained in torch with hard Gumbel-softmax (straight-through):
``Σ_k onehot_k·loss_k + λ·max(0, mean bits − target)``.  Because the network
itself is not trained, no differentiable copy of it is needed and every
candidate is simulated exactly as it will run.  Finally a price per bit μ
(positive or negative) is subtracted from the selector's logits (folded into its
last bias; the chosen bit-width per image only drops as μ grows) and set by
bisection so the mean bits on the held-out probe images is at most
``target_bits`` and as close to it as the probe set allows.

Weights are stored once, as int8 at the highest candidate precision; lower
bit-widths are requantised from those integers at run time (see ``datafree.ops``).
The integers are chosen so that each requantised bit-width is a fitted (GPTQ)
rounding on the synthetic images' layer inputs, from the lowest bit-width up
(:func:`fit.nested_gptq`): one stored set, as many bytes as rounding to nearest,
and the 27 stage configurations of ResNet-20 gain 1.0 pt on average (all-4-bit
2.4, 77.2 -> 79.6 %).  Depthwise and other grouped convolutions are rounded to nearest.
"""

from __future__ import annotations

import dataclasses
import itertools
import json
import time
from dataclasses import dataclass, field

import numpy as np
import onnx
import onnx_ir as ir
import onnxruntime as ort
import torch
from onnx import TensorProto, helper, numpy_helper

from datafree.ops import domain, functions, reference, schemas
from datafree.ops.selector import Selector, calibrate_price

from ..errors import NotCompressible, UserError
from ..graph import Layer, UniqueNames, analyse
from ..progress import ProgressFn, silent
from ..quant import act_qparams, quantize_weight, weight_scales
from ..recipe import DynamicConfig, Recipe
from ..stats import mse_range
from . import fit
from .fold import fold_batchnorm

STAGE = "dynamic"
METADATA_KEY = domain.METADATA_KEY
BITS_OUTPUT = "bits"
MAX_CONFIGS = 8
MAX_ENUMERATED = 64
HIDDEN = 16
PROBE_FRACTION = 0.25
SELECTOR_LR = 1e-2
PENALTY = 2.0            # λ, per bit above target
CONFIDENT_TARGET = 0.9   # cascade probes: synthetic images made for a target this sure (see fit_cascade)


# ----------------------------------------------------------------- the plan
@dataclass
class ActQuant:
    scale: np.ndarray            # [B] indexed by bits
    zero_point: np.ndarray       # [B]
    signed: bool


@dataclass
class DynLayer:
    name: str
    op: str                      # Conv | Gemm
    group: int                   # -1: the stem
    input: str                   # name of the layer's input value
    w_int: np.ndarray            # int8, output channels first
    w_scale: np.ndarray          # [O]
    scale_table: np.ndarray      # [B, O]
    bias: np.ndarray             # [O]
    act: ActQuant | None = None
    macs: int = 0
    attrs: dict = field(default_factory=dict)

    def weight(self, bits: int) -> np.ndarray:
        return reference.derive_weight(self.w_int, self.w_scale, self.scale_table, bits)


@dataclass
class Plan:
    candidates: tuple[int, ...]
    stem: DynLayer
    layers: list[DynLayer]
    groups: list[list[str]]
    group_macs: np.ndarray
    features: str                        # value the selector reads (stem output)
    base: onnx.ModelProto                # BN-folded float model
    configs: np.ndarray = field(default_factory=lambda: np.zeros((0, 0), np.float32))   # [K, G]
    biases: dict = field(default_factory=dict)   # config_key(config) -> {layer: bias} (correct_biases)

    def biases_for(self, config) -> dict[str, np.ndarray]:
        """The corrected biases of a configuration, by layer name ({} if it has none)."""
        return self.biases.get(config_key(config), {})

    @property
    def max_bits(self) -> int:
        return max(self.candidates)

    @property
    def table_size(self) -> int:
        return self.max_bits + 1

    def avg_bits(self, configs: np.ndarray) -> np.ndarray:
        """MAC-weighted mean bits of each configuration row."""
        return np.asarray(configs, np.float64) @ self.group_macs / self.group_macs.sum()

    def bops(self, configs: np.ndarray) -> np.ndarray:
        """Bit-operations per image of each configuration (stem at the highest precision)."""
        b = np.asarray(configs, np.float64)
        return b ** 2 @ self.group_macs + self.stem.macs * self.max_bits ** 2


def config_key(config) -> tuple[int, ...]:
    return tuple(int(b) for b in np.asarray(config).ravel())


# ------------------------------------------------------------------ planning
def _fold(model: ir.Model) -> ir.Model:
    for layer in analyse(model).layers:
        if layer.bn is not None and layer.op in ("Conv", "Gemm"):
            fold_batchnorm(layer)
    return model


def _usable(layer: Layer) -> bool:
    if layer.op == "Conv":
        pad = layer.node.attributes.get("auto_pad")
        return pad is None or str(pad.value) == "NOTSET"
    return layer.op == "Gemm" and len(layer.weight.shape or ()) == 2


def _conv_attrs(layer: Layer) -> dict:
    out = {}
    for key in ("strides", "pads", "dilations", "group"):
        a = layer.node.attributes.get(key)
        if a is not None:
            out[key] = list(a.value) if key != "group" else int(a.value)
    return out


def _group_of(layers: list[Layer], mode: str) -> list[int]:
    if mode == "stage":
        sizes = []
        for l in layers:
            shape = l.node.outputs[0].shape
            spatial = tuple(shape[2:]) if l.op == "Conv" and shape is not None else None
            sizes.append(spatial)
        stages: list = []
        for s in sizes:
            if s is not None and s not in stages:
                stages.append(s)
        if 2 <= len(stages) <= 4:
            out, current = [], 0
            for s in sizes:
                current = stages.index(s) if s is not None else len(stages) - 1
                out.append(current)
            return out
        mode = str(min(3, len(layers)))
    try:
        n = int(mode)
    except ValueError:
        raise UserError(f"dynamic.groups must be 'stage' or a number of groups, got {mode!r}") from None
    if not 1 <= n <= len(layers):
        raise UserError(f"dynamic.groups: {n} groups for {len(layers)} dynamic layers")
    macs = np.array([l.macs() or 1 for l in layers], np.float64)
    cum = (np.cumsum(macs) - macs / 2) / macs.sum()
    return [min(int(c * n), n - 1) for c in cum]


def _weights(layer: Layer, candidates: tuple[int, ...], x: np.ndarray | None = None,
             runs_at: tuple[int, ...] | None = None) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(int8 weights at the top bit-width, their scale, the per-bit scale table).
    With the layer's input ``x`` the integers are nested GPTQ solutions for the
    bit-widths the layer ``runs_at`` (default: every candidate; see the module
    docstring), otherwise rounded to nearest."""
    w = layer.w_oc().astype(np.float32)
    top = max(candidates)
    table = np.ones((top + 1, w.shape[0]), np.float32)
    for b in candidates:
        table[b] = weight_scales(w, b)
    gram = fit.input_gram(layer, torch.from_numpy(np.ascontiguousarray(x, np.float32))) if x is not None else None
    if gram is None:
        return quantize_weight(w, top, table[top])[0], table[top], table
    scales = {b: torch.from_numpy(table[b].astype(np.float64)) for b in (runs_at or candidates)}
    q = fit.nested_gptq(torch.from_numpy(w.reshape(w.shape[0], -1).astype(np.float64)), gram, scales)
    return q.numpy().reshape(w.shape).astype(np.int8), table[top], table


def _calibrate(plan_layers: list[DynLayer], acts: dict[str, np.ndarray], candidates: tuple[int, ...]) -> None:
    """Per-bit-width MSE-optimal activation ranges of every layer input (``acts``)."""
    size = max(candidates) + 1
    for l in plan_layers:
        x = acts[l.input]
        scale, zp = np.ones(size, np.float32), np.zeros(size, np.float32)
        signed = bool(x.min() < 0)
        for b in candidates:
            lo, hi = mse_range(x, b)
            s, z, _ = act_qparams(lo if signed else 0.0, hi, b)
            scale[b], zp[b] = s, z
        l.act = ActQuant(scale=scale, zero_point=zp, signed=signed)


def _run(model: onnx.ModelProto, images: np.ndarray, outputs: list[str], feeds: dict | None = None,
         batch: int = 128) -> dict[str, np.ndarray]:
    """Values ``outputs`` of ``model`` on ``images`` (extra graph outputs are added to a copy)."""
    m = onnx.ModelProto()
    m.CopyFrom(model)
    present = {o.name for o in m.graph.output}
    for name in outputs:
        if name not in present:
            m.graph.output.append(helper.make_empty_tensor_value_info(name))
    opts = ort.SessionOptions()
    opts.log_severity_level = 3
    sess = ort.InferenceSession(m.SerializeToString(), opts, providers=["CPUExecutionProvider"])
    inp = sess.get_inputs()[0].name
    parts: dict[str, list] = {n: [] for n in outputs}
    for start in range(0, len(images), batch):
        f = {inp: images[start:start + batch]}
        for k, v in (feeds or {}).items():
            f[k] = v[start:start + batch]
        for name, val in zip(outputs, sess.run(outputs, f)):
            parts[name].append(val)
    return {k: np.concatenate(v) for k, v in parts.items()}


def make_plan(model: ir.Model, config: DynamicConfig, images: np.ndarray) -> Plan:
    """Fold BN, choose the stem and groups, quantize weights, calibrate activations."""
    candidates = tuple(int(b) for b in config.bits)
    folded = _fold(ir.serde.deserialize_model(ir.serde.serialize_model(model)))
    analysis = analyse(folded)
    layers = [l for l in analysis.layers if l.op in ("Conv", "Gemm") and _usable(l)]
    if len(layers) < 2:
        raise NotCompressible("dynamic precision needs at least two Conv/Gemm layers with constant weights")
    stem, rest = layers[0], layers[1:]
    groups = _group_of(rest, config.groups)
    n_groups = max(groups) + 1

    base = ir.serde.serialize_model(folded)
    acts = _run(base, images, sorted({l.node.inputs[0].name for l in layers}))

    def entry(layer: Layer, group: int) -> DynLayer:
        w_int, w_scale, table = _weights(layer, candidates, acts[layer.node.inputs[0].name],
                                         runs_at=(max(candidates),) if group < 0 else None)
        return DynLayer(name=layer.name, op=layer.op, group=group, input=layer.node.inputs[0].name,
                        w_int=w_int, w_scale=w_scale, scale_table=table, bias=layer.bias_array().astype(np.float32),
                        macs=int(layer.macs() or 0), attrs=_conv_attrs(layer) if layer.op == "Conv" else {})

    dyn = [entry(l, g) for l, g in zip(rest, groups)]
    stem_entry = entry(stem, -1)
    _calibrate([stem_entry] + dyn, acts, candidates)
    group_macs = np.array([sum(l.macs for l in dyn if l.group == g) for g in range(n_groups)], np.float64)
    return Plan(candidates=candidates, stem=stem_entry, layers=dyn,
                groups=[[l.name for l in dyn if l.group == g] for g in range(n_groups)],
                group_macs=np.maximum(group_macs, 1.0), features=stem.output.name, base=base)


# -------------------------------------------------------------- graph writing
def _inputs_used(graph: onnx.GraphProto) -> set[str]:
    """Every value a node of ``graph`` or of its subgraphs (If branches) reads."""
    return {i for n in domain.all_nodes(graph) for i in n.input}


class _Writer:
    """Edits a copy of the BN-folded float model (ModelProto) into a quantized one."""

    def __init__(self, plan: Plan):
        self.plan = plan
        self.model = onnx.ModelProto()
        self.model.CopyFrom(plan.base)
        self.graph = self.model.graph
        self.inits: list[onnx.TensorProto] = []
        taken = {v for n in self.graph.node for v in (*n.input, *n.output)}
        taken |= {i.name for i in self.graph.initializer} | {i.name for i in self.graph.input}
        self.name = UniqueNames.avoiding(taken)

    def const(self, base: str, array: np.ndarray) -> str:
        name = self.name(base)
        self.inits.append(numpy_helper.from_array(np.array(array, order="C"), name))
        return name

    def node_of(self, layer: DynLayer) -> tuple[int, onnx.NodeProto]:
        return next((i, n) for i, n in enumerate(self.graph.node) if n.name == layer.name)

    def static_quant(self, layer: DynLayer, bits: int, x: str | None = None,
                     prefix: str = "") -> tuple[list[onnx.NodeProto], str]:
        """Fake-quantize the layer input (or ``x``) at ``bits`` with standard ops, and use the result."""
        a = layer.act
        lo, hi = reference.act_grid(bits, a.signed)
        p = f"{prefix}{layer.name}/aq{bits}"
        s = self.const(p + "/scale", np.float32(a.scale[bits]))
        z = self.const(p + "/zp", np.float32(a.zero_point[bits]))
        qmin, qmax = self.const(p + "/qmin", np.float32(lo)), self.const(p + "/qmax", np.float32(hi))
        t = [self.name(f"{p}/t{i}") for i in range(5)]
        out = self.name(p + "/out")
        nodes = [helper.make_node("Div", [x or layer.input, s], [t[0]], name=self.name(p + "/div")),
                 helper.make_node("Round", [t[0]], [t[1]], name=self.name(p + "/round")),
                 helper.make_node("Add", [t[1], z], [t[2]], name=self.name(p + "/add")),
                 helper.make_node("Clip", [t[2], qmin, qmax], [t[3]], name=self.name(p + "/clip")),
                 helper.make_node("Sub", [t[3], z], [t[4]], name=self.name(p + "/sub")),
                 helper.make_node("Mul", [t[4], s], [out], name=self.name(p + "/mul"))]
        return nodes, out

    def fixed_layer(self, layer: DynLayer, bits: int, bias: np.ndarray | None = None) -> None:
        idx, node = self.node_of(layer)
        nodes, xq = self.static_quant(layer, bits)
        w = self.const(f"{layer.name}/w{bits}", layer.weight(bits) if layer.op == "Conv" else
                       self._gemm_weight(node, layer.weight(bits)))
        node.input[0], node.input[1] = xq, w
        if bias is not None:
            b = self.const(f"{layer.name}/bias{bits}", bias.astype(np.float32))
            if len(node.input) > 2:
                node.input[2] = b
            else:
                node.input.append(b)
        for k, n in enumerate(nodes):
            self.graph.node.insert(idx + k, n)

    @staticmethod
    def _gemm_weight(node: onnx.NodeProto, w_oc: np.ndarray) -> np.ndarray:
        trans_b = next((a.i for a in node.attribute if a.name == "transB"), 0)
        return w_oc if trans_b else np.ascontiguousarray(w_oc.T)

    def dynamic_layer(self, layer: DynLayer, bits_value: str, cache: dict, bias: np.ndarray | None = None) -> None:
        idx, node = self.node_of(layer)
        a, p = layer.act, layer.name
        new = []
        key = (layer.input, layer.group)
        if key not in cache:
            xq = self.name(f"{p}/dynquant")
            new.append(helper.make_node(
                "DynQuant", [layer.input, bits_value, self.const(p + "/act_scale", a.scale),
                             self.const(p + "/act_zero_point", a.zero_point)],
                [xq], domain=domain.DOMAIN, name=self.name(p + "/DynQuant"), signed=int(a.signed)))
            cache[key] = xq
        ins = [cache[key], bits_value, self.const(p + "/w_int", layer.w_int),
               self.const(p + "/w_scale", layer.w_scale), self.const(p + "/scale_table", layer.scale_table),
               self.const(p + "/bias", layer.bias if bias is None else bias.astype(np.float32))]
        op = "DynQConv" if layer.op == "Conv" else "DynQGemm"
        repl = helper.make_node(op, ins, [node.output[0]], domain=domain.DOMAIN, name=node.name,
                                **(layer.attrs if layer.op == "Conv" else {}))
        del self.graph.node[idx]
        for k, n in enumerate(new + [repl]):
            self.graph.node.insert(idx + k, n)

    def finish(self, extra_outputs: list[str] = ()) -> onnx.ModelProto:
        self.graph.initializer.extend(self.inits)
        used = _inputs_used(self.graph)
        keep = [t for t in self.graph.initializer if t.name in used]
        del self.graph.initializer[:]
        self.graph.initializer.extend(keep)
        for name in extra_outputs:
            self.graph.output.append(helper.make_empty_tensor_value_info(name))
        return self.model


def build_fixed(plan: Plan, config, extra_outputs: list[str] = ()) -> onnx.ModelProto:
    """The fixed-precision model of one configuration (bit-width per group), standard ops only."""
    w = _Writer(plan)
    biases = plan.biases_for(config)
    w.fixed_layer(plan.stem, plan.max_bits, biases.get(plan.stem.name))
    for layer in plan.layers:
        w.fixed_layer(layer, int(config[layer.group]), biases.get(layer.name))
    return w.finish(extra_outputs)


def correct_biases(plan: Plan, config, images: np.ndarray) -> dict[str, np.ndarray]:
    """Empirical bias correction of one configuration (stored in ``plan.biases``):
    layer by layer in graph order, each bias moves so that the layer's mean output per
    channel on ``images``, in the network quantized at ``config`` with the biases
    corrected so far, equals the float model's.  The bit-widths share one set of
    weights, so rounding and clipping shift each configuration's means differently;
    the shift adds up along the network, and a bias per configuration (a few floats
    per layer) takes it out.  Each layer's mean sees its corrected predecessors, so
    one pass in order is exact for every layer."""
    key = config_key(config)
    order = {n.name: i for i, n in enumerate(plan.base.graph.node)}
    layers = sorted([plan.stem] + plan.layers, key=lambda l: order[l.name])
    outputs = {l.name: next(n for n in plan.base.graph.node if n.name == l.name).output[0] for l in layers}

    def channel_mean(v: np.ndarray) -> np.ndarray:
        return v.reshape(v.shape[0], v.shape[1], -1).mean(axis=(0, 2)).astype(np.float64)

    reference_out = _run(plan.base, images, list(outputs.values()))
    plan.biases[key] = {}
    for layer in layers:
        name = outputs[layer.name]
        got = _run(build_fixed(plan, config), images, [name])[name]
        current = plan.biases[key].get(layer.name, layer.bias).astype(np.float64)
        plan.biases[key][layer.name] = (current + channel_mean(reference_out[name]) - channel_mean(got)).astype(np.float32)
    return plan.biases[key]


def build_dynamic(plan: Plan, selector: Selector) -> onnx.ModelProto:
    """The dynamic model: stem, BitSelect, and every other layer at its group's bits."""
    schemas.register()
    w = _Writer(plan)
    w.fixed_layer(plan.stem, plan.max_bits)
    stem_idx, _ = w.node_of(plan.stem)
    # the selector right after the stem's activation
    feat_idx = next(i for i, n in enumerate(w.graph.node) if plan.features in n.output)
    config = w.name("config")
    sel = helper.make_node("BitSelect", [plan.features, w.const("selector/W1", selector.w1),
                                         w.const("selector/b1", selector.b1), w.const("selector/W2", selector.w2),
                                         w.const("selector/b2", selector.b2),
                                         w.const("selector/bits_table", plan.configs.astype(np.float32))],
                           [config, BITS_OUTPUT], domain=domain.DOMAIN, name=w.name("selector/BitSelect"))
    nodes = [sel]
    group_bits = []
    for g in range(len(plan.groups)):
        out = w.name(f"bits/group{g}")
        nodes.append(helper.make_node("Gather", [BITS_OUTPUT, w.const(f"bits/index{g}", np.int64(g))], [out],
                                      axis=1, name=w.name(f"bits/Gather{g}")))
        group_bits.append(out)
    for k, n in enumerate(nodes):
        w.graph.node.insert(feat_idx + 1 + k, n)
    cache: dict = {}
    for layer in plan.layers:
        w.dynamic_layer(layer, group_bits[layer.group], cache)
    model = w.finish()
    model.graph.output.append(helper.make_tensor_value_info(BITS_OUTPUT, TensorProto.FLOAT,
                                                            [_batch_dim(model), len(plan.groups)]))
    domain.add_opset_import(model)
    functions.attach(model, plan.candidates)
    meta = {"candidates": list(plan.candidates), "groups": plan.groups, "group_macs": plan.group_macs.tolist(),
            "configs": plan.configs.astype(int).tolist(), "stem": plan.stem.name, "stem_bits": plan.max_bits,
            "bits_output": BITS_OUTPUT}
    model.metadata_props.append(onnx.StringStringEntryProto(key=METADATA_KEY, value=json.dumps(meta)))
    return model


def confidence_features(logits: np.ndarray) -> np.ndarray:
    """What the cascade's selector reads: the first pass's margin, its largest logit
    minus the second largest, [n, 1] (as TopK, Slice and Sub compute it in the graph)."""
    top = -np.sort(-np.asarray(logits, np.float32), axis=1)
    return top[:, :1] - top[:, 1:2]


def _derived_weight(w: _Writer, layer: DynLayer, bits: int, w_int: str, prefix: str) -> tuple[list, str]:
    """Standard ops computing the layer's weight at ``bits`` from its stored integers
    (``reference.derive_weight``, same operations in the same order); every input is
    a constant, so onnxruntime folds them once at load and nothing is stored twice."""
    p = f"{prefix}{layer.name}/w{bits}"
    o = layer.w_int.shape[0]
    col = lambda name, v: w.const(f"{p}/{name}", np.asarray(v, np.float32).reshape(o, 1))  # noqa: E731
    ws, sc = col("w_scale", layer.w_scale), col("scale", layer.scale_table[bits])
    qmax = reference.weight_qmax(bits)
    t = [w.name(f"{p}/t{i}") for i in range(7)]
    out = w.name(p)
    mk = lambda op, ins, outs, **kw: helper.make_node(op, ins, outs, name=w.name(f"{p}/{op.lower()}"), **kw)  # noqa: E731
    nodes = [mk("Cast", [w_int], [t[0]], to=TensorProto.FLOAT),
             mk("Reshape", [t[0], w.const(f"{p}/flat", np.array([o, -1], np.int64))], [t[1]]),
             mk("Mul", [t[1], ws], [t[2]]),
             mk("Div", [t[2], sc], [t[3]]),
             mk("Round", [t[3]], [t[4]]),
             mk("Clip", [t[4], w.const(f"{p}/qmin", np.float32(-qmax)), w.const(f"{p}/qmax", np.float32(qmax))], [t[5]]),
             mk("Mul", [t[5], sc], [t[6]]),
             mk("Reshape", [t[6], w.const(f"{p}/shape", np.array(layer.w_int.shape, np.int64))], [out])]
    return nodes, out


def build_cascade(plan: Plan, selector: Selector) -> onnx.ModelProto:
    """The cascade model: the whole network at ``plan.configs[0]`` for every image, then
    ``BitSelect`` on the first pass's confidence picks, per image, to keep that result
    (configuration 0) or to run the network again at configuration k; the rows to
    rerun are gathered, run through the dynamic layers at their own bits, and
    scattered back into the first pass's logits.  Both passes read the same stored
    integers."""
    schemas.register()
    w = _Writer(plan)
    x_name, out_name = w.graph.input[0].name, w.graph.output[0].name
    orig = [onnx.NodeProto() for _ in w.graph.node]
    for dst, src in zip(orig, w.graph.node):
        dst.CopyFrom(src)
    first_cfg = plan.configs[0]
    first_biases = plan.biases_for(first_cfg)
    # every rerun row runs at the last configuration (fit_cascade keeps two): its biases
    rerun_biases = plan.biases_for(plan.configs[-1]) if len(plan.configs) == 2 else {}

    # ---- the rerun: the network at per-image bits, on the gathered rows (built in place)
    x2, bits2, config = w.name("rerun/input"), w.name("rerun/bits"), w.name("config")
    w.fixed_layer(plan.stem, plan.max_bits, rerun_biases.get(plan.stem.name))
    stem_w = w.node_of(plan.stem)[1].input[1]
    group_bits = [w.name(f"bits/group{g}") for g in range(len(plan.groups))]
    cache: dict = {}
    for layer in plan.layers:
        w.dynamic_layer(layer, group_bits[layer.group], cache, rerun_biases.get(layer.name))
    w_ints = {n.name: n.input[2] for n in w.graph.node if n.op_type in ("DynQConv", "DynQGemm")}
    biases = {n.name: n.input[5] for n in w.graph.node if n.op_type in ("DynQConv", "DynQGemm")}
    rerun_out = w.name("rerun/" + out_name)
    rerun = []
    for n in w.graph.node:
        m = onnx.NodeProto()
        m.CopyFrom(n)
        m.input[:] = [x2 if i == x_name else i for i in m.input]
        m.output[:] = [rerun_out if o == out_name else o for o in m.output]
        rerun.append(m)

    # ---- the first pass: a renamed copy of the float graph at the first configuration
    layers = {l.name: l for l in [plan.stem] + plan.layers}
    rename: dict[str, str] = {}
    first: list[onnx.NodeProto] = []
    first_bits: dict[str, int] = {}       # first-pass layer -> its bits (weights and input)
    for n in orig:
        ins = [rename.get(i, i) for i in n.input]
        for o in n.output:
            rename[o] = w.name("first/" + o)
        outs = [rename[o] for o in n.output]
        layer = layers.get(n.name)
        if layer is None:
            m = onnx.NodeProto()
            m.CopyFrom(n)
            m.name = w.name("first/" + n.name) if n.name else ""
            m.input[:], m.output[:] = ins, outs
            first.append(m)
            continue
        bits = plan.max_bits if layer is plan.stem else int(first_cfg[layer.group])
        layer_name = w.name("first/" + n.name)
        first_bits[layer_name] = bits
        q_nodes, xq = w.static_quant(layer, bits, x=ins[0], prefix="first/")
        first += q_nodes
        bias = None                        # None: the stored bias, which the rerun's layer reads too
        if layer.name in first_biases or (layer.name in rerun_biases and layer is not plan.stem):
            bias = w.const(f"first/{layer.name}/bias", first_biases.get(layer.name, layer.bias))
        if layer is plan.stem:
            m = onnx.NodeProto()
            m.CopyFrom(n)
            m.input[0], m.input[1] = xq, stem_w
            m.input[2:] = [bias] if bias is not None else ins[2:]
            m.name, m.output[:] = layer_name, outs
            first.append(m)
            continue
        w_nodes, wq = _derived_weight(w, layer, bits, w_ints[layer.name], "first/")
        first += w_nodes
        op_ins = [xq, wq, bias or biases[layer.name]]
        if layer.op == "Conv":
            first.append(helper.make_node("Conv", op_ins, outs, name=layer_name, **layer.attrs))
        else:
            first.append(helper.make_node("Gemm", op_ins, outs, name=layer_name, transB=1))
    first_out = rename[out_name]

    # ---- the choice: BitSelect on the margin (largest logit minus the second)
    top, top1, top2 = w.name("selector/top2"), w.name("selector/top1_logit"), w.name("selector/top2_logit")
    feats, mask, nz, idx = w.name("selector/margin"), w.name("rerun/mask"), w.name("rerun/nonzero"), w.name("rerun/rows")
    i0, i1, i2 = (w.const(f"selector/i{v}", np.array([v], np.int64)) for v in (0, 1, 2))
    zero = w.const("rerun/zero", np.int64(0))
    choose = [helper.make_node("TopK", [first_out, i2], [top, w.name("selector/top_index")], axis=1,
                               name=w.name("selector/TopK")),
              helper.make_node("Slice", [top, i0, i1, i1], [top1], name=w.name("selector/Slice1")),
              helper.make_node("Slice", [top, i1, i2, i1], [top2], name=w.name("selector/Slice2")),
              helper.make_node("Sub", [top1, top2], [feats], name=w.name("selector/margin")),
              helper.make_node("BitSelect", [feats, w.const("selector/W1", selector.w1),
                                             w.const("selector/b1", selector.b1), w.const("selector/W2", selector.w2),
                                             w.const("selector/b2", selector.b2),
                                             w.const("selector/bits_table", plan.configs.astype(np.float32))],
                               [config, BITS_OUTPUT], domain=domain.DOMAIN, name=w.name("selector/BitSelect")),
              helper.make_node("Greater", [config, zero], [mask], name=w.name("rerun/Greater")),
              helper.make_node("NonZero", [mask], [nz], name=w.name("rerun/NonZero")),
              helper.make_node("Reshape", [nz, w.const("rerun/flat", np.array([-1], np.int64))], [idx],
                               name=w.name("rerun/Reshape"))]
    # ---- the rerun, only when some row needs it: user graphs need not accept an empty
    # batch (a Reshape to [0, -1] of no elements is invalid), so it sits in an If whose
    # other branch gives no rows (an empty slice of the first pass: a branch may not
    # return an outer value as it is); the scatter of no rows keeps the first pass
    gather = [helper.make_node("Gather", [x_name, idx], [x2], axis=0, name=w.name("rerun/GatherInput")),
              helper.make_node("Gather", [BITS_OUTPUT, idx], [bits2], axis=0, name=w.name("rerun/GatherBits"))]
    gather += [helper.make_node("Gather", [bits2, w.const(f"bits/index{g}", np.int64(g))], [gb], axis=1,
                                name=w.name(f"bits/Gather{g}")) for g, gb in enumerate(group_bits)]
    cond, n_rows, none = w.name("rerun/any"), w.name("rerun/count"), w.name("rerun/no_rows")
    updates, idx_col = w.name("rerun/updates"), w.name("rerun/rows_col")
    then_graph = helper.make_graph(gather + rerun, "rerun", [],
                                   [helper.make_tensor_value_info(rerun_out, TensorProto.FLOAT, None)])
    else_graph = helper.make_graph([helper.make_node("Slice", [first_out, i0, i0, i0], [none])], "keep", [],
                                   [helper.make_tensor_value_info(none, TensorProto.FLOAT, None)])
    branch = [helper.make_node("Size", [idx], [n_rows], name=w.name("rerun/Size")),
              helper.make_node("Greater", [n_rows, zero], [cond], name=w.name("rerun/GreaterCount")),
              helper.make_node("If", [cond], [updates], then_branch=then_graph, else_branch=else_graph,
                               name=w.name("rerun/If")),
              helper.make_node("Reshape", [idx, w.const("rerun/col", np.array([-1, 1], np.int64))], [idx_col],
                               name=w.name("rerun/ReshapeRows")),
              helper.make_node("ScatterND", [first_out, idx_col, updates], [out_name],
                               name=w.name("rerun/ScatterND"))]
    del w.graph.node[:]
    w.graph.node.extend(first + choose + branch)
    del w.graph.value_info[:]          # the rerun's values have the rerun's batch, not the input's
    model = w.finish()
    model.graph.output.append(helper.make_tensor_value_info(BITS_OUTPUT, TensorProto.FLOAT,
                                                            [_batch_dim(model), len(plan.groups)]))
    domain.add_opset_import(model)
    functions.attach(model, plan.candidates)
    meta = {"mode": "cascade", "candidates": list(plan.candidates), "groups": plan.groups,
            "group_macs": plan.group_macs.tolist(), "configs": plan.configs.astype(int).tolist(),
            "config_bops": [int(b) for b in plan.bops(plan.configs)], "stem": plan.stem.name,
            "stem_bits": plan.max_bits, "bits_output": BITS_OUTPUT,
            "first_output": first_out, "first_layers": first_bits, "rerun_input": x2, "rerun_bits": bits2, "rerun_output": rerun_out}
    model.metadata_props.append(onnx.StringStringEntryProto(key=METADATA_KEY, value=json.dumps(meta)))
    return model


def _batch_dim(model: onnx.ModelProto):
    dims = model.graph.input[0].type.tensor_type.shape.dim
    if dims and dims[0].dim_param:
        return dims[0].dim_param
    if dims and dims[0].dim_value:
        return dims[0].dim_value
    return "N"


# ------------------------------------------------------------------ training
def _config_losses(fp_logits: np.ndarray, logits: np.ndarray) -> np.ndarray:
    """CE to the float model's class + KL(FP ‖ config), per image: [n].  An output that
    is not one score per class (a feature map, boxes) gets its error instead: the mean
    squared difference over the float output's mean square."""
    if fp_logits.ndim != 2:
        fp = fp_logits.reshape(len(fp_logits), -1).astype(np.float64)
        err = ((logits.reshape(len(logits), -1) - fp) ** 2).mean(axis=1)
        return err / max(float((fp ** 2).mean()), 1e-12)

    def log_softmax(z):
        z = z - z.max(axis=1, keepdims=True)
        return z - np.log(np.exp(z).sum(axis=1, keepdims=True))

    lp, lq = log_softmax(fp_logits.astype(np.float64)), log_softmax(logits.astype(np.float64))
    ce = -lq[np.arange(len(lq)), fp_logits.argmax(axis=1)]
    kl = (np.exp(lp) * (lp - lq)).sum(axis=1)
    return ce + kl


def simulate(plan: Plan, configs: np.ndarray, images: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(per-config logits [K, n, classes], float logits [n, classes], pooled stem features [n, C])."""
    out_name = plan.base.graph.output[0].name
    fp = _run(plan.base, images, [out_name])[out_name]
    logits, pooled = [], None
    for cfg in configs:
        model = build_fixed(plan, cfg, extra_outputs=[plan.features] if pooled is None else [])
        names = [out_name] + ([plan.features] if pooled is None else [])
        res = _run(model, images, names)
        if pooled is None:
            f = res[plan.features]
            pooled = f.reshape(f.shape[0], f.shape[1], -1).mean(axis=2).astype(np.float32)
        logits.append(res[out_name])
    return np.stack(logits), fp, pooled


def enumerate_configs(candidates: tuple[int, ...], n_groups: int) -> np.ndarray:
    combos = list(itertools.product(candidates, repeat=n_groups))
    if len(combos) > MAX_ENUMERATED:
        combos = [(b,) * n_groups for b in candidates]
        for b in candidates:
            for g in range(n_groups):
                for c in candidates:
                    if c != b:
                        cfg = [b] * n_groups
                        cfg[g] = c
                        combos.append(tuple(cfg))
        combos = sorted(set(combos))
    return np.array(combos, np.float32)


def pareto(avg_bits: np.ndarray, loss: np.ndarray, limit: int = MAX_CONFIGS) -> list[int]:
    """Indices on the (bits ↓, loss ↓) front, thinned to ``limit`` keeping both ends."""
    order = np.lexsort((loss, avg_bits))
    front, best = [], np.inf
    for i in order:
        if loss[i] < best - 1e-12:
            front.append(int(i))
            best = loss[i]
    if len(front) > limit:
        keep = np.unique(np.round(np.linspace(0, len(front) - 1, limit)).astype(int))
        front = [front[k] for k in keep]
    return front


def train_selector(pooled: np.ndarray, losses: np.ndarray, cfg_bits: np.ndarray, target: float, *,
                   steps: int, seed: int = 0) -> Selector:
    """Hard Gumbel-softmax (straight-through) on fixed per-config losses [n, K]."""
    import torch

    torch.manual_seed(seed)
    mu, sd = pooled.mean(axis=0), pooled.std(axis=0) + 1e-6
    x = torch.from_numpy(((pooled - mu) / sd).astype(np.float32))
    L = torch.from_numpy(losses.astype(np.float32))
    bits = torch.from_numpy(cfg_bits.astype(np.float32))
    C, K = x.shape[1], L.shape[1]
    net = torch.nn.Sequential(torch.nn.Linear(C, HIDDEN), torch.nn.ReLU(), torch.nn.Linear(HIDDEN, K))
    opt = torch.optim.Adam(net.parameters(), lr=SELECTOR_LR)
    for step in range(max(1, steps)):
        tau = max(0.3, 1.0 - step / max(1, steps))
        onehot = torch.nn.functional.gumbel_softmax(net(x), tau=tau, hard=True)
        task = (onehot * L).sum(dim=1).mean()
        mean_bits = (onehot @ bits).mean()
        loss = task + PENALTY * torch.relu(mean_bits - target)
        opt.zero_grad()
        loss.backward()
        opt.step()
    w1 = net[0].weight.detach().numpy().T.astype(np.float64)
    b1 = net[0].bias.detach().numpy().astype(np.float64)
    # fold the feature standardisation into the first layer
    w1_f = w1 / sd[:, None]
    b1_f = b1 - (mu / sd) @ w1
    return Selector(w1=w1_f.astype(np.float32), b1=b1_f.astype(np.float32),
                    w2=net[2].weight.detach().numpy().T.astype(np.float32),
                    b2=net[2].bias.detach().numpy().astype(np.float32))


@dataclass
class Cascade:
    """The cascade's choice: ``configs[0]`` runs first, choice k > 0 reruns at ``configs[k]``."""

    selector: Selector
    configs: list[int]              # indices into the simulated configurations
    cost_bits: np.ndarray           # [K]: average bits an image costs at each choice (both passes)
    price: float


def _threshold_selector() -> Selector:
    """Rerun when the margin is below a threshold: choice scores (0, −margin), the
    threshold is the price :func:`calibrate_price` folds into the bias."""
    return Selector(w1=np.ones((1, 1), np.float32), b1=np.zeros(1, np.float32),
                    w2=np.array([[0.0, -1.0]], np.float32), b2=np.zeros(2, np.float32))


def fit_cascade(logits: np.ndarray, losses: np.ndarray, avg: np.ndarray, train_idx: np.ndarray,
                probe_idx: np.ndarray, price_idx: np.ndarray, target: float, *, steps: int,
                seed: int = 0) -> Cascade:
    """The pair (first, rerun) of simulated configurations, the first within ``target``
    and the rerun costlier, whose cascade has the lowest loss on all the probes
    (``probe_idx``) with a plain margin threshold priced to the target on
    ``price_idx`` (the confident probes); then the selector for that pair, trained on
    the first pass's margin (choices: keep, or rerun, which costs both passes) and
    priced the same way.  Scoring pairs on all the probes rather than on the confident
    ones alone: four times the images, and the hard ones are those a rerun is for
    (measured on ResNet-20 with two synthetic sets: +0.5 pt on average over the
    confident probes alone, and over searching only the Pareto front)."""
    best = None
    probe_losses = losses[probe_idx]
    rows = np.arange(len(probe_idx))
    for lo in np.flatnonzero(avg <= target + 1e-9):
        feats = confidence_features(logits[lo])
        for hi in np.flatnonzero(avg > avg[lo]):
            cost = np.array([avg[lo], avg[lo] + avg[hi]], np.float64)
            rule = _threshold_selector()
            calibrate_price(rule, feats[price_idx], cost, target)
            rerun = rule.choose(feats[probe_idx])
            loss = float(np.where(rerun > 0, probe_losses[rows, hi], probe_losses[rows, lo]).mean())
            if best is None or loss < best[0] - 1e-9:
                best = (loss, int(lo), int(hi))
    if best is None:          # target at the costliest configuration: nothing to rerun at
        lo = int(np.argmin(np.where(avg <= target + 1e-9, probe_losses.mean(axis=0), np.inf)))
        return Cascade(selector=_threshold_selector(), configs=[lo], cost_bits=np.array([avg[lo]]), price=0.0)
    _, lo, hi = best
    return fit_pair(logits, losses, avg, lo, hi, train_idx, price_idx, target, steps=steps, seed=seed)


def fit_pair(logits: np.ndarray, losses: np.ndarray, avg: np.ndarray, lo: int, hi: int, train_idx: np.ndarray,
             price_idx: np.ndarray, target: float, *, steps: int, seed: int = 0) -> Cascade:
    """The cascade (``lo`` first, ``hi`` rerun) with its selector trained on the first
    pass's margin and priced to ``target`` on ``price_idx``."""
    cost = np.array([avg[lo], avg[lo] + avg[hi]], np.float64)
    feats = confidence_features(logits[lo])
    selector = train_selector(feats[train_idx], losses[train_idx][:, [lo, hi]], cost, target, steps=steps, seed=seed)
    mu = calibrate_price(selector, feats[price_idx], cost, target)
    return Cascade(selector=selector, configs=[lo, hi], cost_bits=cost, price=mu)


# ------------------------------------------------------------------- the pass
def _synthetic_images(model: ir.Model, synthetic, progress: ProgressFn) -> tuple[np.ndarray, np.ndarray | None]:
    if synthetic is None:
        from ..synth import generate

        defaults = Recipe()             # the set `compress --dynamic` makes, so both share the cache
        synthetic = generate(model, defaults.synthetic, steps=defaults.synthetic_steps, seed=0, progress=progress)
    images = np.asarray(getattr(synthetic, "images", synthetic), dtype=np.float32)
    if len(images) < 8:
        raise UserError(f"dynamic precision needs at least 8 synthetic images, got {len(images)}")
    return images, getattr(synthetic, "targets", None)


@dataclass
class DynamicResult:
    """Everything :func:`fit_dynamic` made: the model and what it was made from."""

    model: onnx.ModelProto
    plan: Plan
    selector: Selector
    stats: dict
    probe: np.ndarray                   # indices of the probes target_bits holds on
    images: np.ndarray                  # the synthetic images
    all_probes: np.ndarray | None = None   # every held-out image (a cascade's probe is its confident part)
    config_probe_loss: np.ndarray | None = None   # mean loss on all_probes of each enumerate_configs configuration
    train: np.ndarray | None = None     # indices of the images the plan (and any bias correction) was fitted on


def _split(images: np.ndarray, seed: int, augment: bool) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(images, train indices, probe indices): a quarter of the synthetic images held
    out as probes; with ``augment`` each part gains its own mirrored and shifted copies
    (:func:`synth.augmented`), so no copy of a probe image is trained on."""
    train_src, probe_src = _held_out(len(images), seed)
    probe, train = images[probe_src], images[train_src]
    if augment:
        from ..synth import augmented

        train, probe = augmented(train, seed), augmented(probe, seed + 1)
    both = np.ascontiguousarray(np.concatenate([train, probe]))
    return both, np.arange(len(train)), np.arange(len(train), len(both))


def _held_out(n_images: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """(training, probe) source images of :func:`_split`: a seeded quarter held out."""
    order = np.random.default_rng(seed).permutation(n_images)
    n_probe = max(4, int(round(n_images * PROBE_FRACTION)))
    return np.sort(order[n_probe:]), np.sort(order[:n_probe])


def _confident_probes(targets: np.ndarray | None, n_images: int, probe_idx: np.ndarray, seed: int) -> np.ndarray:
    """The probes made for a target at least ``CONFIDENT_TARGET`` sure (all probes when
    the images came without targets or fewer than 8 are that sure), in the order and
    with the copies of :func:`_split`."""
    if targets is None or len(targets) != n_images:
        return probe_idx
    _, probe_src = _held_out(n_images, seed)
    sure = np.asarray(targets).max(axis=1)[probe_src] >= CONFIDENT_TARGET
    sure = np.tile(sure, len(probe_idx) // len(probe_src))
    return probe_idx[sure] if sure.sum() >= 8 else probe_idx


def fit_dynamic(model: ir.Model, config: DynamicConfig, *, synthetic=None, progress: ProgressFn = silent,
                seed: int = 0, augment: bool = True) -> DynamicResult:
    """Plan, simulate, train and write the dynamic model (see :func:`apply_dynamic`)."""
    t0 = time.perf_counter()
    images, targets = _synthetic_images(model, synthetic, progress)
    t_synth = time.perf_counter() - t0
    n_images = len(images)
    images, train_idx, probe_idx = _split(images, seed, augment)
    all_probes = probe_idx
    progress(STAGE, 0, 4)

    plan = make_plan(model, config, images[train_idx])
    progress(STAGE, 1, 4)
    all_cfgs = enumerate_configs(plan.candidates, len(plan.groups))
    logits, fp, pooled = simulate(plan, all_cfgs, images)
    losses = np.stack([_config_losses(fp, lg) for lg in logits], axis=1)        # [n, K_all]
    avg = plan.avg_bits(all_cfgs)
    note = None
    if config.mode == "cascade" and not (len(plan.base.graph.output) == 1 and fp.ndim == 2 and fp.shape[1] >= 2):
        note = ("cascade needs one output of scores per class (it reruns on the margin between the two top "
                "scores): the selector reads the stem instead (upfront mode)")
        config = dataclasses.replace(config, mode="upfront")
    if config.mode == "cascade":        # target_bits holds on these (see fit_cascade)
        probe_idx = _confident_probes(targets, n_images, probe_idx, seed)
    keep = pareto(avg, losses[train_idx].mean(axis=0))
    plan.configs = all_cfgs[keep]
    cfg_bits = avg[keep]
    front = {"configs": [domain.config_label(c) for c in all_cfgs[keep]],
             "avg_bits": [round(float(b), 4) for b in cfg_bits],
             "bops": [int(b) for b in plan.bops(all_cfgs[keep])],
             "probe_loss": [round(float(v), 4) for v in losses[all_probes][:, keep].mean(axis=0)]}
    progress(STAGE, 2, 4)

    t_train, t_correct = time.perf_counter(), 0.0
    if config.mode == "cascade":
        cascade = fit_cascade(logits, losses, avg, train_idx, all_probes, probe_idx, config.target_bits,
                              steps=config.steps, seed=seed)
        if config.bias_correction:
            # each pass runs at one configuration: give it its own biases, then refit the
            # selector on the corrected first pass's margins (the threshold moves with them)
            t_correct = time.perf_counter()
            pair = list(cascade.configs)
            for k in pair:
                correct_biases(plan, all_cfgs[k], images[train_idx])
            corrected, _, _ = simulate(plan, all_cfgs[pair], images)
            t_correct = time.perf_counter() - t_correct
            for k, lg in zip(pair, corrected):
                logits[k], losses[:, k] = lg, _config_losses(fp, lg)
            if len(pair) == 2:
                cascade = fit_pair(logits, losses, avg, pair[0], pair[1], train_idx, probe_idx, config.target_bits,
                                   steps=config.steps, seed=seed)
        selector, mu, keep, cfg_bits = cascade.selector, cascade.price, cascade.configs, cascade.cost_bits
        plan.configs = all_cfgs[keep]
        features = confidence_features(logits[keep[0]])
    else:
        selector = train_selector(pooled[train_idx], losses[train_idx][:, keep], cfg_bits, config.target_bits,
                                  steps=config.steps, seed=seed)
        mu = calibrate_price(selector, pooled[probe_idx], cfg_bits, config.target_bits)
        features = pooled
    t_train = time.perf_counter() - t_train - t_correct
    progress(STAGE, 3, 4)

    proto = build_cascade(plan, selector) if config.mode == "cascade" else build_dynamic(plan, selector)
    choice = selector.choose(features[probe_idx])
    stats = _stats(plan, selector, choice, cfg_bits, losses[probe_idx][:, keep], fp[probe_idx],
                   logits[keep][:, probe_idx], mu, config)
    stats["front"] = front
    if config.mode == "cascade" and len(probe_idx) < len(all_probes):
        # the target is priced on the confident probes; the hard ones (spread targets) are rerun far more
        # often: what real inputs cost lies in between, nearer the confident end on ResNet-20 (see README)
        stats["expected_bits_all_probes"] = float(cfg_bits[selector.choose(features[all_probes])].mean())
        stats["all_probe_images"] = int(len(all_probes))
    if note:
        stats["note"] = note
    stats["seconds"] = {"synthetic": round(t_synth, 2), "selector_training": round(t_train, 2),
                        "bias_correction": round(t_correct, 2),
                        "total": round(time.perf_counter() - t0, 2)}
    progress(STAGE, 4, 4)
    return DynamicResult(model=proto, plan=plan, selector=selector, stats=stats, probe=probe_idx, images=images,
                         all_probes=all_probes, config_probe_loss=losses[all_probes].mean(axis=0), train=train_idx)


def apply_dynamic(model: ir.Model, config: DynamicConfig, *, synthetic=None,
                  progress: ProgressFn = silent, seed: int = 0, augment: bool = True) -> tuple[ir.Model, dict]:
    """The dynamic-precision model of ``model`` (not modified) and its statistics.

    ``synthetic``: a ``SyntheticSet`` (or an image array, NCHW float32 in the
    model's input space) to calibrate and train on; generated when None.  A quarter
    of it is held out as the probe set on which ``target_bits`` is met; with
    ``augment`` both parts gain mirrored and shifted copies.  Statistics:
    candidate configurations with their average bits / BOPs / probe loss, the
    histogram of chosen configurations and the expected average bits and BOPs on
    the probes, the selector's parameters / MACs / BOPs (and % of the model's).
    """
    result = fit_dynamic(model, config, synthetic=synthetic, progress=progress, seed=seed, augment=augment)
    return ir.serde.deserialize_model(result.model), result.stats


def selector_cost(plan: Plan, selector: Selector, spatial: int) -> dict:
    c, h = selector.w1.shape
    k = selector.w2.shape[1]
    macs = c * h + h * k
    return {"params": selector.params, "macs": int(macs), "pool_adds": int(c * spatial),
            "bops": int((macs + c * spatial) * 32 * 32)}


def _stats(plan: Plan, selector: Selector, choice: np.ndarray, cfg_bits: np.ndarray, probe_losses: np.ndarray,
           fp: np.ndarray, cfg_logits: np.ndarray, mu: float, config: DynamicConfig) -> dict:
    cascade = config.mode == "cascade"
    feat_shape = next((v.type.tensor_type.shape for v in plan.base.graph.value_info if v.name == plan.features), None)
    spatial = int(np.prod([d.dim_value for d in feat_shape.dim[2:]])) if feat_shape is not None and \
        all(d.dim_value for d in feat_shape.dim[2:]) and not cascade else 1
    cost = selector_cost(plan, selector, spatial)
    bops = plan.bops(plan.configs)
    first = plan.configs[0] if cascade else None
    labels = [domain.config_label(c, first) for c in plan.configs]
    extra = {}
    if cascade:          # choice k > 0 runs the network twice: at configs[0], then at configs[k]
        bops = np.concatenate([bops[:1], bops[0] + bops[1:]])
        extra = {"mode": "cascade", "rerun_fraction": float(np.mean(choice > 0)),
                 "first": domain.config_label(plan.configs[0]),
                 "rerun": domain.config_label(plan.configs[-1]) if len(plan.configs) > 1 else None}
    hist = {lab: int((choice == k).sum()) for k, lab in enumerate(labels)}
    agree = np.mean(cfg_logits[choice, np.arange(len(choice))].argmax(axis=1) == fp.argmax(axis=1))
    expected_bops = float(bops[choice].mean())
    return {
        "candidates": list(plan.candidates),
        "groups": plan.groups,
        "group_macs": plan.group_macs.astype(int).tolist(),
        "configs": labels,
        "config_avg_bits": [round(float(b), 4) for b in cfg_bits],
        "config_bops": [int(b) for b in bops],
        "config_probe_loss": [round(float(v), 4) for v in probe_losses.mean(axis=0)],
        "target_bits": float(config.target_bits),
        "probe_images": int(len(choice)),
        "histogram": hist,
        "expected_bits": float(cfg_bits[choice].mean()),
        "expected_bops": expected_bops,
        "probe_agreement_with_float": float(agree),
        "price_per_bit": float(mu),
        "selector": {**cost, "bops_pct_of_model": 100.0 * cost["bops"] / expected_bops},
        **extra,
    }
