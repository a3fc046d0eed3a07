"""What keeping freed memory in the heap (``toolchain/heap.py``) saves, and that it changes nothing else.

    python benchmarks/heap.py [--quick]

Part 1: seconds per image of one forward and backward pass of each model's differentiable
copy (:func:`budget.seconds_per_image`, the generator's and fitting's unit of work) at
batches 8 to 64, with glibc's default allocator settings and inside ``heap.reused()``.
Each setting runs in its own interpreter (the settings are process-wide).  Models: the
bundled ResNet-20 (32 x 32), the test zoo's YOLO-like detector (224 x 224), and where
``rapidocr-onnxruntime`` is installed the PP-OCRv4 recogniser (48 x 192, the size the
compressor infers for it).

Part 2 (not with ``--quick``): the whole compression of two of them, from an empty
synthetic-image cache, both ways: the wall time, and whether the two models written are
the same bytes.  ResNet-20 with the README's main job; the recogniser (or, without it,
the detector) at W8A8 with the default settings (with fewer images, as ``--synthetic 64``,
the fitting budget makes them in one chunk of 32, where the two settings cost the same).

Writes ``benchmarks/results/heap.md``.
"""

from __future__ import annotations

import argparse
import datetime as dt
import hashlib
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "tests"))
sys.path.insert(0, str(ROOT / "benchmarks"))
OUT = ROOT / "benchmarks" / "results" / "heap.md"
BATCHES = (8, 16, 32, 64)
MODES = ("glibc defaults", "heap.reused()")


def _models(work: str) -> dict[str, tuple[str, tuple[int, ...]]]:
    import edge_zoo

    models = {"ResNet-20": (str(ROOT / "examples" / "models" / "resnet20_bn.onnx"), (3, 32, 32)),
              "YOLO-like": (str(edge_zoo.export("yolo_like", work, opset=17)), (3, 224, 224))}
    try:
        import real_models

        spec = next(s for s in real_models.MODELS if s.key == "ppocr-rec")
        models["PP-OCRv4 rec"] = (str(real_models.locate(spec)), (3, 48, 192))
    except Exception:  # not installed: the two own models only
        pass
    return models


def _child_times(path: str, shape: list[int], reused: bool) -> dict:
    import contextlib

    import onnx_ir as ir
    import torch

    from datafree.toolchain import heap
    from datafree.toolchain.budget import seconds_per_image

    torch.set_num_threads(os.cpu_count() or 1)
    model = ir.load(path)
    with heap.reused() if reused else contextlib.nullcontext():
        return {b: seconds_per_image(model, tuple(shape), batch=b, repeats=3) for b in BATCHES}


def _child_compress(path: str, recipe: dict, out: str, reused: bool) -> dict:
    import contextlib

    from datafree.exporters.writer import save
    from datafree.toolchain import compress as C
    from datafree.toolchain import heap
    from datafree.toolchain.recipe import Recipe

    if not reused:
        heap.reused = contextlib.nullcontext          # compress() then runs with glibc's defaults
    t = time.perf_counter()
    result = C.compress(path, Recipe(**recipe), measure=False)
    wall = time.perf_counter() - t
    save(result.model, out)
    return {"wall": wall, "sha": hashlib.sha256(Path(out).read_bytes()).hexdigest(),
            "timings": result.summary.timings}


def _in_child(kind: str, *args) -> dict:
    """Run ``_child_<kind>(*args)`` in a fresh interpreter with an empty image cache."""
    env = dict(os.environ, DATAFREE_CACHE=tempfile.mkdtemp(prefix="heap-cache-"))
    for key in ("MALLOC_MMAP_THRESHOLD_", "MALLOC_TRIM_THRESHOLD_"):
        env.pop(key, None)
    code = (f"import json, sys; sys.path[:0] = {[str(ROOT / 'benchmarks'), str(ROOT / 'tests')]!r}; "
            f"import heap as H; print(json.dumps(H._child_{kind}(*json.loads(sys.argv[1]))))")
    done = subprocess.run([sys.executable, "-c", code, json.dumps(args)], env=env, capture_output=True,
                          text=True, check=True)
    return json.loads(done.stdout.strip().splitlines()[-1])


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--quick", action="store_true", help="per-image times only")
    p.add_argument("--out", type=Path, default=OUT)
    args = p.parse_args(argv)
    work = tempfile.mkdtemp(prefix="heap-")
    models = _models(work)
    commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True,
                            text=True).stdout.strip()
    lines = ["# Freed memory kept in the heap while compressing", "",
             "```", "python benchmarks/heap.py" + (" --quick" if args.quick else ""), "```", "",
             f"Run {dt.datetime.now(dt.timezone.utc):%Y-%m-%d %H:%M} UTC, code {commit}, {os.cpu_count()} cores. "
             "What is measured: the docstring of `benchmarks/heap.py`.", "",
             "## Forward and backward pass, ms per image", "",
             "| model | allocator | " + " | ".join(f"batch {b}" for b in BATCHES) + " |",
             "|---|---|" + "---|" * len(BATCHES)]
    for name, (path, shape) in models.items():
        for mode, reused in zip(MODES, (False, True)):
            t = _in_child("times", path, list(shape), reused)
            lines.append(f"| {name} {shape[1]}x{shape[2]} | {mode} | "
                         + " | ".join(f"{1e3 * t[str(b)]:.1f}" for b in BATCHES) + " |")
            print(lines[-1], flush=True)
    if not args.quick:
        lines += ["", "## Whole compression from an empty image cache", "",
                  "| model | recipe | glibc defaults, s | heap.reused(), s | ratio | same bytes |",
                  "|---|---|---|---|---|---|"]
        second = "PP-OCRv4 rec" if "PP-OCRv4 rec" in models else "YOLO-like"
        jobs = [("ResNet-20", dict(prune=0.3, wbits=4, abits=8)), (second, dict(wbits=8, abits=8))]
        for name, recipe in jobs:
            path, shape = models[name]
            got = [_in_child("compress", path, recipe, os.path.join(work, f"{name}-{i}.onnx"), reused)
                   for i, reused in enumerate((False, True))]
            lines.append(f"| {name} | {json.dumps(recipe)} | {got[0]['wall']:.0f} | {got[1]['wall']:.0f} | "
                         f"{got[1]['wall'] / got[0]['wall']:.2f} | {'yes' if got[0]['sha'] == got[1]['sha'] else 'no'} |")
            print(lines[-1], flush=True)
    args.out.write_text("\n".join(lines) + "\n")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
