"""The core compressor's results table: one command, every setting, three ways each.

    python benchmarks/compress_bench.py [--model M.onnx] [--images I.npz] [--quick]
                                        [--configs 'p0-*,p0.3-w4a8/synthetic'] [--synthetic N]

Settings: prune {0, 0.3, 0.5} x weight bits {8, 6, 4} x activation bits {float, 8},
plus W4A4 without pruning, the pruned float models (p0.3-float, p0.5-float: what
pruning alone buys in speed) and 30 % with ``--channel-multiple 1`` (p0.3-float-m1, p0.3-w8a8-m1,
p0.3-w4a8-m1: any channel count, against the default's whole kernel blocks; p0.3-w4a8-m8:
multiples of 8 everywhere).  Each setting
is compressed three ways:

* ``naive``     -- round to nearest, prune by l1 and drop the channels, nothing corrected
                   (``Recipe(synthetic=0, bias_correction=False, compensation=False)``);
* ``closed``    -- closed form, no images at all: UDFC compensation of pruned channels
                   and data-free bias correction (``Recipe(synthetic=0)``);
* ``synthetic`` -- the default recipe (``Recipe()``): pruned channels chosen, compensation,
                   rounding and activation ranges fitted on synthetic images made from
                   the model itself.

Peers on the same images: the float model, onnxruntime ``quantize_dynamic`` (no data)
and ``quantize_static`` W8A8 calibrated on Gaussian noise (no data), made by the
helpers of ``benchmarks/peers.py``.

Measured per row: top-1 on every image of ``--images`` (no image is used by any
method), file size of the saved model, MACs per image (``summary.totals``), wall time
of ``compress()`` (the synthetic images are generated once per model, cached, and
their generation time is reported on its own), and onnxruntime CPU latency (median)
at batch 1 and 64.  Latency ratios are against the float model measured right
before each row in the same run, so a load change on a shared machine affects both
sides of a ratio alike.

Synthetic images are cached in ``--cache`` (default ``$DATAFREE_CACHE`` or
``~/.cache/datafree``); a new directory there measures generation from scratch.
Writes ``benchmarks/results/compress.md`` and ``benchmarks/results/compress.json``.
"""

from __future__ import annotations

import argparse
import datetime as dt
import fnmatch
import json
import os
import platform
import shlex
import sys
import tempfile
import time
import traceback
from dataclasses import asdict, dataclass, field
from pathlib import Path


sys.path.insert(0, str(Path(__file__).resolve().parent))
import peers  # noqa: E402  (benchmarks/ is not a package)

ROOT = peers.ROOT
RESULTS = ROOT / "benchmarks" / "results"
PRUNE = (0.0, 0.3, 0.5)
WBITS = (8, 6, 4)
ABITS = (None, 8)
MODES = ("naive", "closed", "synthetic")
QUICK_CONFIGS = ("p0-w8a8", "p0-w4a8", "p0-w4a4", "p0.3-w4a8", "p0.5-w8a8")
QUICK_SYNTHETIC = (64, 50)  # images, steps
LOAD_LIMIT = 2.0


# ------------------------------------------------------------------- configs
@dataclass(frozen=True)
class Config:
    prune: float
    wbits: int | None
    abits: int | None
    multiple: int | str = "auto"     # --channel-multiple

    @property
    def name(self) -> str:
        suffix = f"-m{self.multiple}" if self.multiple != "auto" else ""
        if self.wbits is None:
            return f"p{self.prune:g}-float{suffix}"
        return f"p{self.prune:g}-w{self.wbits}" + (f"a{self.abits}" if self.abits else "") + suffix

    def recipe(self, mode: str, synthetic: int, steps: int, route: str = "auto"):
        from datafree.toolchain.recipe import Recipe

        base = dict(prune=self.prune, wbits=self.wbits, abits=self.abits, channel_multiple=self.multiple)
        if mode == "naive":
            return Recipe(**base, synthetic=0, bias_correction=False, compensation=False)
        if mode == "closed":
            return Recipe(**base, synthetic=0)
        return Recipe(**base, synthetic=synthetic, synthetic_steps=steps, synthetic_route=route)


def all_configs() -> list[Config]:
    grid = [Config(p, w, a) for p in PRUNE for w in WBITS for a in ABITS]
    # pruned float models, and 30 % with any channel count (--channel-multiple 1: what
    # counts off the kernels' blocks cost in time)
    return grid + [Config(0.0, 4, 4)] + [Config(p, None, None) for p in PRUNE if p > 0] + \
        [Config(0.3, w, a, 1) for w, a in ((None, None), (8, 8), (4, 8))] + [Config(0.3, 4, 8, 8)] + \
        [Config(0.5, w, None, 1) for w in (None, 4)]


def select(patterns: list[str] | None, quick: bool) -> list[tuple[Config, str]]:
    """(config, mode) pairs; a pattern matches a config name or ``name/mode``."""
    jobs = [(c, m) for c in all_configs() for m in MODES]
    if patterns is None and quick:
        patterns = list(QUICK_CONFIGS)
    if patterns is None:
        return jobs
    picked = [(c, m) for c, m in jobs
              if any(fnmatch.fnmatchcase(c.name, p) or fnmatch.fnmatchcase(f"{c.name}/{m}", p) for p in patterns)]
    if not picked:
        names = ", ".join(c.name for c in all_configs())
        raise SystemExit(f"--configs {','.join(patterns)} matches nothing; configs are {names}; "
                         f"modes are {', '.join(MODES)} (e.g. p0.3-w4a8/closed)")
    return picked


# ----------------------------------------------------------------------- rows
@dataclass
class Row:
    config: str
    mode: str
    prune: float | None = None
    wbits: int | None = None
    abits: int | None = None
    top1: float | None = None
    size_bytes: int | None = None
    macs: int | None = None
    wall_s: float | None = None
    cpu_s: float | None = None          # CPU time of this process (all threads) for the same span
    fit_s: float | None = None          # the quantize/fit stage of compress()
    synthetic_s: float | None = None    # inside compress(): cache load, or generation on a miss
    timings: dict[str, float] = field(default_factory=dict)  # compress()'s own, per stage
    lat1_ms: float | None = None
    lat64_ms: float | None = None
    fp32_lat1_ms: float | None = None   # the float model, measured just before this row
    fp32_lat64_ms: float | None = None
    error: str = ""
    notes: list[str] = field(default_factory=list)

    @property
    def key(self) -> str:
        return f"{self.config}/{self.mode}"

    def ratio(self, batch: int) -> float | None:
        a, b = (self.lat1_ms, self.fp32_lat1_ms) if batch == 1 else (self.lat64_ms, self.fp32_lat64_ms)
        return None if a is None or not b else a / b


def float_macs(model_path: Path) -> int:
    from datafree.toolchain import graph as G
    from datafree.toolchain.ingest import load

    return int(sum(m for m in (l.macs() for l in G.analyse(load(model_path)).layers) if m is not None))


def latency(model, batches: tuple[int, ...], reps: tuple[int, int]) -> dict[int, float]:
    from datafree.runtime.bench import measure

    out = {}
    for batch, n in zip(batches, reps):
        out[batch] = measure(model, batch_sizes=(batch,), warmup=2, repeats=n)[0]["median_ms"]
    return out


# --------------------------------------------------------------------- output
HEADERS = ["config", "mode", "top-1", "Δ FP32", "size KiB", "× smaller", "MMACs", "wall s", "CPU s",
           "ms @1", "× FP32", "ms @64", "× FP32"]


def cells(r: Row, fp: Row | None) -> list[str]:
    if r.error:
        return [r.config, r.mode, f"failed: {r.error}"] + [""] * (len(HEADERS) - 3)
    f = lambda v, spec: "–" if v is None else format(v, spec)  # noqa: E731
    delta = None if r.top1 is None or fp is None or fp.top1 is None else 100 * (r.top1 - fp.top1)
    smaller = None if not r.size_bytes or fp is None or not fp.size_bytes else fp.size_bytes / r.size_bytes
    return [r.config, r.mode, f(None if r.top1 is None else 100 * r.top1, ".1f"), f(delta, "+.1f"),
            f(None if r.size_bytes is None else r.size_bytes / 1024, ".0f"), f(smaller, ".1f"),
            f(None if r.macs is None else r.macs / 1e6, ".1f"), f(r.wall_s, ".1f"), f(r.cpu_s, ".1f"),
            f(r.lat1_ms, ".2f"), f(r.ratio(1), ".2f"), f(r.lat64_ms, ".1f"), f(r.ratio(64), ".2f")]


def surprises(rows: list[Row]) -> list[str]:
    """Where a mode that should help does worse than the simpler one for the same setting."""
    by = {(r.config, r.mode): r for r in rows if not r.error and r.top1 is not None}
    out = []
    for (cfg, mode), r in by.items():
        for better, worse in (("synthetic", "closed"), ("closed", "naive"), ("synthetic", "naive")):
            if mode != better or (cfg, worse) not in by:
                continue
            d = 100 * (r.top1 - by[(cfg, worse)].top1)
            if d < 0:
                out.append(f"{cfg}: {better} {100 * r.top1:.1f}% < {worse} {100 * by[(cfg, worse)].top1:.1f}% "
                           f"({d:+.1f} points)")
    return out


def markdown(rows: list[Row], fp: Row | None, meta: dict, notes: list[str]) -> str:
    lines = [f"# Compressor results: {meta['model_name']}", "",
             "```", meta["command"], "```", "",
             *[line for n in notes for line in (n, "")],
             "| " + " | ".join(HEADERS) + " |", "|" + "---|" * len(HEADERS)]
    lines += ["| " + " | ".join(c.replace("|", "/") for c in cells(r, fp)) + " |" for r in rows]
    odd = surprises(rows)
    if odd:
        lines += ["", "Rows where the stronger mode lost accuracy against the simpler one:", ""]
        lines += [f"- {s}" for s in odd]
    return "\n".join(lines) + "\n"


def print_table(rows: list[Row], fp: Row | None, title: str, console) -> None:
    from rich.table import Table

    table = Table(title=title)
    for i, h in enumerate(HEADERS):
        table.add_column(h, justify="left" if i < 2 else "right")
    last = None
    for r in rows:
        group = r.config if r.prune is not None and r.mode in MODES else "peers"
        if last is not None and group != last:
            table.add_section()
        last = group
        table.add_row(*cells(r, fp))
    console.print(table)


# ---------------------------------------------------------------- README table
README_ROWS = [  # (config, mode, label, data used)
    ("float", "FP32", "float (FP32)", "–"),
    ("ORT quantize_dynamic W8", "no data", "onnxruntime `quantize_dynamic` W8", "none"),
    ("ORT quantize_static W8A8", "noise calibration", "onnxruntime `quantize_static` W8A8", "256 noise images"),
    ("p0-w8a8", "synthetic", "**datafree** W8A8", "none"),
    ("p0-w4a8", "synthetic", "**datafree** W4A8", "none"),
    ("p0-w4", "synthetic", "**datafree** W4 (weights only)", "none"),
    ("p0-w4a4", "synthetic", "**datafree** W4A4", "none"),
    ("p0.3-float", "synthetic", "**datafree** prune 30 % (float)", "none"),
    ("p0.3-float-m1", "synthetic", "**datafree** prune 30 % (float), `--channel-multiple 1`", "none"),
    ("p0.3-w8a8", "synthetic", "**datafree** prune 30 % + W8A8", "none"),
    ("p0.3-w4a8", "synthetic", "**datafree** prune 30 % + W4A8 (main job)", "none"),
    ("p0.3-w4a8-m1", "synthetic", "**datafree** prune 30 % + W4A8, `--channel-multiple 1`", "none"),
    ("p0.5-float", "synthetic", "**datafree** prune 50 % (float)", "none"),
    ("p0.5-float-m1", "synthetic", "**datafree** prune 50 % (float), `--channel-multiple 1`", "none"),
    ("p0.5-w4", "synthetic", "**datafree** prune 50 % + W4", "none"),
    ("p0.5-w4-m1", "synthetic", "**datafree** prune 50 % + W4, `--channel-multiple 1`", "none"),
]


def readme_table(json_path: Path) -> str:
    """The README's results table from a results JSON (rows it lacks are left out)."""
    data = json.loads(json_path.read_text())
    rows = {(r["config"], r["mode"]): r for r in data["rows"] if not r.get("error")}
    fp = rows.get(("float", "FP32"))
    out = ["| model | data used | top-1 | Δ FP32 | size | MACs | × FP32 time @ batch 1 | @ batch 64 |",
           "|---|---|---|---|---|---|---|---|"]
    for config, mode, label, data_used in README_ROWS:
        r = rows.get((config, mode))
        if r is None:
            continue
        delta = "–" if r is fp else f"{100 * (r['top1'] - fp['top1']):+.1f}".replace("+0.0", "±0.0").replace("-", "−")
        ratio = lambda k: "–" if r.get(k) is None else f"{r[k]:.2f}"  # noqa: E731
        out.append(f"| {label} | {data_used} | {100 * r['top1']:.1f} | {delta} | {r['size_bytes'] / 1024:.0f} KiB | "
                   f"{r['macs'] / 1e6:.1f} M | {ratio('lat1_vs_fp32')} | {ratio('lat64_vs_fp32')} |")
    return "\n".join(out)


# ----------------------------------------------------------------------- main
def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", type=Path, default=peers.DEFAULT_MODEL)
    p.add_argument("--images", type=Path,
                   default=peers.SHARED_IMAGES if peers.SHARED_IMAGES.exists() else peers.BUNDLED_IMAGES)
    p.add_argument("--quick", action="store_true",
                   help=f"configs {','.join(QUICK_CONFIGS)}, {QUICK_SYNTHETIC[0]} synthetic images "
                        f"({QUICK_SYNTHETIC[1]} steps), fewer latency repetitions")
    p.add_argument("--configs", help="comma-separated patterns over config names or name/mode, "
                                     "e.g. 'p0-*' or 'p0.3-w4a8/synthetic,*/closed' (with --quick too: "
                                     "then --quick only shortens the synthetic images and latency)")
    p.add_argument("--synthetic", type=int, help="synthetic images for the synthetic mode "
                                                 "(default: Recipe's, or 64 with --quick)")
    p.add_argument("--synthetic-steps", type=int, help="generator steps (default: Recipe's, or 50 with --quick)")
    p.add_argument("--synthetic-route", default="auto",
                   help="how the synthetic mode makes its images (datafree --synthetic-route; default auto)")
    p.add_argument("--no-peers", action="store_true", help="skip onnxruntime quantize_dynamic/quantize_static")
    p.add_argument("--cache", type=Path, default=None,
                   help="synthetic-image cache for this run (default $DATAFREE_CACHE or ~/.cache/datafree)")
    p.add_argument("--out", type=Path, default=RESULTS / "compress.md", help="markdown to write (.json beside it)")
    p.add_argument("--readme", action="store_true",
                   help="print the README's results table from the JSON beside --out, and stop")
    args = p.parse_args(argv)
    if args.readme:
        print(readme_table(args.out.with_suffix(".json")))
        return

    from rich.console import Console
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

    from datafree.exporters.writer import save
    from datafree.runtime import InferenceSession
    from datafree.toolchain import synth
    from datafree.toolchain.compress import compress
    from datafree.toolchain.passes import fit  # noqa: F401  (imported now, so the code is read at the start)
    from datafree.toolchain.ingest import load
    from datafree.toolchain.recipe import Recipe

    if not args.model.exists():
        raise SystemExit(f"{args.model}: model not found")
    if not args.images.exists():
        raise SystemExit(f"{args.images}: images not found")
    cache = args.cache or Path(os.environ.get("DATAFREE_CACHE") or Path.home() / ".cache" / "datafree")
    os.environ["DATAFREE_CACHE"] = str(cache)
    defaults = Recipe()
    n_syn = args.synthetic if args.synthetic is not None else \
        (QUICK_SYNTHETIC[0] if args.quick else defaults.synthetic)
    steps = args.synthetic_steps if args.synthetic_steps is not None else \
        (QUICK_SYNTHETIC[1] if args.quick else defaults.synthetic_steps)
    if n_syn <= 0:
        raise SystemExit("--synthetic must be positive (the closed form is the 'closed' mode)")
    jobs = select(args.configs.split(",") if args.configs else None, args.quick)
    lat_reps = (20, 5) if args.quick else (50, 10)
    batches = (1, 64)

    console = Console(width=max(150, Console().width))
    import onnxruntime as ort

    ort.set_default_logger_severity(3)  # the peers' pre-processing warns about every folded BN tensor
    x, y = peers.load_images(args.images)
    shape = x.shape[1:]
    load_start = os.getloadavg()
    started = dt.datetime.now(dt.timezone.utc)
    command = shlex.join(["python", "benchmarks/compress_bench.py", *(sys.argv[1:] if argv is None else argv)])
    fp_macs = float_macs(args.model)
    code = code_state()  # at the start: the modules are imported by now
    rows: list[Row] = []
    syn_info: dict = {}

    def fail(row: Row, exc: Exception) -> None:
        text = str(exc).strip()
        row.error = f"{type(exc).__name__}: {text.splitlines()[0][:120] if text else ''}"
        if os.environ.get("DATAFREE_DEBUG"):
            traceback.print_exc()

    peer_jobs = [] if args.no_peers else [
        ("ORT quantize_dynamic W8", "no data", peers.ort_dynamic),
        ("ORT quantize_static W8A8", "noise calibration", peers.ort_static("noise"))]
    wants_syn = any(m == "synthetic" for _, m in jobs)

    columns = (TextColumn("[bold]{task.description:<34}"), BarColumn(), MofNCompleteColumn(),
               TimeElapsedColumn(), TextColumn("{task.fields[detail]}"))
    with tempfile.TemporaryDirectory(prefix="datafree-compress-bench-") as tmp, \
            Progress(*columns, console=console, transient=False) as bar:
        work = Path(tmp)
        total = 1 + len(peer_jobs) + len(jobs) + (1 if wants_syn else 0)
        overall = bar.add_task("benchmark", total=total, detail="")
        stage = bar.add_task("", total=1, detail="", visible=False)

        def on_progress(name: str, done: int, n: int) -> None:
            bar.update(stage, description=f"  {name}", completed=done, total=max(n, 1), visible=True)

        fp_session = InferenceSession(str(args.model))

        def log(row: Row) -> None:
            """One line per finished row when the bar is not drawn (output to a file)."""
            if not console.is_terminal:
                done = "failed: " + row.error if row.error else \
                    f"top-1 {100 * row.top1:.1f}%  wall {row.wall_s:.1f} s"
                print(f"[{len(rows)}/{total}] {row.key}: {done}", flush=True)
        fp_history: list[dict[int, float]] = []

        def measure_row(row: Row, path: Path) -> None:
            bar.update(stage, description="  top-1", completed=0, total=1, visible=True)
            row.top1 = peers.top1(path, x, y)
            row.size_bytes = peers.file_size(path)
            bar.update(stage, description="  latency", completed=0, total=1)
            fp_lat = latency(fp_session, batches, lat_reps)
            lat = fp_lat if path == args.model else latency(InferenceSession(str(path)), batches, lat_reps)
            fp_history.append(fp_lat)
            row.fp32_lat1_ms, row.fp32_lat64_ms = fp_lat[1], fp_lat[64]
            row.lat1_ms, row.lat64_ms = lat[1], lat[64]
            bar.update(stage, completed=1)

        # ---- the float model
        bar.update(overall, detail="float model")
        fp = Row("float", "FP32", wbits=None, abits=None, prune=0.0, macs=fp_macs, wall_s=0.0, cpu_s=0.0)
        try:
            measure_row(fp, args.model)
        except Exception as exc:  # without the float model nothing is comparable
            fail(fp, exc)
        rows.append(fp)
        bar.advance(overall)
        log(fp)

        # ---- peers
        ctx = {"work": work, "input": fp_session.input_names[0], "noise": peers.noise(peers.CALIBRATION, shape)}
        for name, data, make in peer_jobs:
            bar.update(overall, detail=name)
            row = Row(name, data, prune=0.0, wbits=8, abits=8 if "static" in name else None, macs=fp_macs)
            try:
                path = work / f"{name.split()[1]}.onnx"
                t, c = time.perf_counter(), time.process_time()
                make(args.model, path, ctx)
                row.wall_s, row.cpu_s = time.perf_counter() - t, time.process_time() - c
                measure_row(row, path)
            except Exception as exc:
                fail(row, exc)
            rows.append(row)
            bar.advance(overall)
            log(row)

        # ---- synthetic images: generated once, as compress() asks for them
        if wants_syn:
            bar.update(overall, detail=f"synthetic images ({n_syn}, {steps} steps)")
            model = load(args.model)
            cached = synth.is_cached(model, n_syn, steps=steps, seed=defaults.seed, route=args.synthetic_route)
            t, c = time.perf_counter(), time.process_time()
            try:
                s = synth.generate(model, n_syn, steps=steps, seed=defaults.seed, progress=on_progress,
                                   route=args.synthetic_route)
                syn_info = {"images": n_syn, "steps": steps, "seconds": time.perf_counter() - t,
                            "cpu_seconds": time.process_time() - c,
                            "from_cache": cached, "source": s.source, "cache": str(cache)}
            except Exception as exc:
                syn_info = {"images": n_syn, "steps": steps, "error": f"{type(exc).__name__}: {exc}"}
            bar.advance(overall)
            if not console.is_terminal:
                print(f"synthetic images: {syn_info}", flush=True)

        # ---- the grid
        for i, (cfg, mode) in enumerate(jobs):
            bar.update(overall, detail=f"{cfg.name}/{mode}")
            row = Row(cfg.name, mode, prune=cfg.prune, wbits=cfg.wbits, abits=cfg.abits)
            try:
                recipe = cfg.recipe(mode, n_syn, steps, args.synthetic_route)
                t, c = time.perf_counter(), time.process_time()
                result = compress(args.model, recipe, progress=on_progress, measure=False)
                row.wall_s, row.cpu_s = time.perf_counter() - t, time.process_time() - c
                row.macs = int(result.summary.totals["macs_after"])
                row.fit_s = result.summary.timings.get("quantize")
                row.synthetic_s = result.summary.timings.get("synthetic")
                row.timings = dict(result.summary.timings)
                if mode == "synthetic" and row.synthetic_s and row.synthetic_s > 5:
                    row.notes.append(f"synthetic images not found in the cache: generated again "
                                     f"({row.synthetic_s:.0f} s inside the wall time)")
                path = save(result.model, work / f"c{i}.onnx")
                measure_row(row, path)
            except Exception as exc:
                fail(row, exc)
            rows.append(row)
            bar.advance(overall)
            log(row)
        bar.update(stage, visible=False)
        bar.update(overall, detail="done")

    # ------------------------------------------------------------------ report
    load_end = os.getloadavg()
    code_end = code_state()
    if code_end != code:
        code["at_end"] = code_end
    cores = os.cpu_count() or 1
    peak = max(load_start[0], load_end[0])
    rel = lambda p: p.resolve().relative_to(ROOT) if p.resolve().is_relative_to(ROOT) else p  # noqa: E731
    spread = ""
    if len(fp_history) > 1:
        lo1, hi1 = min(h[1] for h in fp_history), max(h[1] for h in fp_history)
        lo64, hi64 = min(h[64] for h in fp_history), max(h[64] for h in fp_history)
        spread = (f" The float model's own latency varied {lo1:.2f}–{hi1:.2f} ms at batch 1 and "
                  f"{lo64:.0f}–{hi64:.0f} ms at batch 64 over the {len(fp_history)} measurements of this run.")
    meta = {
        "command": command, "date_utc": started.strftime("%Y-%m-%d %H:%M UTC"),
        "model": str(rel(args.model)), "model_name": args.model.name, "images": str(rel(args.images)),
        "n_images": int(len(y)), "quick": args.quick, "synthetic": syn_info,
        "latency": {"batches": list(batches), "repeats": list(lat_reps), "statistic": "median",
                    "inputs": "random normal", "threads": "onnxruntime default"},
        "machine": {"cores": cores, "cpu": platform.processor() or platform.machine(),
                    "python": platform.python_version(), "onnxruntime": _version("onnxruntime"),
                    "datafree": _version("datafree"), "torch": _version("torch"),
                    "load_start": [round(v, 2) for v in load_start], "load_end": [round(v, 2) for v in load_end]},
        "code": code,
        "noisy_timings": peak > LOAD_LIMIT,
        "fp32_latency_ms": [{str(k): v for k, v in h.items()} for h in fp_history],
    }
    notes = [f"Run {meta['date_utc']}. Model `{meta['model']}`; top-1 on all {len(y)} images of "
             f"`{meta['images']}` (no method sees any of them). Modes: **naive** = round to nearest, pruned "
             "channels dropped, no corrections; **closed** = UDFC compensation + data-free bias correction, no "
             "images; **synthetic** = the default recipe: channel choice, compensation, rounding and ranges fitted on synthetic "
             "images made from the model. "
             "Peers: onnxruntime `quantize_dynamic` and `quantize_static` (QDQ, per channel) calibrated on "
             f"{peers.CALIBRATION} Gaussian-noise images."]
    if syn_info.get("error"):
        notes.append(f"Synthetic images failed: {syn_info['error']}.")
    elif syn_info:
        how = "loaded from the cache (generated by an earlier run)" if syn_info["from_cache"] else "generated"
        notes.append(f"Synthetic images: {syn_info['images']} images, {syn_info['steps']} steps, "
                     f"{syn_info['source']}, {how} in {syn_info['seconds']:.1f} s ({syn_info['cpu_seconds']:.1f} s CPU), "
                     "once for every synthetic row; "
                     "each row's wall time is `compress()` alone (images read from the cache).")
    notes.append(f"Machine: {cores} cores ({meta['machine']['cpu']}), onnxruntime {meta['machine']['onnxruntime']} "
                 f"CPU EP, default threads; latency = median of {lat_reps[0]} runs at batch 1 and {lat_reps[1]} at "
                 "batch 64 on random inputs; × FP32 = against the float model measured just before each row. "
                 f"1-min load {load_start[0]:.1f} at start, {load_end[0]:.1f} at end." + spread)
    notes.append(f"Code: commit {code['commit']}" + (f" with uncommitted changes in {', '.join(code['uncommitted'])}"
                                                    if code["uncommitted"] else "") + ".")
    if "at_end" in code:
        notes.append(f"The checkout changed while this ran (at the end: commit {code_end['commit']}, uncommitted "
                     f"changes in {', '.join(code_end['uncommitted']) or 'nothing'}); the modules were imported "
                     "at the start, so the rows are from the code at the start.")
    if meta["noisy_timings"]:
        notes.append(f"**Timings are noisy**: the load average ({peak:.1f}) was above {LOAD_LIMIT:g} on "
                     f"{cores} cores (other jobs on the machine); accuracy, sizes and MACs are unaffected.")
    for r in rows:
        for n in r.notes:
            notes.append(f"{r.key}: {n}.")

    title = f"{args.model.name}: top-1 on {len(y)} images of {args.images.name}"
    print_table(rows, fp, title, console)
    for n in notes[1:]:
        console.print(n.replace("**", ""), markup=False, highlight=False)
    odd = surprises(rows)
    if odd:
        console.print("Stronger mode lost accuracy against the simpler one:", style="bold yellow")
        for s in odd:
            console.print(f"  {s}", markup=False, highlight=False)

    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(markdown(rows, fp, meta, notes))
    js = args.out.with_suffix(".json")
    js.write_text(json.dumps({"meta": meta, "rows": [asdict(r) | {"lat1_vs_fp32": r.ratio(1),
                                                                  "lat64_vs_fp32": r.ratio(64)} for r in rows],
                              "surprises": odd}, indent=1) + "\n")
    console.print(f"wrote {rel(args.out)} and {rel(js)}")


def code_state() -> dict:
    """The commit the compressor ran from, and the source files that differed from it."""
    import subprocess

    def git(*cmd: str) -> str:
        try:
            return subprocess.run(["git", *cmd], cwd=ROOT, capture_output=True, text=True, timeout=30).stdout
        except (OSError, subprocess.SubprocessError):
            return ""

    changed = [line[3:] for line in git("status", "--porcelain", "--untracked-files=no").splitlines()
               if line[3:].endswith(".py") and not line[3:].startswith(("benchmarks/", "tests/", "examples/"))]
    return {"commit": git("rev-parse", "--short", "HEAD").strip() or "?", "uncommitted": changed}


def _version(name: str) -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version(name)
    except PackageNotFoundError:
        return "?"


if __name__ == "__main__":
    main()
