"""Dynamic precision, the plan: which layers, in which groups, with which candidate weights and ranges."""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import onnx
import onnx_ir as ir
import onnxruntime as ort
from onnx import helper

from datafree.ops import domain, reference

from ... import device as dev
from ...errors import NotCompressible, UserError
from ...graph import Layer, analyse
from ...quant import act_qparams, kernel_bits, quantize_weight, weight_qmax, weight_scales
from ...recipe import DynamicConfig
from ...stats import mse_range
from .. import fit
from ..fold import fold_batchnorm


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
class ActTable:
    """One dynamic layer's input quantizer at each candidate bit-width (the static path's
    is ``qdq.ActQuant``, one bit-width)."""
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
    act: ActTable | None = None
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
    out_acts: dict = field(default_factory=dict)  # layer input or output -> (scale, zero point, signed), 8 bits
                                         # (the integer form's residual streams; cascade plans only)
    integer: bool = True                 # configurations in the integer-kernel form (integer.py; the
                                         # cascade's), else fake-quantized in float (the upfront model's)

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


def _group_of(layers: list[Layer], mode: str, positions: dict[str, int] | None = None) -> list[int]:
    """Group per layer: by output size ("stage") or into ``mode`` groups of about equal MACs,
    counted at the input size assumed where shapes are symbolic (``positions``)."""
    if mode == "stage":
        sizes = [l.spatial_at(positions) if l.op == "Conv" else None for l in layers]
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
    macs = np.array([l.macs(positions) or 1 for l in layers], np.float64)
    cum = (np.cumsum(macs) - macs / 2) / macs.sum()
    return [min(int(c * n), n - 1) for c in cum]


def _weights(layer: Layer, candidates: tuple[int, ...], x: np.ndarray | None = None,
             runs_at: tuple[int, ...] | None = None) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(int8 weights at the top bit-width, their scale, the per-bit scale table).
    With the layer's input ``x`` the integers are nested GPTQ solutions for the
    bit-widths the layer ``runs_at`` (default: every candidate; see the module
    docstring), otherwise rounded to nearest.  Every configuration runs on integer
    kernels, so 8-bit weights keep the range x86 kernels without VNNI do not saturate
    (``quant.kernel_bits``): their scale is that of ``KERNEL_SAFE_BITS`` bits."""
    w = layer.w_oc().astype(np.float32)
    top = max(candidates)
    table = np.ones((top + 1, w.shape[0]), np.float32)
    for b in candidates:
        table[b] = weight_scales(w, kernel_bits(b, abits=8, kind=layer.kind))   # every configuration quantizes its inputs
    gram = fit.input_gram(layer, dev.tensor(np.ascontiguousarray(x, np.float32))) if x is not None else None
    if gram is None:
        q = quantize_weight(w, top, table[top])[0]
    else:
        scales = {b: dev.tensor(table[b].astype(np.float64)) for b in (runs_at or candidates)}
        q = dev.numpy(fit.nested_gptq(dev.tensor(w.reshape(w.shape[0], -1).astype(np.float64)), gram, scales))
    safe = weight_qmax(kernel_bits(top, abits=8, kind=layer.kind))      # GPTQ's error feedback may step past it
    return np.clip(q, -safe, safe).reshape(w.shape).astype(np.int8), table[top], table


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
        l.act = ActTable(scale=scale, zero_point=zp, signed=signed)


def run_values(model: onnx.ModelProto, images: np.ndarray, outputs: list[str], feeds: dict | None = None,
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


def make_plan(model: ir.Model, config: DynamicConfig, images: np.ndarray,
              positions: dict[str, int] | None = None) -> Plan:
    """Fold BN, choose the stem and groups, quantize weights, calibrate activations.
    ``positions``: output positions per layer at the input size assumed, where shapes are
    symbolic (groups and bit costs weigh layers by their MACs)."""
    candidates = tuple(int(b) for b in config.bits)
    folded = _fold(ir.serde.deserialize_model(ir.serde.serialize_model(model)))
    analysis = analyse(folded)
    layers = [l for l in analysis.layers if l.op in ("Conv", "Gemm") and _usable(l)]
    if len(layers) < 2:
        raise NotCompressible("dynamic precision needs at least two Conv/Gemm layers with constant weights")
    stem, rest = layers[0], layers[1:]
    groups = _group_of(rest, config.groups, positions)
    n_groups = max(groups) + 1

    base = ir.serde.serialize_model(folded)
    integer = config.mode == "cascade"
    inputs = {l.node.inputs[0].name for l in layers}
    outputs = {l.output.name for l in layers if not l.output.is_graph_output()} if integer else set()
    acts = run_values(base, images, sorted(inputs | outputs))

    def entry(layer: Layer, group: int) -> DynLayer:
        w_int, w_scale, table = _weights(layer, candidates, acts[layer.node.inputs[0].name],
                                         runs_at=(max(candidates),) if group < 0 else None)
        return DynLayer(name=layer.name, op=layer.op, group=group, input=layer.node.inputs[0].name,
                        w_int=w_int, w_scale=w_scale, scale_table=table, bias=layer.bias_array().astype(np.float32),
                        macs=int(layer.macs(positions) or 0), attrs=_conv_attrs(layer) if layer.op == "Conv" else {})

    dyn = [entry(l, g) for l, g in zip(rest, groups)]
    stem_entry = entry(stem, -1)
    _calibrate([stem_entry] + dyn, acts, candidates)
    group_macs = np.array([sum(l.macs for l in dyn if l.group == g) for g in range(n_groups)], np.float64)
    out_acts = {name: act_qparams(*mse_range(acts[name], 8), 8) for name in sorted(acts)} if integer else {}
    return Plan(candidates=candidates, stem=stem_entry, layers=dyn,
                groups=[[l.name for l in dyn if l.group == g] for g in range(n_groups)],
                group_macs=np.maximum(group_macs, 1.0), features=stem.output.name, base=base, out_acts=out_acts,
                integer=integer)


