"""Time ``datafree report`` on ResNet-20: without bounds (target < 10 s), with --bounds (target < 2 min).

    python benchmarks/report_bench.py [--budget 60] [--probes 16]

Probes are the model's own synthetic images.  They are generated once into a
fresh cache (timed on its own, since every later report reuses them), then the
two reports run as a user would run them.
"""

from __future__ import annotations

import argparse
import os
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
MODEL = ROOT / "examples" / "models" / "resnet20_bn.onnx"


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--budget", type=float, default=60.0, help="--bounds-budget in seconds")
    ap.add_argument("--probes", type=int, default=16)
    ap.add_argument("--steps", type=int, default=50)
    args = ap.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        os.environ["DATAFREE_CACHE"] = str(Path(tmp) / "cache")
        from datafree.toolchain import ingest, synth
        from datafree.toolchain.report import build_report, write_report

        t0 = time.perf_counter()
        rep = build_report(MODEL, target="cortex-a55", bits=(8, 6, 4))
        write_report(rep, Path(tmp) / "before")
        t_plain = time.perf_counter() - t0
        print(f"report, no bounds:            {t_plain:6.1f} s  (target < 10 s)")

        t0 = time.perf_counter()
        synth.generate(ingest.load(MODEL), args.probes, steps=args.steps, seed=0)
        t_synth = time.perf_counter() - t0
        print(f"synthetic probes ({args.probes} x {args.steps} steps, cold cache): {t_synth:6.1f} s")

        t0 = time.perf_counter()
        rep = build_report(MODEL, target="cortex-a55", bits=(8, 6, 4), bounds=True, bounds_budget=args.budget,
                           n_probes=args.probes, synth_steps=args.steps)
        write_report(rep, Path(tmp) / "bounds")
        t_bounds = time.perf_counter() - t0
        print(f"report --bounds (cached probes): {t_bounds:6.1f} s  (target < 2 min)")
        for r in rep.doc["bounds"]["layers"]:
            print(f"  {r['layer']:<16} n={r['n']:<3} channels {r['channels']}/{r['out_channels']}  "
                  f"RTN {r['rtn_db']:.2f} dB  best {r['best_db']:.2f} dB  limit {r['limit_db']:.2f} dB  "
                  f"{r['seconds']:.1f} s")
        print(f"  skipped: {len(rep.doc['bounds']['skipped'])} layers (input dimension > 64)")


if __name__ == "__main__":
    main()
