"""datafree on the edge test models (tests/edge_zoo.py), exported as users export them:
BN folded, opset 17, symbolic batch, height and width.

    python benchmarks/edge_models.py [--quick] [--bn-kept] [--models mbv3_like,db_like,yolo_like]
                                     [--photos 64] [--jobs 1]

Per model, output SQNR (``edge_zoo.sqnr_db``) against the float model on held-out photos
(``edge_zoo.photos``: the bundled dev images at the model's usual size, with text drawn on
them or another photo pasted), and the text-map IoU (``edge_zoo.map_iou``) for db_like, for

* plain per-channel symmetric weight rounding to 8 and 4 bits (no activation quantization),
  done here, as the floor to compare with;
* ``datafree compress`` as a user runs it, no other option: ``--wbits 8 --abits 8``,
  ``--wbits 4 --abits 8`` and ``--prune 0.3 --wbits 8``; and W8A8 with ``--input-shape 1,3,H,W``
  (the model's usual size instead of the one the compressor picks) and with
  ``--no-integer-kernels`` (layers before SiLU / HardSwish in float: the accuracy it buys);
* with ``--bn-kept``, also the three user commands on the export with BN kept;

with the compression wall time, the time per batch in a plain onnxruntime session at batch 1
and 64 as a ratio to the float model's, MACs per image at the usual size (relative to the float
model), what the summary says about synthetic images, and any traceback (a bug).
``--quick``: 16 photos, and the rows without ``--input-shape``.  Writes ``benchmarks/results/edge_models.md``
(``edge_models_quick.md`` with ``--quick``, ``edge_models_bn_kept.md`` with ``--bn-kept``).
"""

from __future__ import annotations

import argparse
import datetime as dt
import multiprocessing
import os
import platform
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ProcessPoolExecutor, as_completed
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import onnx
from onnx import numpy_helper

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "tests"))
import edge_zoo  # noqa: E402  (the models, their photos and metrics)
from datafree.toolchain.passes import speed  # noqa: E402
import zoo  # noqa: E402  (onnxruntime session helper)

RESULTS = ROOT / "benchmarks" / "results"
TIMEOUT = 1800   # seconds per compression


@dataclass
class Row:
    label: str
    args: list[str] = field(default_factory=list)   # datafree compress options; empty: rounded here
    sqnr: float | None = None
    iou: float | None = None
    wall: float | None = None
    macs: float | None = None
    route: str = ""
    error: str = ""
    time: dict[int, float] = field(default_factory=dict)   # batch -> time / float model's, plain session
    bn_kept: bool = False   # compress the export with BN kept instead of the folded one


def configs(name: str, quick: bool, bn_kept: bool = False) -> list[Row]:
    shape = "1," + ",".join(map(str, edge_zoo.INFO[name]["size"]))
    rows = [Row("plain W8 rounding"), Row("plain W4 rounding"),
            Row("W8A8", ["--wbits", "8", "--abits", "8"]),
            Row("W8A8 --input-shape", ["--wbits", "8", "--abits", "8", "--input-shape", shape]),
            Row("W8A8 --no-integer-kernels", ["--wbits", "8", "--abits", "8", "--no-integer-kernels"]),
            Row("W4A8", ["--wbits", "4", "--abits", "8"]),
            Row("prune 0.3 + W8", ["--prune", "0.3", "--wbits", "8"])]
    if quick:
        rows = [r for r in rows if r.label in ("plain W8 rounding", "plain W4 rounding", "W8A8", "W4A8",
                                               "prune 0.3 + W8")]
    if bn_kept:
        rows += [Row("BN kept: " + r.label, r.args, bn_kept=True) for r in rows
                 if r.label in ("W8A8", "W4A8", "prune 0.3 + W8")]
    return rows


# ---------------------------------------------------------------- plain rounding
_OUT_AXIS = {"Conv": 0, "ConvTranspose": 1}


def round_weights(src: Path, dst: Path, bits: int) -> Path:
    """Each Conv/ConvTranspose/Gemm/MatMul weight rounded per output channel, symmetric, to ``bits``."""
    model = onnx.load(str(src))
    inits = {i.name: i for i in model.graph.initializer}
    qmax = 2 ** (bits - 1) - 1
    for node in model.graph.node:
        if node.op_type not in ("Conv", "ConvTranspose", "Gemm", "MatMul") or len(node.input) < 2:
            continue
        init = inits.get(node.input[1])
        if init is None:
            continue
        w = numpy_helper.to_array(init).astype(np.float32)
        if w.ndim < 2:
            continue
        axis = _OUT_AXIS.get(node.op_type, 1)
        if node.op_type == "Gemm":
            axis = 0 if any(a.name == "transB" and a.i for a in node.attribute) else 1
        reduce = tuple(i for i in range(w.ndim) if i != axis)
        scale = np.maximum(np.abs(w).max(axis=reduce, keepdims=True), 1e-12) / qmax
        init.CopyFrom(numpy_helper.from_array((np.clip(np.rint(w / scale), -qmax, qmax) * scale).astype(np.float32),
                                              init.name))
    onnx.save(model, str(dst))
    return dst


# ------------------------------------------------------------------------ running
def run_all(path: Path, x: np.ndarray) -> list[np.ndarray]:
    """Every output of ``path`` on ``x``, one image at a time (a compressed model may fix the batch)."""
    sess = zoo.session(path)
    name = sess.get_inputs()[0].name
    per_image = [sess.run(None, {name: x[i:i + 1]}) for i in range(len(x))]
    return [np.concatenate([o[k] for o in per_image]) for k in range(len(per_image[0]))]


def _weight_shape(model: onnx.ModelProto, name: str) -> tuple[int, ...] | None:
    """Shape of a weight given as an initializer, directly or through DequantizeLinear/Constant."""
    inits = {i.name: i for i in model.graph.initializer}
    producers = {o: n for n in model.graph.node for o in n.output}
    for _ in range(4):
        if name in inits:
            return tuple(inits[name].dims)
        node = producers.get(name)
        if node is None:
            return None
        if node.op_type == "Constant":
            return tuple(node.attribute[0].t.dims)
        name = node.input[0]
    return None


def macs(path: Path, x: np.ndarray) -> float | None:
    """Multiply-accumulates of the Conv/ConvTranspose/Gemm/MatMul layers on one image ``x[:1]``."""
    model = onnx.load(str(path))
    layers = [n for n in model.graph.node if n.op_type in ("Conv", "ConvTranspose", "Gemm", "MatMul")]
    known = {o.name for o in model.graph.output}
    probe = [v for n in layers for v in (n.input[0], n.output[0]) if v not in known]
    for v in dict.fromkeys(probe):
        model.graph.output.append(onnx.helper.make_value_info(v, onnx.TypeProto()))
    try:
        sess = zoo.session(model)
    except Exception:   # noqa: BLE001  (a model onnxruntime cannot probe this way: no MACs column)
        return None
    names = [o.name for o in sess.get_outputs()]
    values = dict(zip(names, sess.run(None, {sess.get_inputs()[0].name: x[:1]})))
    total = 0
    for n in layers:
        w = _weight_shape(model, n.input[1])
        if w is None:
            continue
        src, out = values[n.input[0]], values[n.output[0]]
        if n.op_type == "Conv":
            total += out.size * int(np.prod(w[1:]))
        elif n.op_type == "ConvTranspose":
            total += int(np.prod(src.shape[2:])) * int(np.prod(w))
        else:
            total += out.size * (src.shape[-1])
    return float(total)


def compress(src: Path, dst: Path, args: list[str]) -> tuple[float, str, str]:
    """Run ``datafree compress``; returns (wall seconds, its stdout, an error line or '')."""
    cmd = [sys.executable, "-c", "from datafree.toolchain.cli import main; main()",
           "compress", str(src), "-o", str(dst), *args]
    t0 = time.perf_counter()
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=TIMEOUT,
                              env=os.environ | {"COLUMNS": "200"})
    except subprocess.TimeoutExpired:
        return time.perf_counter() - t0, "", f"timed out after {TIMEOUT} s"
    wall = time.perf_counter() - t0
    error = ""
    if "Traceback" in proc.stderr:
        last = [line for line in proc.stderr.strip().splitlines() if line.strip()][-1]
        error = f"TRACEBACK: {last.strip()}"
    elif proc.returncode != 0:
        error = f"exit {proc.returncode}: {(proc.stderr.strip().splitlines() or [''])[-1].strip()}"
    return wall, proc.stdout + proc.stderr, error


def image_route(output: str) -> str:
    """The summary's line(s) on synthetic images or the closed form, shortened."""
    keys = ("synthetic", "closed form")
    lines = [" ".join(line.split()) for line in output.splitlines() if any(k in line.lower() for k in keys)]
    notes = [line for line in lines if line.startswith("note:")]   # not the progress lines
    return (notes or lines or [""])[0][:240]


# ------------------------------------------------------------------------ a model
def measure(name: str, rows: list[Row], n_photos: int, work: Path) -> list[Row]:
    """Fill ``rows`` for model ``name``: its float export (BN folded, or kept for ``bn_kept`` rows)
    against each compressed or rounded one."""
    work = work / name
    work.mkdir()
    sources = {fold: edge_zoo.export(name, work, opset=17, fold_bn=fold, dynamic_hw=True)
               for fold in {not r.bn_kept for r in rows}}
    x = edge_zoo.photos(name, n_photos)
    refs = {fold: run_all(src, x) for fold, src in sources.items()}
    float_macs = macs(sources[True], x) if True in sources else None
    for i, row in enumerate(rows):
        src, ref = sources[not row.bn_kept], refs[not row.bn_kept]
        dst = work / f"{name}_{i}.onnx"
        if row.args:
            row.wall, out, row.error = compress(src, dst, row.args)
            row.route = image_route(out)
        else:
            t0 = time.perf_counter()
            round_weights(src, dst, 8 if "W8" in row.label else 4)
            row.wall = time.perf_counter() - t0
        if dst.exists() and not row.error:
            try:
                outs = run_all(dst, x)
                row.sqnr = edge_zoo.sqnr_db(ref, outs)
                if name == "db_like":
                    row.iou = float(np.mean([edge_zoo.map_iou(r, o) for r, o in zip(ref[0], outs[0])]))
                m = macs(dst, x)
                row.macs = m / float_macs if m is not None and float_macs else None
                row.time = speed.measure(src.read_bytes(), dst.read_bytes(), tuple(x.shape[1:])).ratios()
            except Exception as e:   # noqa: BLE001  (a model that does not run is a result too)
                row.error = f"does not run: {type(e).__name__}: {str(e).splitlines()[0][:160]}"
        print(f"{name:10s} {row.label:36s} {_f(row.sqnr)} dB  IoU {_f(row.iou, 3)}  {_f(row.wall, 0)} s  "
              f"MACs {_f(row.macs, 2)}  time {_times(row)}  {row.error}  | {row.route}", flush=True)
    return rows


def _times(row: Row) -> str:
    return " / ".join(f"{r:.2f}x" for r in row.time.values()) or "-"


def _f(v, digits: int = 1) -> str:
    return "-" if v is None else f"{v:.{digits}f}"


def markdown(results: dict[str, list[Row]], n_photos: int, quick: bool, bn_kept: bool = False) -> str:
    lines = [f"# datafree on the edge test models{' (quick)' if quick else ''}", "",
             f"{dt.datetime.now(dt.timezone.utc):%Y-%m-%d %H:%M} UTC, {platform.machine()}, "
             f"{os.cpu_count()} cores (shared).  Models: `tests/edge_zoo.py`, exported with BN folded, "
             f"opset 17, symbolic batch/height/width.  Scored on {n_photos} held-out photos "
             "(`edge_zoo.photos`) at each model's usual size; SQNR over all outputs (`edge_zoo.sqnr_db`) "
             "against the float model; MACs at the usual size relative to the float model; time: "
             "batch 1 / batch 64 (less where slow) in a plain onnxruntime session, as a ratio to the "
             "float model's measured in the same run (`passes/speed.py`).  "
             "Made by `python benchmarks/edge_models.py" + (" --quick" if quick else "")
             + (" --bn-kept" if bn_kept else "") + "`.", ""]
    for name, rows in results.items():
        info = edge_zoo.INFO[name]
        lines += [f"## {name} (input {info['size']}, range [{info['range'][0]:.2f}, {info['range'][1]:.2f}])", "",
                  "| config | datafree options | SQNR dB | " + ("text-map IoU | " if name == "db_like" else "")
                  + "MACs | time b1 / large | wall s | summary on images | error |",
                  "|---|---|---|" + ("---|" if name == "db_like" else "") + "---|---|---|---|---|"]
        for r in rows:
            iou = f" {_f(r.iou, 3)} |" if name == "db_like" else ""
            lines.append(f"| {r.label} | `{' '.join(r.args) or '(rounded here)'}` | {_f(r.sqnr)} |{iou} "
                         f"{_f(r.macs, 2)} | {_times(r)} | {_f(r.wall, 0)} | {r.route.replace('|', '/')} | {r.error} |")
        lines.append("")
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--models", default="mbv3_like,db_like,yolo_like", help="in this order (cheapest first)")
    ap.add_argument("--photos", type=int, default=None, help="held-out photos per model (default 64, quick 16)")
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--bn-kept", action="store_true",
                    help="also compress the export with BN kept (the rows with the input shape)")
    ap.add_argument("--jobs", type=int, default=1, help="models measured side by side (processes)")
    args = ap.parse_args()
    n_photos = args.photos or (16 if args.quick else 64)
    results = {}
    RESULTS.mkdir(exist_ok=True)
    suffix = ("_quick" if args.quick else "") + ("_bn_kept" if args.bn_kept else "")
    out = RESULTS / f"edge_models{suffix}.md"
    names = args.models.split(",")
    with tempfile.TemporaryDirectory() as tmp, \
            ProcessPoolExecutor(args.jobs, mp_context=multiprocessing.get_context("spawn")) as pool:
        futures = {pool.submit(measure, name, configs(name, args.quick, args.bn_kept), n_photos, Path(tmp)): name
                   for name in names}
        for future in as_completed(futures):
            results[futures[future]] = future.result()
            done = {n: results[n] for n in names if n in results}
            out.write_text(markdown(done, n_photos, args.quick, args.bn_kept))   # each model's table as soon as it is done
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
