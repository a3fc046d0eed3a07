"""Latency of compressed models in a plain onnxruntime session, as ratios to the float model.

    python benchmarks/plain_session_bench.py [--model M.onnx] [--rounds 5] [--configs w4a8,w4] [--out F.md]

Compresses ``--model`` with the closed form (``synthetic=0``: latency does not depend on
the fitted values) as each config below, saves it, and measures it with
``compress_bench.latency`` at batch 1 and 64.  That helper opens a
``datafree.runtime.InferenceSession``, which for these models is exactly a plain
``onnxruntime.InferenceSession`` with default options (checked: no session option
set).  The rows are measured round by round, the float model first in every round, so
a load change on a shared machine hits all of them alike; each cell is the median over
the rounds of the helper's median, and the ratio is to the float model of the same run.
Also printed: how many layers onnxruntime runs on integer kernels and how many
DequantizeLinear nodes on constants (weights dequantized on every run) are left in the
graph it optimizes at load.
"""

from __future__ import annotations

import argparse
import os
import shlex
import statistics
import sys
import tempfile
from collections import Counter
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import compress_bench  # noqa: E402  (benchmarks/ is not a package)
import peers  # noqa: E402

CONFIGS = {
    "w8a8": dict(wbits=8, abits=8),
    "w4a8": dict(wbits=4, abits=8),
    "w4a8-int8": dict(wbits=4, abits=8, int4=False),
    "w4a4": dict(wbits=4, abits=4),
    "w6a6": dict(wbits=6, abits=6),
    "w4": dict(wbits=4),
    "w8": dict(wbits=8),
    "p0.3": dict(prune=0.3),                          # channel counts: auto (multiples of 8, 4 in narrow layers)
    "p0.3-m1": dict(prune=0.3, channel_multiple=1),   # any count
    "p0.3-m16": dict(prune=0.3, channel_multiple=16),
    "p0.3-w8a8": dict(prune=0.3, wbits=8, abits=8),
    "p0.3-w8a8-m1": dict(prune=0.3, wbits=8, abits=8, channel_multiple=1),
    "p0.3-w4a8": dict(prune=0.3, wbits=4, abits=8),
    "p0.3-w4a8-m1": dict(prune=0.3, wbits=4, abits=8, channel_multiple=1),
    "p0.3-w4a8-m16": dict(prune=0.3, wbits=4, abits=8, channel_multiple=16),
}
INTEGER_KERNELS = {"QLinearConv", "QGemm", "QLinearMatMul", "MatMulIntegerToFloat", "QLinearAdd"}
BATCHES = (1, 64)
REPS = (50, 10)


def write_models(model: Path, names: list[str], out: Path) -> dict[str, Path]:
    """The float model and each config compressed (closed form) and saved under ``out``."""
    from datafree.exporters.writer import save
    from datafree.toolchain.compress import compress
    from datafree.toolchain.recipe import Recipe

    paths = {"float": model}
    for name in names:
        paths[name] = out / f"{name}.onnx"
        save(compress(model, Recipe(synthetic=0, **CONFIGS[name]), measure=False).model, paths[name])
    return paths


def optimized_graph(path: Path, out: Path) -> tuple[int, int]:
    """(integer-kernel nodes, DequantizeLinear nodes on constants) of the graph onnxruntime
    optimizes at load with default options."""
    import onnx
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.log_severity_level = 3
    options.optimized_model_filepath = str(out)
    ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
    graph = onnx.load(str(out)).graph
    inits = {t.name for t in graph.initializer}
    ops = Counter(n.op_type for n in graph.node)
    dq = sum(1 for n in graph.node if n.op_type == "DequantizeLinear" and n.input[0] in inits)
    return sum(ops[o] for o in INTEGER_KERNELS), dq


def measure(paths: dict[str, Path], rounds: int) -> dict[str, dict[int, list[float]]]:
    from datafree.runtime import InferenceSession

    sessions = {}
    for name, path in paths.items():
        sessions[name] = InferenceSession(str(path))
        if sessions[name].weights_folded:
            raise SystemExit(f"{name}: not what a plain session runs (weights folded by a session option)")
    times: dict[str, dict[int, list[float]]] = {name: {b: [] for b in BATCHES} for name in paths}
    for r in range(rounds):
        for name, session in sessions.items():
            for batch, ms in compress_bench.latency(session, BATCHES, REPS).items():
                times[name][batch].append(ms)
        print(f"round {r + 1}/{rounds}", file=sys.stderr)
    return times


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", type=Path, default=peers.DEFAULT_MODEL)
    p.add_argument("--rounds", type=int, default=5)
    p.add_argument("--configs", default=",".join(CONFIGS), help=f"comma-separated, of {', '.join(CONFIGS)}")
    p.add_argument("--out", type=Path, default=None, help="also write the table to this markdown file")
    args = p.parse_args(argv)
    names = [c for c in args.configs.split(",") if c]
    unknown = [c for c in names if c not in CONFIGS]
    if unknown:
        raise SystemExit(f"unknown configs {unknown}: choose from {', '.join(CONFIGS)}")
    import onnxruntime as ort

    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        paths = write_models(args.model, names, tmp)
        graphs = {name: optimized_graph(path, tmp / f"{name}.optimized.onnx") for name, path in paths.items()}
        times = measure(paths, args.rounds)
        sizes = {name: path.stat().st_size / 1024 for name, path in paths.items()}
    med = {name: {b: statistics.median(t[b]) for b in BATCHES} for name, t in times.items()}
    lines = [f"{args.model.name}, onnxruntime {ort.__version__}, plain session, default options; "
             f"median of {args.rounds} rounds (each the median of {REPS[0]} runs at batch 1, {REPS[1]} at batch 64); "
             f"closed form (synthetic=0): time does not depend on fitted values. 1-min load at the end "
             f"{os.getloadavg()[0]:.1f} on {os.cpu_count()} cores.",
             "", "```", shlex.join(["python", "benchmarks/plain_session_bench.py", *(argv or sys.argv[1:])]), "```", "",
             "| model | KiB | integer kernels | DQ on constants | ms @1 | × float | ms @64 | × float |",
             "|---|---|---|---|---|---|---|---|"]
    for name in paths:
        m, f = med[name], med["float"]
        kernels, dq = graphs[name]
        lines.append(f"| {name} | {sizes[name]:.0f} | {kernels} | {dq} | {m[1]:.3f} | {m[1] / f[1]:.2f} | "
                     f"{m[64]:.2f} | {m[64] / f[64]:.2f} |")
    print("\n".join(lines))
    if args.out is not None:
        args.out.write_text("# Latency in a plain onnxruntime session\n\n" + "\n".join(lines) + "\n")


if __name__ == "__main__":
    main()
