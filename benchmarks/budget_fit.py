"""The time-budget cost model's constants, fitted to measured compression times, and the
budget checked against the wall clock.

    python benchmarks/budget_fit.py [--quick]

For models of three kinds and sizes (the bundled ResNet-20 with BN kept, a CIFAR
ResNet-56 with random weights and BN kept, the YOLO-like detector of the test zoo
exported with BN folded and symbolic height/width), this measures ``t`` (seconds per
image for a forward and backward pass, :func:`budget.seconds_per_image`), compresses
each with the README's main job (``prune=0.3, wbits=4, abits=8``) at several image,
generator-step and joint-step counts from an empty image cache (the detector, whose
procedural images cost no generator steps, not at the largest), and fits

    wall ≈ T₀ + t · (G · n · s_gen + F · n + J · s_joint)

by non-negative least squares (the constants of ``toolchain/budget.py``).  Then each
model is compressed again with ``--time-budget`` at a few budgets, and the wall time
is set against the budget, with the trained ResNet-20's top-1 on the dev images
beside its recipe's own settings.  Writes ``benchmarks/results/budget.md``.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "tests"))
sys.path.insert(0, str(ROOT / "benchmarks"))
OUT = ROOT / "benchmarks" / "results" / "budget.md"

GRID = [dict(synthetic=64, synthetic_steps=40, joint_steps=0),
        dict(synthetic=64, synthetic_steps=40, joint_steps=300),
        dict(synthetic=128, synthetic_steps=80, joint_steps=100),
        dict(synthetic=256, synthetic_steps=80, joint_steps=300)]
MAIN_JOB = dict(prune=0.3, wbits=4, abits=8)


def _models(work: str, quick: bool) -> dict[str, tuple[str, bool]]:
    """name -> (path, whether its images are optimised: BN kept)."""
    import edge_zoo
    import zoo
    from fit_time import cifar_resnet

    models = {"ResNet-20 (BN kept)": (str(ROOT / "examples" / "models" / "resnet20_bn.onnx"), True)}
    if not quick:
        models["ResNet-56 (BN kept)"] = (zoo.export_model(zoo.randomize(cifar_resnet(56)), work, "r56",
                                                          (1, 3, 32, 32), 17), True)
    models["YOLO-like (BN folded, 224 x 224)"] = (edge_zoo.export("yolo_like", work, opset=17), False)
    return models


def _compress(path: str, **recipe) -> tuple[float, dict, object]:
    from datafree.toolchain.compress import compress
    from datafree.toolchain.recipe import Recipe

    os.environ["DATAFREE_CACHE"] = tempfile.mkdtemp()
    start = time.perf_counter()
    result = compress(path, Recipe(**MAIN_JOB, **recipe))
    return time.perf_counter() - start, result.summary.timings, result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="two models, two settings each")
    parser.add_argument("--budgets", default="20s,40s,2m")
    parser.add_argument("--checks-only", action="store_true",
                        help="only the budgets against the wall clock (the fit table is kept from the last run)")
    args = parser.parse_args()

    from scipy.optimize import nnls

    from datafree.toolchain import budget
    from datafree.toolchain.ingest import load

    work = tempfile.mkdtemp()
    rows, per_model = [], {}
    for name, (path, generates) in ([] if args.checks_only else _models(work, args.quick).items()):
        model = load(path)
        from datafree.toolchain import inputs

        shape = inputs.resolve(model).shape
        t = float(np.median([budget.seconds_per_image(model, shape) for _ in range(3)]))
        per_model[name] = dict(t=t, shape=list(shape), generates=generates)
        for g in ([GRID[0], GRID[2]] if args.quick else GRID if generates else GRID[:3]):
            wall, timings, _ = _compress(path, fit_budget="full", **g)
            rows.append(dict(model=name, t=t, generates=generates, wall=wall, timings=timings, **g))
            print(json.dumps(rows[-1]), flush=True)

    # wall = T0 + t (G n s_gen [generates] + F n + J s_joint)
    coef = None
    if rows:
        A = np.array([[1.0, r["t"] * r["synthetic"] * r["synthetic_steps"] * r["generates"], r["t"] * r["synthetic"],
                       r["t"] * r["joint_steps"]] for r in rows])
        y = np.array([r["wall"] for r in rows])
        coef, _ = nnls(A / y[:, None], np.ones_like(y))   # relative error: small and large models count alike
        for r, p in zip(rows, A @ coef):
            r["predicted"] = float(p)

    checks = []
    for name, (path, _) in _models(work, args.quick).items():
        for text in args.budgets.split(","):
            wall, timings, result = _compress(path, time_budget=text)
            note = next((h for h in result.summary.headline if h.startswith("time budget")), "settings as given")
            checks.append(dict(model=name, budget=budget.parse_duration(text), wall=wall, note=note,
                               top1=_top1(result.model) if name.startswith("ResNet-20") else None,
                               recipe={k: getattr(result.recipe, k) for k in ("synthetic", "synthetic_steps",
                                                                                 "joint_steps")}))
            print(json.dumps(checks[-1]), flush=True)
    if not args.quick:       # the recipe's own settings, for the trade-off
        r20 = _models(work, True)["ResNet-20 (BN kept)"][0]
        wall, _, result = _compress(r20)
        checks.append(dict(model="ResNet-20 (BN kept)", budget=float("nan"), wall=wall, note="no budget",
                           top1=_top1(result.model), recipe={k: getattr(result.recipe, k) for k in
                                                             ("synthetic", "synthetic_steps", "joint_steps")}))
    _write(per_model, rows, coef, checks, args)


def _top1(model) -> float | None:
    """Top-1 on the 1,000 dev images, where ../shared is beside the checkout."""
    import onnx_ir as ir
    import onnxruntime as ort

    from datafree.runtime.infer import load_images

    data = ROOT.parent / "shared" / "data" / "cifar10_dev.npz"
    if not data.exists():
        return None
    ds = load_images(str(data))
    sess = ort.InferenceSession(ir.serde.serialize_model(model).SerializeToString(), providers=["CPUExecutionProvider"])
    name = sess.get_inputs()[0].name
    logits = np.concatenate([sess.run(None, {name: ds.x[i:i + 100].astype(np.float32)})[0]
                             for i in range(0, len(ds.x), 100)])
    return float(100 * (logits.argmax(1) == ds.labels).mean())


def _commit() -> str:
    import subprocess

    try:
        return subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True, text=True,
                              check=True).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return "unknown"


def _write(per_model, rows, coef, checks, args) -> None:
    cmd = "python benchmarks/budget_fit.py" + (" --quick" if args.quick else "")
    lines = [
        "# Time budget: cost model and check", "", "```", cmd, "```", "",
        f"Method: the docstring of `benchmarks/budget_fit.py`. Recipe `prune=0.3, wbits=4, abits=8`, empty image "
        f"cache, {os.cpu_count()} cores.", ""]
    if coef is None:        # --checks-only: the fit as last measured
        old = OUT.read_text()
        lines += old[old.index("## Fitted constants"):old.index("## Budgets against")].rstrip().splitlines()
    else:
        t0, g, f, j = (float(c) for c in coef)
        lines += [
            "## Fitted constants (`toolchain/budget.py`)", "",
            f"Run {dt.datetime.now(dt.timezone.utc):%Y-%m-%d %H:%M} UTC, code {_commit()}.", "",
            f"wall ≈ {t0:.1f} s + t · ({g:.3f} · n · s_gen + {f:.2f} · n + {j:.2f} · s_joint)", "",
            "| model | t (ms per image pass) | n | s_gen | s_joint | wall s | predicted s | stages |",
            "|---|---|---|---|---|---|---|---|"]
        for r in rows:
            stages = ", ".join(f"{k} {v:.1f}" for k, v in r["timings"].items() if k != "total" and v >= 0.5)
            lines.append(f"| {r['model']} | {1e3 * r['t']:.2f} | {r['synthetic']} | "
                         f"{r['synthetic_steps'] if r['generates'] else '– (procedural)'} | {r['joint_steps']} | "
                         f"{r['wall']:.1f} | {r['predicted']:.1f} | {stages} |")
    lines += ["", "## Budgets against the wall clock", "",
              f"Run {dt.datetime.now(dt.timezone.utc):%Y-%m-%d %H:%M} UTC, code {_commit()}. Top-1 on the 1,000 dev images for the trained ResNet-20 (the others have random weights).", "",
              "| model | budget s | wall s | images, generator steps, joint steps | top-1 | summary |",
              "|---|---|---|---|---|---|"]
    for c in checks:
        rc = c["recipe"]
        top1 = f"{c['top1']:.1f}" if c.get("top1") is not None else "–"
        b = "none" if c["budget"] != c["budget"] else f"{c['budget']:.0f}"
        lines.append(f"| {c['model']} | {b} | {c['wall']:.1f} | {rc['synthetic']}, "
                     f"{rc['synthetic_steps']}, {rc['joint_steps']} | {top1} | {c['note']} |")
    OUT.write_text("\n".join(lines) + "\n")
    print(f"wrote {OUT}")


if __name__ == "__main__":
    main()
