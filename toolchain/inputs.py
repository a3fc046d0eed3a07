"""What input the model expects: its size where the export left it symbolic, and its value range.

Both are read from the model alone and printed first in the summary, because every
range fitted later depends on them.

**Size.** A dimension the model fixes is kept.  Where height or width is symbolic:
the exporter's metadata (``imgsz``, as ultralytics writes it), else a default —
224 x 224 for a free input; for a text line, four times the height as width.  A
text line is a fixed height with a free width, or a network that downsamples height
more than width (strides ``(2, 1)``, which keep the characters' sequence along the
width, as CRNN-style recognisers and line classifiers do); its height is 48, or
3/4 of the vertical stride where that is more (the last feature map about one row
high).  Sizes are rounded up to the largest stride the network applies (every
downsampling on the way, so upsample + Concat necks line up), and checked by running
the model once at that size.

**Value range.** Models expect ``[0, 1]``, ``[0, 255]``, ``[−1, 1]``, ImageNet
mean/std normalised, or Caffe's ``[0, 255]`` minus the mean.  For each convention,
procedural photographs (:mod:`.natural`) are mapped to it and run through the model,
and the outputs of its first convolutions are compared with what they are on the
inputs the model was trained on:

* with BatchNormalization kept, exactly: the first BN layers hold the running mean
  and variance of their input; the score is the mean over channels of
  ``log²(σ̂/σ) + ((μ̂ − μ)/σ)²``;
* with BN folded, each convolution's output *is* the BN output, whose per-channel
  standard deviation is ``|γ|`` and mean ``β``; trained networks keep ``|γ|`` near
  ``TYPICAL_STD`` (within a factor of a few) and ``|β|`` within a few ``|γ|``; the
  score is the median over channels of ``log²(σ̂ / TYPICAL_STD) + (μ̂/σ̂)² / Z_SPREAD²``.

The lowest score wins; a wrong scale (×255 or ÷255) scores orders of magnitude
worse, neighbouring conventions (``[0, 1]`` vs ``[−1, 1]`` vs ImageNet) differ by
a factor of 2–4 in scale and by their offset, which the first layers see directly.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass

import numpy as np
import onnx_ir as ir

from .errors import UserError, format_dims

DEFAULT_SIZE = 224
TEXT_LINE_ASPECT = 4          # fixed height, free width: width = this x height
TEXT_LINE_HEIGHT = 48         # free height and width, height downsampled more than width (a text line)
PROBE_IMAGES = 12             # at 224 x 224; smaller inputs get more, up to PROBE_MAX, for as many pixels
PROBE_MAX = 64
FIRST_LAYERS = 3              # convolutions whose outputs judge a range (the earliest ones)
TYPICAL_STD = 0.5             # |γ| of a trained BN layer, typically within a factor of a few
Z_SPREAD = 2.0                # |β| / |γ| of a trained BN layer, typically within this


@dataclass(frozen=True)
class Convention:
    """``x = (scale · u − mean) / std`` for a photograph ``u`` in [0, 1] (RGB)."""

    name: str
    scale: float
    mean: tuple[float, float, float]
    std: tuple[float, float, float]
    standardised: bool = False      # zero mean, unit variance per channel, roughly

    def apply(self, u: np.ndarray) -> np.ndarray:
        c = u.shape[1]
        mean = np.resize(np.asarray(self.mean, np.float32), c)[:, None, None]
        std = np.resize(np.asarray(self.std, np.float32), c)[:, None, None]
        return ((u * self.scale - mean) / std).astype(np.float32)

    def moments(self) -> tuple[float, float]:
        """Mean and standard deviation of a typical photograph (mean 0.45, std 0.25) in this range."""
        m = float(np.mean([(0.45 * self.scale - a) / s for a, s in zip(self.mean, self.std)]))
        s = float(np.mean([0.25 * self.scale / s for s in self.std]))
        return m, s


CONVENTIONS = {c.name: c for c in (
    Convention("0..1", 1.0, (0.0, 0.0, 0.0), (1.0, 1.0, 1.0)),
    Convention("0..255", 255.0, (0.0, 0.0, 0.0), (1.0, 1.0, 1.0)),
    Convention("-1..1", 1.0, (0.5, 0.5, 0.5), (0.5, 0.5, 0.5)),
    Convention("imagenet", 1.0, (0.485, 0.456, 0.406), (0.229, 0.224, 0.225), standardised=True),
    Convention("caffe", 255.0, (123.675, 116.28, 103.53), (1.0, 1.0, 1.0)),
)}


@dataclass
class InputSpec:
    shape: tuple[int, ...]          # one sample, no batch axis
    shape_reason: str
    convention: Convention | None   # None: not an image input (no range inferred)
    range_reason: str
    scores: dict[str, float]

    def summary_line(self) -> str:
        rng = (f"values {self.convention.name} ({self.range_reason})" if self.convention is not None
               else f"values as given ({self.range_reason})")
        return f"input assumed: {format_dims([1, *self.shape])} ({self.shape_reason}); {rng}"


# ----------------------------------------------------------------------------- size
def infer_shape(model: ir.Model, given: tuple[int, ...] | None = None) -> tuple[tuple[int, ...], str]:
    """One sample's shape and where it came from (``given`` is checked against the model)."""
    from .synth import sample_shape

    if given is not None:
        return sample_shape(model, given), "as given"
    value = model.graph.inputs[0]
    dims = list(value.shape) if value.shape is not None else None
    if dims is not None and all(isinstance(d, int) for d in dims[1:]):
        return tuple(int(d) for d in dims[1:]), "fixed by the model"
    if dims is None or len(dims) != 4:
        raise UserError(f"input {value.name!r} has symbolic size {format_dims(dims or [])} and is not an image "
                        "(N, C, H, W): give its size (input_shape, --input-shape)")
    c = dims[1] if isinstance(dims[1], int) else 3
    h, w = (d if isinstance(d, int) else None for d in dims[2:])
    meta = _metadata_size(model)
    if meta is not None and h is None and w is None:
        return (c, *meta), "the exporter's imgsz metadata"
    sh, sw = network_strides(model)
    stride = max(sh, sw)
    if h is None and w is None and sh > sw:
        h = max(TEXT_LINE_HEIGHT, _round_up(sh * 3 // 4, 16))
        w = _round_up(TEXT_LINE_ASPECT * h, sw)
        reason = (f"symbolic height and width, a text line (the network downsamples height {sh}x, width {sw}x): "
                  f"{h} x {w}")
    elif h is None and w is None:
        side = _round_up(DEFAULT_SIZE, stride)
        h = w = side
        reason = f"symbolic height and width: {side} x {side}, a multiple of the network's stride {stride}"
    elif w is None:
        w = _round_up(TEXT_LINE_ASPECT * h, stride)
        reason = f"symbolic width: {TEXT_LINE_ASPECT} x the fixed height, a multiple of the stride {stride}"
    else:
        h = _round_up(w, stride)
        reason = f"symbolic height: the fixed width, a multiple of the stride {stride}"
    return (c, h, w), reason


# sizes tried, in order, when the first choice does not run (a graph that fixes its size)
FALLBACK_SIZES = ((48, 192), (32, 128), (64, 256), (48, 320), (256, 256), (320, 320), (416, 416), (640, 640))


def _runnable(model: ir.Model, shape: tuple[int, ...], reason: str, tries: int = 3) -> tuple[tuple[int, ...], str]:
    """``shape``, or the first of a few larger multiples of the network's stride, then of the
    common sizes (text lines, detector squares), that the model runs at: a graph can fix its
    size where the stride read from it does not say so (a Reshape to a fixed grid)."""
    import onnxruntime as ort

    opts = ort.SessionOptions()
    opts.log_severity_level = 4
    try:
        sess = ort.InferenceSession(ir.serde.serialize_model(model).SerializeToString(), opts,
                                    providers=["CPUExecutionProvider"])
    except Exception:   # a model onnxruntime cannot load is reported where it is run
        return shape, reason
    step = network_stride(model)
    fixed = {i: d for i, d in enumerate(model.graph.inputs[0].shape[2:]) if isinstance(d, int)}
    trials = [tuple(d + k * step for d in shape[1:]) for k in range(tries)]
    trials += [hw for hw in FALLBACK_SIZES if all(hw[i] == d for i, d in fixed.items())]
    for k, hw in enumerate(trials):
        try:
            sess.run(None, {sess.get_inputs()[0].name: np.zeros((fixed_batch(model) or 1, shape[0], *hw), np.float32)})
        except Exception:
            continue
        return (shape[0], *hw), reason if k == 0 else f"{reason}, but the model runs first at {hw[0]} x {hw[1]}"
    raise UserError(f"the model does not run at {format_dims([1, *shape])} nor at the other sizes tried: "
                    "give its input size (input_shape, --input-shape)")


def _round_up(n: int, k: int) -> int:
    return int(math.ceil(n / k) * k)


def _metadata_size(model: ir.Model) -> tuple[int, int] | None:
    """``imgsz`` from the model's metadata (``[640, 640]``, ``640``), where the exporter wrote it."""
    for key, text in model.metadata_props.items():
        if key.lower() not in ("imgsz", "img_size", "image_size", "input_size"):
            continue
        numbers = [int(v) for v in re.findall(r"\d+", str(text))]
        if len(numbers) == 1:
            return numbers[0], numbers[0]
        if len(numbers) >= 2:
            return numbers[-2], numbers[-1]
    return None


def network_stride(model: ir.Model) -> int:
    """The largest total downsampling from the input to any value, on either axis."""
    return max(network_strides(model))


def network_strides(model: ir.Model) -> tuple[int, int]:
    """The largest total downsampling from the input to any value (Conv / pool strides, less
    what Resize / Upsample / ConvTranspose scale back up), per axis (height, width), each a
    power of two at least 1."""
    stride: dict[int, tuple[float, float]] = {id(model.graph.inputs[0]): (1.0, 1.0)}
    best = [1.0, 1.0]
    for node in model.graph:
        ins = [stride.get(id(v)) for v in node.inputs if v is not None]
        ins = [s for s in ins if s is not None]
        if not ins:
            continue
        s = [max(i[0] for i in ins), max(i[1] for i in ins)]
        if node.op_type in ("Conv", "MaxPool", "AveragePool", "LpPool", "ConvTranspose"):
            a = node.attributes.get("strides")
            if a is not None and len(a.value) == 2:
                f = [float(v) for v in a.value]
                s = [s[0] / f[0], s[1] / f[1]] if node.op_type == "ConvTranspose" else [s[0] * f[0], s[1] * f[1]]
        elif node.op_type in ("Resize", "Upsample"):
            scales = [v.const_value.numpy() for v in node.inputs[1:] if v is not None and v.const_value is not None
                      and v.const_value.numpy().dtype.kind == "f" and v.const_value.numpy().size >= 3]
            if scales and scales[-1].size >= 4:
                s = [s[0] / max(float(scales[-1][-2]), 1.0), s[1] / max(float(scales[-1][-1]), 1.0)]
        elif node.op_type in ("GlobalAveragePool", "GlobalMaxPool", "Flatten", "Reshape"):
            continue
        best = [max(best[0], s[0]), max(best[1], s[1])]
        for out in node.outputs:
            stride[id(out)] = (s[0], s[1])
    h, w = (1 << max(0, int(round(math.log2(b)))) for b in best)
    return h, w


# ---------------------------------------------------------------------------- range
def parse_convention(text: str | None) -> Convention | None:
    if text is None:
        return None
    if text in CONVENTIONS:
        return CONVENTIONS[text]
    raise UserError(f"input_range must be one of {', '.join(CONVENTIONS)}, got {text!r}")


def is_image(model: ir.Model, shape: tuple[int, ...]) -> bool:
    inputs = list(model.graph.inputs)
    return (len(inputs) == 1 and inputs[0].dtype in (None, ir.DataType.FLOAT) and len(shape) == 3
            and shape[0] in (1, 3, 4) and min(shape[1:]) >= 8)


def infer_range(model: ir.Model, shape: tuple[int, ...], seed: int = 0) -> tuple[Convention, str, dict[str, float]]:
    """The convention whose photographs make the first layers look most like training did."""
    from . import natural

    session, bn = _probe_session(model)
    if session is None:
        return CONVENTIONS["0..1"], "no convolution to judge by: the most common range assumed", {}
    count = int(np.clip(PROBE_IMAGES * DEFAULT_SIZE ** 2 // (shape[1] * shape[2]), PROBE_IMAGES, PROBE_MAX))
    u = natural.images(count, shape, seed, text_share=0.0, soft_share=0.0)
    scores = {}
    batch = fixed_batch(model) or len(u)
    for name, conv in CONVENTIONS.items():
        x = conv.apply(u)
        runs = [session.run(None, {session.get_inputs()[0].name: x[k:k + batch]})
                for k in range(0, len(x) - batch + 1, batch)]
        scores[name] = _score([np.concatenate(outs) for outs in zip(*runs)], bn)
    best = min(scores, key=scores.get)
    ranked = sorted(scores.values())
    margin = ranked[1] / max(ranked[0], 1e-9) if len(ranked) > 1 else float("inf")
    how = "BatchNormalization statistics of the first layers" if bn else "first layers' output statistics"
    return CONVENTIONS[best], f"inferred from the {how}, {margin:.1f}x better than the next", scores


def fixed_batch(model: ir.Model) -> int | None:
    """The input's batch size where the export fixed it (such models are run at it)."""
    dims = model.graph.inputs[0].shape
    return int(dims[0]) if dims is not None and len(dims) and isinstance(dims[0], int) else None


def _probe_session(model: ir.Model):
    """A session whose outputs are the first convolutions' outputs (or their BN inputs and
    running statistics where BN is kept)."""
    import onnx
    import onnxruntime as ort

    proto = ir.serde.serialize_model(model)
    firsts, bn = [], []
    for node in proto.graph.node:
        if node.op_type in ("Conv", "ConvTranspose") and len(firsts) < FIRST_LAYERS:
            firsts.append(node.output[0])
    consts = {t.name: t for t in proto.graph.initializer}
    for node in proto.graph.node:
        if node.op_type == "BatchNormalization" and node.input[0] in firsts and all(i in consts for i in node.input[3:5]):
            mean = onnx.numpy_helper.to_array(consts[node.input[3]])
            var = onnx.numpy_helper.to_array(consts[node.input[4]])
            bn.append((node.input[0], mean, np.sqrt(var + 1e-5)))
    names = [b[0] for b in bn] if bn else firsts
    if not names:
        return None, []
    del proto.graph.output[:]
    for name in names:
        proto.graph.output.append(onnx.helper.make_empty_tensor_value_info(name))
    opts = ort.SessionOptions()
    opts.log_severity_level = 3
    sess = ort.InferenceSession(proto.SerializeToString(), opts, providers=["CPUExecutionProvider"])
    return sess, [(m, s) for _, m, s in bn]


def _score(outs: list[np.ndarray], bn: list[tuple[np.ndarray, np.ndarray]]) -> float:
    per_layer = []
    for k, y in enumerate(outs):
        y = y.astype(np.float64)
        axes = (0,) + tuple(range(2, y.ndim))
        mean, std = y.mean(axis=axes), y.std(axis=axes) + 1e-6
        if bn:
            m, s = bn[k]
            per_layer.append(float(np.mean(np.log(std / s) ** 2 + ((mean - m) / s) ** 2)))
        else:
            per_layer.append(float(np.median(np.log(std / TYPICAL_STD) ** 2 + (mean / std / Z_SPREAD) ** 2)))
    if not per_layer or not all(np.isfinite(per_layer)):
        return float("inf")
    return float(np.mean(per_layer))


def describe(spec: InputSpec) -> dict:
    return {"shape": list(spec.shape), "shape_reason": spec.shape_reason,
            "range": spec.convention.name if spec.convention else None, "range_reason": spec.range_reason,
            "range_scores": {k: round(v, 4) for k, v in spec.scores.items()}}


def resolve(model: ir.Model, input_shape: tuple[int, ...] | None = None, input_range: str | None = None,
            seed: int = 0) -> InputSpec:
    """The input size and range the compressor assumes (given, read from the model, or inferred)."""
    shape, shape_reason = infer_shape(model, input_shape)
    if shape_reason not in ("as given", "fixed by the model"):
        shape, shape_reason = _runnable(model, shape, shape_reason)
    if input_range is not None:
        return InputSpec(shape, shape_reason, parse_convention(input_range), "as given", {})
    if not is_image(model, shape):
        return InputSpec(shape, shape_reason, None, "not a one-image input", {})
    conv, reason, scores = infer_range(model, shape, seed)
    return InputSpec(shape, shape_reason, conv, reason, scores)


__all__ = ["CONVENTIONS", "Convention", "InputSpec", "resolve", "infer_shape", "infer_range", "network_stride",
           "network_strides",
           "describe"]
