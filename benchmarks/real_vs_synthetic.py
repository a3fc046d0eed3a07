"""Synthetic images against real ones, at equal settings: how far is the data-free path
from what the same fitting would reach with real data?

    python benchmarks/real_vs_synthetic.py [--model M.onnx] [--images I.npz] [--real 256]
                                           [--configs p0.3-w4a8,p0.5-w4,p0-w4a4] [--seeds 0,1,2] [--cache DIR]

The last ``--real`` images of ``--images`` are the real fitting set; every row is scored
on the images before them (held out for all rows).  Per config, four ways:

* ``closed``         -- no images: UDFC closed form + data-free bias correction;
* ``least squares``  -- synthetic images, each layer refitted by least squares alone
                        (``joint_steps=0``), channels by l1, the same ratio in every layer,
                        no augmented copies: the fitting this tool had before joint fitting;
* ``synthetic``      -- the default recipe: synthetic images only;
* ``real``           -- the default recipe with the real fitting images in place of the
                        synthetic ones (``compress(..., images=...)``), the reference.

Each mode runs once per seed (the seed drives the generator, the augmented copies and the
fitting): a difference of a point is eight of 744 images, about what one seed moves, so
the comparison is of the means.

Writes ``benchmarks/results/real_vs_synthetic.md``.
"""

from __future__ import annotations

import argparse
import datetime as dt
import os
import sys
import time
from pathlib import Path


sys.path.insert(0, str(Path(__file__).resolve().parent))
import peers  # noqa: E402  (benchmarks/ is not a package)

RESULTS = peers.ROOT / "benchmarks" / "results" / "real_vs_synthetic.md"
CONFIGS = "p0.3-w4a8,p0.5-w4,p0-w4a4"


def parse(name: str) -> dict:
    p, rest = name[1:].split("-w")
    w, _, a = rest.partition("a")
    return {"prune": float(p), "wbits": int(w), "abits": int(a) if a else None}


def _mean(values: list[float]) -> float:
    return sum(values) / len(values)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--model", type=Path, default=peers.DEFAULT_MODEL)
    ap.add_argument("--images", type=Path, default=None,
                    help="npz of labelled images (default: the shared 1,000 dev images, else the bundled 500)")
    ap.add_argument("--real", type=int, default=256, help="real fitting images, taken from the end")
    ap.add_argument("--configs", default=CONFIGS)
    ap.add_argument("--seeds", default="0,1,2", help="comma-separated recipe seeds; every mode runs once per seed")
    ap.add_argument("--cache", default=None, help="synthetic-image cache (default $DATAFREE_CACHE)")
    ap.add_argument("--out", type=Path, default=RESULTS)
    args = ap.parse_args()
    if args.cache:
        os.environ["DATAFREE_CACHE"] = args.cache
    from datafree.toolchain.compress import compress
    from datafree.toolchain.recipe import Recipe

    images = args.images or (peers.SHARED_IMAGES if peers.SHARED_IMAGES.exists() else peers.BUNDLED_IMAGES)
    x, y = peers.load_images(images)
    if not 0 < args.real < len(x):
        raise SystemExit(f"--real must be in 1..{len(x) - 1}")
    x_eval, y_eval, x_real = x[:-args.real], y[:-args.real], x[-args.real:]
    fp = peers.top1(args.model, x_eval, y_eval)
    defaults = Recipe()
    modes = {
        "closed": lambda b: (Recipe(**b, synthetic=0), None),
        "least squares": lambda b: (Recipe(**b, joint_steps=0, criterion="l1", prune_scope="layer",
                                           augment=False), None),
        "synthetic": lambda b: (Recipe(**b), None),
        "real": lambda b: (Recipe(**b), x_real),
    }
    seeds = [int(v) for v in args.seeds.split(",")]
    rows = []       # (config, mode, [top-1 per seed], mean wall, MACs)
    gaps = {}
    for name in args.configs.split(","):
        base = parse(name)
        accs = {}
        for mode, make in modes.items():
            accs[mode], walls = [], []
            for seed in seeds if mode != "closed" else seeds[:1]:   # the closed form uses no seed
                recipe, imgs = make(base)
                recipe = recipe.replace(seed=seed)
                t = time.perf_counter()
                result = compress(args.model, recipe, images=imgs)
                walls.append(time.perf_counter() - t)
                accs[mode].append(peers.top1(result.model, x_eval, y_eval))
                print(f"{name:10s} {mode:14s} seed {seed}  top-1 {100 * accs[mode][-1]:5.1f}  "
                      f"({100 * (accs[mode][-1] - fp):+5.1f})  {walls[-1]:5.1f} s  "
                      f"{result.summary.totals['macs_after'] / 1e6:5.1f} M MACs", flush=True)
            rows.append((name, mode, accs[mode], sum(walls) / len(walls), result.summary.totals["macs_after"]))
        gaps[name] = 100 * (_mean(accs["synthetic"]) - _mean(accs["real"]))
        print(f"{name:10s} synthetic - real (means): {gaps[name]:+.1f} pt", flush=True)

    lines = [
        f"# Synthetic vs real fitting images: {args.model.name}", "",
        "```", "python benchmarks/real_vs_synthetic.py " + " ".join(sys.argv[1:]), "```", "",
        f"Run {dt.datetime.now(dt.timezone.utc):%Y-%m-%d %H:%M} UTC. Top-1 on the first {len(x_eval)} images of "
        f"`{images.name}` (FP32 {100 * fp:.1f} %); the real mode fits on the last {args.real}, which no row is "
        f"scored on. Synthetic: {defaults.synthetic} images, {defaults.synthetic_steps} generator steps "
        "(mirrored and shifted copies added unless the mode says otherwise). "
        f"Seeds {args.seeds} (the closed form has none): top-1 per seed and their mean. "
        "Wall time is `compress()` with the synthetic images read from the cache, mean over seeds.", "",
        "| config | mode | top-1 per seed | mean | Δ FP32 | MMACs | wall s |", "|---|---|---|---|---|---|---|",
    ]
    for name, mode, acc, wall, macs in rows:
        lines.append(f"| {name} | {mode} | {' / '.join(f'{100 * a:.1f}' for a in acc)} | {100 * _mean(acc):.1f} | "
                     f"{100 * (_mean(acc) - fp):+.1f} | {macs / 1e6:.1f} | {wall:.1f} |")
    lines += ["", "Synthetic minus real, means over seeds: "
              + ", ".join(f"{n} {g:+.1f} pt" for n, g in gaps.items()) + "."]
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text("\n".join(lines) + "\n")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
