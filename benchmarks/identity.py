"""Byte identity of compressed models: a change that only moves code writes the same bytes.

    python benchmarks/identity.py --record     # after a change that is meant to alter results
    python benchmarks/identity.py              # check: exit 1 and the recipes that differ

Compresses the bundled ResNet-20 (``examples/models/resnet20_bn.onnx``) with a fixed set
of recipes (closed form and on synthetic images; W8A8, W4A8, W4A4, prune 0.3 + W4A8,
prune 0.5 + W4; dynamic cascade and upfront), with small image counts so the whole set
runs in minutes, and compares each written model's sha256 with
``benchmarks/results/identity.json``.  Synthetic images come from a cache in a temporary
folder, made once per run.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
MODEL = ROOT / "examples" / "models" / "resnet20_bn.onnx"
RESULTS = ROOT / "benchmarks" / "results" / "identity.json"
SMALL = {"synthetic": 32, "synthetic_steps": 10, "joint_steps": 20}
RECIPES = {
    "w8a8-closed": {"wbits": 8, "abits": 8, "synthetic": 0},
    "w4a8-closed": {"wbits": 4, "abits": 8, "synthetic": 0},
    "w8a8": {"wbits": 8, "abits": 8, **SMALL},
    "w4a8": {"wbits": 4, "abits": 8, **SMALL},
    "w4a4": {"wbits": 4, "abits": 4, **SMALL},
    "p0.3-w4a8": {"prune": 0.3, "wbits": 4, "abits": 8, **SMALL},
    "p0.5-w4": {"prune": 0.5, "wbits": 4, **SMALL},
    "p0.5-w4-closed": {"prune": 0.5, "wbits": 4, "synthetic": 0},
    "dynamic-cascade": {"dynamic": {"bits": [4, 8], "target_bits": 6, "mode": "cascade", "steps": 20}, **SMALL},
    "dynamic-upfront": {"dynamic": {"bits": [4, 8], "target_bits": 6, "mode": "upfront", "steps": 20}, **SMALL},
}


def digests(names: list[str]) -> dict[str, str]:
    from datafree.exporters.writer import save
    from datafree.toolchain.compress import compress
    from datafree.toolchain.recipe import Recipe

    out = {}
    with tempfile.TemporaryDirectory() as tmp:
        for name in names:
            result = compress(MODEL, Recipe(**RECIPES[name]))
            path = Path(tmp) / f"{name}.onnx"
            save(result.model, path)
            out[name] = hashlib.sha256(path.read_bytes()).hexdigest()
            print(f"{name:18s} {out[name][:16]}", flush=True)
    return out


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--record", action="store_true", help="write the digests as the new reference")
    ap.add_argument("--only", default=None, help="comma-separated recipe names")
    args = ap.parse_args()
    os.environ.setdefault("DATAFREE_CACHE", tempfile.mkdtemp(prefix="datafree-identity-"))
    names = args.only.split(",") if args.only else list(RECIPES)
    got = digests(names)
    if args.record:
        old = json.loads(RESULTS.read_text()) if RESULTS.exists() else {}
        RESULTS.write_text(json.dumps({**old, **got}, indent=1, sort_keys=True) + "\n")
        print(f"recorded {len(got)} digests in {RESULTS.relative_to(ROOT)}")
        return 0
    want = json.loads(RESULTS.read_text())
    bad = [n for n in names if want.get(n) != got[n]]
    print("identical" if not bad else f"differ: {', '.join(bad)}")
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
