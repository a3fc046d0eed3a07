"""datafree next to its peers: the same model, the same images, one run.

    python benchmarks/peers.py [--model M.onnx] [--images I.npz] [--quick]

Methods: datafree (W8A8, W4A8, prune 0.3 + W4A8; no data), onnxruntime
``quantize_dynamic`` (no data), ``quantize_static`` calibrated on Gaussian noise (no
data) and on the first 256 real images (the data-using reference), and NNCF's
data-free weight compression when NNCF is installed.

Accuracy is top-1 on the images *after* the first 256, for every method, so the
reference's calibration images are never scored; "same as FP32" is the share of those
images on which a model predicts what the float model predicts (a steadier measure of
how faithfully it was compressed than top-1 on a few hundred images).  Also measured:
file size, MACs and BOPs per image (``datafree.toolchain.report.cost``), onnxruntime
CPU latency at batch 1 and 64 (median), and the wall time each method took to make
its model.
Prints a table and writes it as markdown to ``benchmarks/results/peers.md``.
"""

from __future__ import annotations

import argparse
import os
import platform
import tempfile
import time
import traceback
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import numpy as np
import onnx
import onnxruntime as ort

ROOT = Path(__file__).resolve().parent.parent
DEFAULT_MODEL = ROOT / "examples" / "models" / "resnet20_bn.onnx"
SHARED_IMAGES = ROOT.parent / "shared" / "data" / "cifar10_dev.npz"
BUNDLED_IMAGES = ROOT / "examples" / "data" / "cifar10_dev500.npz"
RESULTS = ROOT / "benchmarks" / "results" / "peers.md"
CALIBRATION = 256


@dataclass
class Row:
    method: str
    data: str
    path: Path | None = None
    wall: float | None = None
    top1: float | None = None
    agree: float | None = None      # predictions equal to the float model's
    logit_err: float | None = None  # |z - z_float|^2 / |z_float|^2 over the scored images
    size: int | None = None
    macs: float | None = None
    bops: float | None = None
    bops_note: str = ""
    lat1: float | None = None
    lat64: float | None = None
    error: str = ""


# ----------------------------------------------------------------- inputs
def load_images(path: Path) -> tuple[np.ndarray, np.ndarray]:
    d = np.load(path)
    x = (d["images"].astype(np.float32) / 255.0 - d["mean"]) / d["std"]
    return np.ascontiguousarray(x.transpose(0, 3, 1, 2), dtype=np.float32), d["labels"]


def noise(n: int, shape: tuple[int, ...], seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).standard_normal((n, *shape)).astype(np.float32)


def session(model) -> ort.InferenceSession:
    """A quiet stock onnxruntime CPU session for a path or an in-memory ``onnx_ir.Model``.

    Every method's model gets the one config entry ``datafree.runtime`` sets:
    ``session.disable_quant_qdq=1`` where weights are dequantized on every run and no
    layer can run as an integer kernel (weight-only models written with
    DequantizeLinear, activations below 8 bits), so their weights are folded at load.
    datafree's own W8A8, W4A8 and weight-only models never need it.
    """
    import onnx
    import onnx_ir as ir

    from datafree.runtime.session import folds_weights

    opts = ort.SessionOptions()
    opts.log_severity_level = 3
    proto = ir.serde.serialize_model(model) if not isinstance(model, (str, Path)) else onnx.load(str(model))
    if folds_weights(proto):
        opts.add_session_config_entry("session.disable_quant_qdq", "1")
    return ort.InferenceSession(proto.SerializeToString(), opts, providers=["CPUExecutionProvider"])


# ---------------------------------------------------------------- methods
def datafree(recipe) -> Callable[[Path, Path, dict], None]:
    def make(model: Path, out: Path, ctx: dict) -> None:
        from datafree.exporters.writer import save
        from datafree.toolchain.compress import compress

        save(compress(model, recipe).model, out)
    return make


def _preprocessed(model: Path, ctx: dict) -> Path:
    """ORT's recommended pre-processing (shape inference, BN folded), shared by its methods."""
    from onnxruntime.quantization.shape_inference import quant_pre_process

    pre = ctx["work"] / "ort_pre.onnx"
    if not pre.exists():
        quant_pre_process(str(model), str(pre))
    return pre


def ort_dynamic(model: Path, out: Path, ctx: dict) -> None:
    from onnxruntime.quantization import QuantType, quantize_dynamic

    quantize_dynamic(str(_preprocessed(model, ctx)), str(out), weight_type=QuantType.QInt8)


class _Reader:
    """onnxruntime's CalibrationDataReader over an array, in batches of ``batch`` (32 by default)."""

    def __init__(self, name: str, x: np.ndarray, batch: int = 32) -> None:
        self._batches = iter([{name: x[i:i + batch]} for i in range(0, len(x), batch)])

    def get_next(self):
        return next(self._batches, None)


def ort_static(calibration: str) -> Callable[[Path, Path, dict], None]:
    """quantize_static calibrated on ``ctx["noise"]`` or ``ctx["calibration"]``, in batches of
    ``ctx.get("batch", 32)`` (1 for a model whose batch is fixed at 1)."""
    def make(model: Path, out: Path, ctx: dict) -> None:
        from onnxruntime.quantization import QuantFormat, QuantType, quantize_static

        x = ctx["noise"] if calibration == "noise" else ctx["calibration"]
        quantize_static(str(_preprocessed(model, ctx)), str(out), _Reader(ctx["input"], x, ctx.get("batch", 32)),
                        quant_format=QuantFormat.QDQ, per_channel=True,
                        activation_type=QuantType.QUInt8, weight_type=QuantType.QInt8)
    return make


def nncf_weights(model: Path, out: Path, ctx: dict) -> None:
    import nncf

    compressed = nncf.compress_weights(onnx.load(str(model)), mode=nncf.CompressWeightsMode.INT8_SYM)
    onnx.save(_flat_axis_scales(compressed), str(out))


def _flat_axis_scales(proto: onnx.ModelProto) -> onnx.ModelProto:
    """NNCF (3.4) writes Conv weight scales as [C, 1, 1]; per-axis DequantizeLinear needs [C].

    The same numbers reshaped, so onnxruntime can run the model at all.
    """
    from onnx import numpy_helper

    inits = {i.name: i for i in proto.graph.initializer}
    for node in proto.graph.node:
        if node.op_type != "DequantizeLinear" or not any(a.name == "axis" for a in node.attribute):
            continue
        for name in node.input[1:3]:
            t = inits.get(name)
            if t is not None and len(t.dims) > 1:
                t.CopyFrom(numpy_helper.from_array(numpy_helper.to_array(t).reshape(-1), name))
    return proto


def nncf_noise(model: Path, out: Path, ctx: dict) -> None:
    import nncf

    name, x = ctx["input"], ctx["noise"]
    data = nncf.Dataset([x[i:i + 1] for i in range(len(x))], lambda s: {name: s})
    onnx.save(nncf.quantize(onnx.load(str(model)), data, subset_size=len(x)), str(out))


def nncf_available() -> str | None:
    """None when NNCF imports, else why not."""
    try:
        import nncf  # noqa: F401
    except Exception as exc:
        return f"NNCF not installed ({type(exc).__name__}); `pip install nncf` adds it without changing torch"
    return None


def methods(quick: bool) -> list[tuple[str, str, Callable | None]]:
    from datafree.toolchain.recipe import Recipe

    synth = dict(synthetic=64, synthetic_steps=50) if quick else {}
    rows: list[tuple[str, str, Callable | None]] = [
        ("float (reference)", "none", None),
        ("datafree W8A8", "none", datafree(Recipe(wbits=8, abits=8, **synth))),
        ("datafree W4A8", "none", datafree(Recipe(wbits=4, abits=8, **synth))),
        ("datafree W8 (weights only)", "none", datafree(Recipe(wbits=8, abits=None, **synth))),
        ("datafree prune 0.3 + W4A8", "none", datafree(Recipe(prune=0.3, wbits=4, abits=8, **synth))),
        ("ORT quantize_dynamic W8 (A8 at run time)", "none", ort_dynamic),
        ("ORT quantize_static W8A8, noise calibration", "Gaussian noise", ort_static("noise")),
        ("ORT quantize_static W8A8, real calibration", f"{CALIBRATION} real images", ort_static("real")),
    ]
    if nncf_available() is None:
        rows += [("NNCF compress_weights INT8 (weights only; scales made 1-D)", "none", nncf_weights),
                 ("NNCF quantize W8A8, noise calibration", "Gaussian noise", nncf_noise)]
    return rows


# -------------------------------------------------------------- measuring
def file_size(path: Path) -> int:
    data = path.with_name(path.name + ".data")
    return path.stat().st_size + (data.stat().st_size if data.exists() else 0)


def logits(model, x: np.ndarray) -> np.ndarray:
    sess = session(model)
    name = sess.get_inputs()[0].name
    return np.concatenate([sess.run(None, {name: x[i:i + 100]})[0] for i in range(0, len(x), 100)])


def predictions(model, x: np.ndarray) -> np.ndarray:
    return logits(model, x).argmax(1)


def top1(model, x: np.ndarray, y: np.ndarray) -> float:
    """Top-1 of a model file or in-memory model."""
    return float((predictions(model, x) == y).mean())


def latency_ms(path: Path, x: np.ndarray, reps: int) -> float:
    sess = session(path)
    feed = {sess.get_inputs()[0].name: x}
    sess.run(None, feed)
    times = []
    for _ in range(reps):
        t = time.perf_counter()
        sess.run(None, feed)
        times.append(time.perf_counter() - t)
    return float(np.median(times) * 1000)


def costs(path: Path, float_macs: float | None) -> tuple[float | None, float | None, str]:
    """(MACs, BOPs, note) per image; BOPs None when the cost module is not there."""
    try:
        from datafree.toolchain.ingest import load
        from datafree.toolchain.report import cost
    except ImportError:
        return None, None, ""
    totals = cost.totals(cost.layer_costs(load(path)))
    if totals["macs"] == 0 and float_macs:   # integer ops (ConvInteger) the cost model does not read
        return float_macs, float_macs * 8 * 8, "assumed 8x8"
    return totals["macs"], totals["bops"], ""


def measure(row: Row, x: np.ndarray, y: np.ndarray, sample: np.ndarray, reps: int, float_macs,
            float_logits: np.ndarray | None = None) -> np.ndarray:
    """Fills ``row``; returns its logits."""
    z = logits(row.path, x)
    pred = z.argmax(1)
    row.top1 = float((pred == y).mean())
    ref = z if float_logits is None else float_logits
    row.agree = float((pred == ref.argmax(1)).mean())
    row.logit_err = float(((z - ref) ** 2).sum() / (ref ** 2).sum())
    row.size = file_size(row.path)
    try:
        row.macs, row.bops, row.bops_note = costs(row.path, float_macs)
    except Exception as exc:  # a peer's graph the cost model cannot read: say so, keep the rest
        row.bops_note = f"cost: {type(exc).__name__}"
    row.lat1 = latency_ms(row.path, sample[:1], reps)
    row.lat64 = latency_ms(row.path, sample[:64], max(2, reps // 4))
    return z


# ---------------------------------------------------------------- output
HEADERS = ["method", "data used", "top-1", "same as FP32", "logit error", "size (KiB)", "MMACs", "GBOPs", "ms @1", "ms @64", "wall (s)"]


def cells(r: Row) -> list[str]:
    if r.error:
        return [r.method, r.data, f"failed: {r.error}"] + [""] * (len(HEADERS) - 3)
    f = lambda v, spec: "n/a" if v is None else format(v, spec)  # noqa: E731
    bops = f(None if r.bops is None else r.bops / 1e9, ".3f") + (f" ({r.bops_note})" if r.bops_note else "")
    return [r.method, r.data, f(None if r.top1 is None else 100 * r.top1, ".1f") + "%",
            f(None if r.agree is None else 100 * r.agree, ".1f") + "%", f(r.logit_err, ".2g"),
            f(None if r.size is None else r.size / 1024, ".0f"), f(None if r.macs is None else r.macs / 1e6, ".1f"),
            bops, f(r.lat1, ".2f"), f(r.lat64, ".1f"), f(r.wall, ".1f")]


def markdown(rows: list[Row], header: list[str]) -> str:
    lines = header + ["", "| " + " | ".join(HEADERS) + " |", "|" + "---|" * len(HEADERS)]
    lines += ["| " + " | ".join(c.replace("|", "/") for c in cells(r)) + " |" for r in rows]
    return "\n".join(lines) + "\n"


def print_table(rows: list[Row], title: str) -> None:
    from rich.console import Console
    from rich.table import Table

    table = Table(title=title)
    for i, h in enumerate(HEADERS):
        table.add_column(h, justify="left" if i < 2 else "right")
    for r in rows:
        table.add_row(*cells(r))
    Console(width=max(160, Console().width)).print(table)


# ------------------------------------------------------------------- main
def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", type=Path, default=DEFAULT_MODEL)
    p.add_argument("--images", type=Path, default=SHARED_IMAGES if SHARED_IMAGES.exists() else BUNDLED_IMAGES)
    p.add_argument("--quick", action="store_true", help="fewer synthetic images and latency repetitions")
    p.add_argument("--out", type=Path, default=RESULTS, help="markdown table to write")
    args = p.parse_args()

    x_all, y_all = load_images(args.images)
    if len(x_all) <= CALIBRATION:
        raise SystemExit(f"{args.images}: need more than {CALIBRATION} images (the first {CALIBRATION} calibrate "
                         "the data-using reference, the rest are scored)")
    x, y = x_all[CALIBRATION:], y_all[CALIBRATION:]
    reps = 10 if args.quick else 50
    load_before = os.getloadavg()[0]
    with tempfile.TemporaryDirectory(prefix="datafree-peers-") as tmp:
        work = Path(tmp)
        sess = session(args.model)
        ctx = {"work": work, "input": sess.get_inputs()[0].name, "calibration": x_all[:CALIBRATION],
               "noise": noise(CALIBRATION, x_all.shape[1:])}
        sample = noise(64, x_all.shape[1:], seed=1)
        rows: list[Row] = []
        float_macs = float_logits = None
        for i, (name, data, make) in enumerate(methods(args.quick)):
            row = Row(name, data)
            print(f"[{i + 1}] {name} ...", flush=True)
            try:
                if make is None:
                    row.path, row.wall = args.model, 0.0
                else:
                    row.path = work / f"m{i}.onnx"
                    t = time.perf_counter()
                    make(args.model, row.path, ctx)
                    row.wall = time.perf_counter() - t
                z = measure(row, x, y, sample, reps, float_macs, float_logits)
                if make is None:
                    float_macs, float_logits = row.macs, z
            except Exception as exc:
                row.error = f"{type(exc).__name__}: {str(exc).strip().splitlines()[0][:120] if str(exc).strip() else ''}"
                if os.environ.get("DATAFREE_DEBUG"):
                    traceback.print_exc()
            rows.append(row)

    title = f"{args.model.name}: top-1 on {len(y)} held-out images of {args.images.name}"
    print_table(rows, title)
    notes = [f"# Peers: {args.model.name}", "",
             f"Model `{args.model.relative_to(ROOT) if args.model.is_relative_to(ROOT) else args.model}`; "
             f"top-1 on images {CALIBRATION}..{len(x_all) - 1} of `{args.images.name}` ({len(y)} images); "
             f"the first {CALIBRATION} calibrate the data-using reference only. "
             f"Latency: onnxruntime {ort.__version__} CPU, median, random inputs, "
             f"{os.cpu_count()} cores ({platform.processor() or platform.machine()}), 1-min load "
             f"{load_before:.1f} at start and {os.getloadavg()[0]:.1f} at end (other work on the cores slows "
             f"every latency alike); models no layer of which runs as an integer kernel and whose weights "
             f"are dequantized on every run run with `session.disable_quant_qdq=1`, whichever method made them, as `datafree.runtime` "
             f"runs them. "
             f"Logit error: |z - z_FP32|^2 / |z_FP32|^2 over the scored images (steadier than the share of "
             f"equal predictions, which moves by 0.13 pt per image). "
             f"MACs/BOPs per image; BOPs = MACs x weight bits x activation bits (float = 32). "
             f"Wall: time to make the model. {'Quick settings (64 synthetic images, 50 steps).' if args.quick else ''}"]
    why_no_nncf = nncf_available()
    if why_no_nncf:
        notes += ["", why_no_nncf + "."]
        print(why_no_nncf)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(markdown(rows, notes))
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
