"""What do synthetic images, generator steps and joint-fit steps buy? Top-1 against work.

    python benchmarks/fit_work.py [--prune 0.3,0.5] [--seeds 0,1,2] [--settings 256/80/300,128/40/100]

The trained ResNet-20 (BN kept, ``../shared/models/resnet20_bn.onnx``, else the bundled
one) compressed with ``prune=P, wbits=4, abits=8`` and each setting ``images/generator
steps/joint steps``, the rest of the recipe default and ``fit_budget="full"`` (so the
setting is taken as given), for each seed; top-1 on the 1,000 dev images.  Settings are
compared at the same prune ratio: mean and spread over the seeds, and the wall time of
the last seed (images for a setting are generated once per seed and steps, in a cache
kept for the run, so the wall time of a setting that shares images with an earlier one
leaves out generating them; ``gen s`` gives the generation time where it was measured).
Writes ``benchmarks/results/fit_work.md``.
"""

from __future__ import annotations

import argparse
import datetime as dt
import os
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
import compress_bench  # noqa: E402  (benchmarks/ is not a package)
import peers  # noqa: E402

ROOT = peers.ROOT
OUT = ROOT / "benchmarks" / "results" / "fit_work.md"
MODEL = ROOT.parent / "shared" / "models" / "resnet20_bn.onnx"
BUNDLED = ROOT / "examples" / "models" / "resnet20_bn.onnx"


def run(model: Path, prune: float, setting: tuple[int, int, int], seed: int, x, y, work: Path) -> dict:
    from datafree.exporters.writer import save
    from datafree.toolchain.compress import compress
    from datafree.toolchain.recipe import Recipe

    n, gen, joint = setting
    recipe = Recipe(prune=prune, wbits=4, abits=8, synthetic=n, synthetic_steps=gen, joint_steps=joint,
                    fit_budget="full", seed=seed)
    t = time.perf_counter()
    result = compress(str(model), recipe, measure=False)
    wall = time.perf_counter() - t
    out = work / "out.onnx"
    save(result.model, out)
    return {"top1": 100 * peers.top1(out, x, y), "wall": wall, "gen": result.summary.timings.get("synthetic", 0.0)}


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--prune", default="0.3,0.5")
    ap.add_argument("--seeds", default="0,1,2")
    ap.add_argument("--settings", default="256/80/300,128/80/150,128/40/100,96/40/100",
                    help="comma-separated images/generator steps/joint steps")
    args = ap.parse_args(argv)
    model = MODEL if MODEL.exists() else BUNDLED
    x, y = peers.load_images(peers.SHARED_IMAGES if peers.SHARED_IMAGES.exists() else peers.BUNDLED_IMAGES)
    settings = [tuple(int(v) for v in s.split("/")) for s in args.settings.split(",")]
    seeds = [int(s) for s in args.seeds.split(",")]
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        os.environ["DATAFREE_CACHE"] = str(Path(tmp) / "cache")
        for prune in (float(p) for p in args.prune.split(",")):
            for setting in settings:
                runs = [run(model, prune, setting, seed, x, y, Path(tmp)) for seed in seeds]
                top = [r["top1"] for r in runs]
                row = {"prune": prune, "setting": setting, "top1": top, "wall": runs[-1]["wall"],
                       "gen": max(r["gen"] for r in runs)}
                print(f"prune {prune} {'/'.join(map(str, setting))}: top-1 {np.mean(top):.2f} "
                      f"({', '.join(f'{t:.1f}' for t in top)}), wall {row['wall']:.0f} s", flush=True)
                rows.append(row)
    lines = ["# What fitting work buys: top-1 against images, generator steps and joint steps", "", "```",
             "python benchmarks/fit_work.py " + " ".join(argv if argv is not None else sys.argv[1:]), "```", "",
             f"Run {dt.datetime.now(dt.timezone.utc):%Y-%m-%d %H:%M} UTC, code {compress_bench.code_state()['commit']}"
             f", {os.cpu_count()} cores. Method: the docstring of `benchmarks/fit_work.py`; model `{model.name}`, "
             f"W4A8, seeds {args.seeds}.", "",
             "| prune | images / generator steps / joint steps | top-1 mean | per seed | spread | wall s | gen s |",
             "|---|---|---|---|---|---|---|"]
    for r in rows:
        top = r["top1"]
        lines.append(f"| {r['prune']:.1f} | {'/'.join(map(str, r['setting']))} | {np.mean(top):.2f} | "
                     f"{', '.join(f'{t:.1f}' for t in top)} | {max(top) - min(top):.1f} | {r['wall']:.0f} | "
                     f"{r['gen']:.0f} |")
    OUT.write_text("\n".join(lines) + "\n")
    print(f"wrote {OUT}")


if __name__ == "__main__":
    main()
