"""Dynamic precision on ResNet-20: is a per-image choice better than a fixed one at equal cost?

    python benchmarks/dynamic_bench.py [--targets 4.5,5,5.5,6] [--modes cascade,upfront] [--synthetic 256]

For each mode and target average bit-width: the dynamic model (bits 4/6/8, three
stage groups, selector trained on synthetic images only) against every fixed-precision
configuration of the same plan (same calibration, same weights), on the dev images
(``../shared/data/cifar10_dev.npz`` if present, else ``examples/data/cifar10_dev500.npz``).
"Equal cost" = the best fixed configuration whose BOPs per image are at most the
dynamic model's mean BOPs (selector included).  Writes ``benchmarks/results/dynamic.md``.
"""

from __future__ import annotations

import argparse
from collections import Counter
from dataclasses import dataclass
import time
from pathlib import Path

import numpy as np
import onnx

from datafree.ops.domain import config_label
from datafree.runtime import InferenceSession
from datafree.runtime.infer import ImageSet, load_images, predict
from datafree.runtime.retarget import retarget
from datafree.toolchain.ingest import load
from datafree.toolchain.passes import speed
from datafree.toolchain.passes.dynamic import (run_values, build_fixed, config_key, correct_biases, enumerate_configs,
                                                fit_dynamic)
from datafree.toolchain.recipe import DynamicConfig, Recipe
from datafree.toolchain.synth import generate

ROOT = Path(__file__).resolve().parents[1]
MODEL = ROOT / "examples/models/resnet20_bn.onnx"
SHARED = ROOT.parent / "shared/data/cifar10_dev.npz"
DEV = SHARED if SHARED.exists() else ROOT / "examples/data/cifar10_dev500.npz"
OUT = ROOT / "benchmarks/results/dynamic.md"


@dataclass
class Fixed:
    """One fixed-precision configuration of the plan, measured on the dev images."""

    label: str
    bits: float
    bops: float
    correct: np.ndarray          # [dev images] bool
    on_front: bool

    @property
    def accuracy(self) -> float:
        return float(self.correct.mean())


@dataclass
class Retargeted:
    """The model retargeted on unlabeled dev images, scored on the others."""

    bits: float                  # mean bits on the scored images
    accuracy: float
    fp_accuracy: float           # the float model on the same images
    best_fixed: str              # best fixed configuration within the BOPs (dev labels), on the same images
    best_fixed_accuracy: float


@dataclass
class Row:
    """One dynamic model (mode, target) and what it is compared with."""

    mode: str
    target: float
    pred: object                 # datafree.runtime.infer prediction on the dev images
    stats: dict
    bops: float                  # mean BOPs per dev image, selector included
    rerun: float | None          # share of dev images a cascade reruns
    fixed: list[Fixed]
    best_any: Fixed | None       # best of all mixes within the BOPs (dev-label oracle)
    best_front: Fixed | None     # best on the Pareto front within the BOPs
    best_uniform: Fixed | None
    best_datafree: Fixed | None  # lowest synthetic probe loss within the BOPs
    latency: dict
    retargeted: list             # per split of the dev images: Retargeted


def _correct(model, images) -> np.ndarray:
    name = model.graph.output[0].name
    logits = run_values(model, images.x, [name])[name]
    return logits.argmax(axis=1) == images.labels


def _choices(bits: np.ndarray, configs) -> np.ndarray:
    """Each image's configuration, as an index into ``configs``, from the model's ``bits`` output."""
    index = {config_label(c): k for k, c in enumerate(configs)}
    return np.array([index[config_label(b)] for b in bits])


def _retargeted(model, dev, target: float, bops_cfg: np.ndarray, selector_bops: float, fixed: list[Fixed],
                fp_correct: np.ndarray, splits: int, n_cal: int) -> list[Retargeted]:
    """Retarget on ``n_cal`` random dev images (labels unused), score on the rest; per split."""
    out = []
    for split in range(splits):
        order = np.random.default_rng(split).permutation(len(dev.x))
        cal, ev = order[:n_cal], np.sort(order[n_cal:])
        held, _ = retarget(model, dev.x[cal], target)
        session = InferenceSession(held)
        pred = predict(session, ImageSet(x=dev.x[ev], labels=dev.labels[ev]), batch=100)
        chosen = _choices(pred.bits, session.dynamic_metadata["configs"])
        bops = float(bops_cfg[chosen].mean()) + selector_bops
        best = max((f for f in fixed if f.bops <= bops), key=lambda f: f.correct[ev].mean(), default=None)
        out.append(Retargeted(bits=float(pred.avg_bits.mean()), accuracy=float(pred.accuracy),
                              fp_accuracy=float(fp_correct[ev].mean()), best_fixed=best.label if best else "none",
                              best_fixed_accuracy=float(best.correct[ev].mean()) if best else float("nan")))
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--targets", default="4.5,5,5.5,6")
    ap.add_argument("--modes", default="cascade,upfront", help="dynamic modes to compare")
    ap.add_argument("--synthetic", type=int, default=Recipe().synthetic, help="as compress --dynamic generates")
    ap.add_argument("--synthetic-steps", type=int, default=Recipe().synthetic_steps)
    ap.add_argument("--selector-steps", type=int, default=300)
    ap.add_argument("--no-augment", dest="augment", action="store_false",
                    help="train and probe on the synthetic images alone, without mirrored and shifted copies")
    ap.add_argument("--retarget-images", type=int, default=256,
                    help="unlabeled dev images the retargeted rows are priced on (scored on the others)")
    ap.add_argument("--retarget-splits", type=int, default=3)
    args = ap.parse_args()
    targets = [float(t) for t in args.targets.split(",")]
    modes = args.modes.split(",")

    model = load(MODEL)
    dev = load_images(DEV)
    t0 = time.perf_counter()
    syn = generate(model, args.synthetic, steps=args.synthetic_steps, seed=0)
    t_syn = time.perf_counter() - t0
    fp_model = onnx.load(str(MODEL))
    fp_name = fp_model.graph.output[0].name
    fp_correct = run_values(fp_model, dev.x, [fp_name])[fp_name].argmax(axis=1) == dev.labels
    fp_acc = float(fp_correct.mean())

    lines = ["# Dynamic precision on ResNet-20 (CIFAR-10)", "",
             f"Dev images: `{DEV.relative_to(ROOT.parent) if DEV == SHARED else DEV.relative_to(ROOT)}` "
             f"({len(dev.x)}), float model {100 * fp_acc:.2f} %.  Candidates 4/6/8 bits (weights and the "
             f"layer's input activations), three stage groups, stem at 8 bits.  Synthetic set: "
             f"{args.synthetic} images × {args.synthetic_steps} steps "
             f"({'%.0f s' % t_syn if t_syn > 1 else 'from the cache'}); no real image is used before evaluation.",
             ""]
    rows_all = []
    fixed_cache: dict[str, np.ndarray] = {}
    for mode, target in ((m, t) for m in modes for t in targets):
        cfg = DynamicConfig(bits=(4, 6, 8), target_bits=target, steps=args.selector_steps, mode=mode)
        result = fit_dynamic(model, cfg, synthetic=syn, augment=args.augment)
        plan, stats = result.plan, result.stats
        session = InferenceSession(result.model)
        pred = predict(session, dev, batch=100)
        bops_cfg = np.asarray(stats["config_bops"], np.float64)     # a cascade's reruns cost both passes
        chosen = _choices(pred.bits, plan.configs)
        dyn_bops = float(bops_cfg[chosen].mean()) + stats["selector"]["bops"]
        all_cfgs = enumerate_configs(plan.candidates, len(plan.groups))
        fixed = []
        for c in all_cfgs:
            key = config_label(c)   # the plan does not depend on the target (same split, same calibration)
            if key not in fixed_cache:
                # the fixed model as good as the cascade's passes: its biases corrected on the same
                # synthetic images (a configuration the cascade runs is already corrected)
                if cfg.bias_correction and config_key(c) not in plan.biases:
                    correct_biases(plan, c, result.images[result.train])
                fixed_cache[key] = _correct(build_fixed(plan, c), dev)
            fixed.append(Fixed(key, float(plan.avg_bits(c[None])[0]), float(plan.bops(c[None])[0]), fixed_cache[key],
                               key in stats["front"]["configs"]))
        affordable = [f for f in fixed if f.bops <= dyn_bops]
        best = lambda fs: max(fs, key=lambda f: f.accuracy, default=None)  # noqa: E731
        best_all = best(affordable)
        best_cand = best(f for f in affordable if f.on_front)
        best_uniform = best(f for f in affordable if len(set(f.label.split("/"))) == 1)
        lat = speed.measure(fp_model.SerializeToString(), result.model.SerializeToString(),
                            tuple(dev.x.shape[1:])).ratios()      # plain sessions, float model in the same run
        # does the selector spot easy images? float accuracy on the images it sends low vs high
        low = pred.avg_bits <= np.median(pred.avg_bits)
        if low.all() and len(np.unique(pred.avg_bits)) > 1:
            low = pred.avg_bits <= pred.avg_bits.min()
        stats["spotting"] = {"low_n": int(low.sum()), "low_fp_acc": float(fp_correct[low].mean()),
                             "high_n": int((~low).sum()),
                             "high_fp_acc": float(fp_correct[~low].mean()) if (~low).any() else float("nan"),
                             "low_dyn_acc": float((pred.predictions == dev.labels)[low].mean()),
                             "high_dyn_acc": float((pred.predictions == dev.labels)[~low].mean())
                             if (~low).any() else float("nan")}
        # what a user without data would pick: the candidate with the lowest synthetic probe loss within the BOPs
        by_loss = [(config_label(c), loss) for c, loss in zip(all_cfgs, result.config_probe_loss)
                   if plan.bops(c[None])[0] <= dyn_bops]
        pick = min(by_loss, key=lambda t: t[1])[0] if by_loss else None
        best_datafree = next((f for f in fixed if f.label == pick), None)
        held = _retargeted(result.model, dev, target, bops_cfg, stats["selector"]["bops"], fixed, fp_correct,
                           args.retarget_splits, args.retarget_images)
        rows_all.append(Row(mode=mode, target=target, pred=pred, stats=stats, bops=dyn_bops,
                            rerun=float(np.mean(chosen > 0)) if mode == "cascade" else None, fixed=fixed,
                            best_any=best_all, best_front=best_cand, best_uniform=best_uniform,
                            best_datafree=best_datafree, latency=lat, retargeted=held))

        print(f"{mode} target {target}: dynamic {100 * pred.accuracy:.2f} % at {pred.avg_bits.mean():.2f} bits, "
              f"{dyn_bops / 1e9:.3f} GBOPs; best fixed at <= BOPs: "
              f"{best_all.label if best_all else '-'} {100 * best_all.accuracy if best_all else float('nan'):.2f} %")

    lines += ["## Dynamic model vs fixed precision at equal BOPs", "",
              "Fixed columns: configuration: dev top-1 (GBOPs/image), among configurations with at most the "
              "dynamic model's BOPs.  *Picked without data* = the configuration (of all 27) with the lowest "
              "loss on the held-out synthetic images (what a user without data can choose); the other fixed columns are "
              "chosen with the dev labels, an oracle (*front*: the Pareto front of (bits, synthetic loss) both modes "
              "choose from; *any mix*: all 27 mixes of 4/6/8 bits over the three groups).  Mean bits and GBOPs "
              "count a cascade's rerun images twice (both passes).", "",
              "× float: time in a plain onnxruntime session (default options, the model's ONNX function "
              "bodies) as a ratio to the float model's, timed alternately in the same run, at batch 1 and 64.", "",
              "| mode | target bits | dynamic top-1 | mean bits (dev) | mean bits (probes) | rerun (dev) | GBOPs/image | × float @1 | × float @64 | fixed, picked without data | best fixed of the front | best fixed, any mix | best uniform |",
              "|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
    fmt = (lambda f: f"{f.label}: {100 * f.accuracy:.2f} % ({f.bops / 1e9:.3f})" if f else "none")  # noqa: E731
    for r in rows_all:
        lines.append(f"| {r.mode} | {r.target:.1f} | {100 * r.pred.accuracy:.2f} % | {r.pred.avg_bits.mean():.2f} | "
                     f"{r.stats['expected_bits']:.2f} | {'–' if r.rerun is None else f'{100 * r.rerun:.1f} %'} | "
                     f"{r.bops / 1e9:.3f} | {r.latency[1]:.2f} | {r.latency[max(r.latency)]:.2f} | "
                     f"{fmt(r.best_datafree)} | {fmt(r.best_front)} | "
                     f"{fmt(r.best_any)} | {fmt(r.best_uniform)} |")
    lines += ["", "Cascades chosen: " + "; ".join(
        f"target {r.target:.1f}: {r.stats['configs'][-1]}"
        for r in rows_all if r.mode == "cascade") + ".", ""]
    lines += ["", "## Retargeted on unlabeled inputs", "",
              f"`datafree retarget` re-prices each model's selector on {args.retarget_images} dev images drawn at "
              f"random (their labels unused) and the model is scored on the other {len(dev.x) - args.retarget_images}; "
              f"means over {args.retarget_splits} draws.  This uses real inputs (not their labels): what a device "
              "that sees its own inputs can do after the data-free compression; the table above is the data-free "
              "result.  Best fixed: the dev-label oracle over all 27 mixes (biases corrected as above) within the "
              "retargeted model's BOPs, on the same images.", "",
              "| mode | target bits | mean bits (scored images) | dynamic top-1 | float top-1 | Δ float | "
              "best fixed, any mix | Δ best fixed |", "|---|---|---|---|---|---|---|---|"]
    for r in rows_all:
        h = r.retargeted
        acc, fp = np.mean([t.accuracy for t in h]), np.mean([t.fp_accuracy for t in h])
        fixed_acc = np.mean([t.best_fixed_accuracy for t in h])
        names = " or ".join(dict.fromkeys(t.best_fixed for t in h))       # each draw's, in order, once
        lines.append(f"| {r.mode} | {r.target:.1f} | {np.mean([t.bits for t in h]):.2f} | {100 * acc:.2f} % | "
                     f"{100 * fp:.2f} % | {100 * (acc - fp):+.2f} | {names}: {100 * fixed_acc:.2f} % | "
                     f"{100 * (acc - fixed_acc):+.2f} |")
    first = rows_all[0]
    lines += ["", f"## Configurations ({first.mode}, target {first.target:.1f})", "",
              "Chosen on the dev images by the selector; every configuration's own fixed-precision accuracy.", "",
              "| configuration | avg bits | GBOPs | fixed top-1 | on the front | images (dev) |", "|---|---|---|---|---|---|"]
    hist = Counter(config_label(b) for b in first.pred.bits)      # images per final configuration
    for f in sorted(first.fixed, key=lambda f: f.bops):
        lines.append(f"| {f.label} | {f.bits:.2f} | {f.bops / 1e9:.3f} | {100 * f.accuracy:.2f} % | "
                     f"{'yes' if f.on_front else ''} | {hist.get(f.label, '')} |")
    lines += ["", "## Does the selector spot easy images?", "",
              "Dev images split by the bits the selector gave them (at or below the median vs above); "
              "the float model's accuracy on each part says whether the cheap part is the easy part.", "",
              "| mode | target | images given fewer bits | float top-1 there | dynamic top-1 there | images given more bits | float top-1 there | dynamic top-1 there |",
              "|---|---|---|---|---|---|---|---|"]
    for r in rows_all:
        sp = r.stats["spotting"]
        if not sp["high_n"]:
            lines.append(f"| {r.mode} | {r.target:.1f} | {sp['low_n']} (one configuration for all) | "
                         f"{100 * sp['low_fp_acc']:.1f} % | {100 * sp['low_dyn_acc']:.1f} % | 0 | – | – |")
            continue
        lines.append(f"| {r.mode} | {r.target:.1f} | {sp['low_n']} | {100 * sp['low_fp_acc']:.1f} % | {100 * sp['low_dyn_acc']:.1f} % | "
                     f"{sp['high_n']} | {100 * sp['high_fp_acc']:.1f} % | {100 * sp['high_dyn_acc']:.1f} % |")
    sel = first.stats["selector"]
    lines += ["", "## Cost", "",
              f"- Selector: {sel['params']} parameters, {sel['macs']} MACs + {sel['pool_adds']} adds of pooling, "
              f"run in float32: {sel['bops'] / 1e6:.1f} MBOPs = {sel['bops_pct_of_model']:.2f} % of the model's "
              f"expected BOPs.",
              f"- Wall time (2 cores, shared): synthetic images {'%.0f s' % t_syn if t_syn > 1 else 'cached'}; "
              + "; ".join(f"{r.mode} target {r.target:.1f}: selector training "
                          f"{r.stats['seconds']['selector_training']:.1f} s, "
                          + (f"bias correction {r.stats['seconds']['bias_correction']:.0f} s, "
                             if r.stats['seconds'].get('bias_correction') else "") + "whole pass "
                          f"{r.stats['seconds']['total']:.0f} s" for r in rows_all) + ".",
              f"- Latency: the × float columns above (batch 1 and {max(first.latency)}).", ""]
    OUT.parent.mkdir(parents=True, exist_ok=True)
    OUT.write_text("\n".join(lines))
    print("\n".join(lines))


if __name__ == "__main__":
    main()
