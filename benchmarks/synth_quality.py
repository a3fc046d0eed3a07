"""How good and how fast are the synthetic images?

For each model: wall time of ``synth.generate``, the FP model's top-1 agreement with
each image's target class, and the mean BN-statistics loss of the images measured
on ``resnet20_bn`` (the folded model is the same network with BN folded, so its
output-only images can be judged by the statistics they never saw).  Gaussian
noise and real CIFAR-10 images (``examples/data``) give the scale of the numbers.

    python benchmarks/synth_quality.py [--n 256] [--steps 80] [--lr 0.25] [--threads 2]

CPU time is reported beside wall time: on a shared machine it is the fairer number.
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import numpy as np
import torch

from datafree.toolchain import synth
from datafree.toolchain.ingest import load

ROOT = Path(__file__).resolve().parents[1]
MODELS = ROOT / "examples" / "models"


def real_images(count: int) -> tuple[np.ndarray, np.ndarray]:
    data = np.load(ROOT / "examples" / "data" / "cifar10_dev500.npz")
    x = data["images"][:count].astype(np.float32) / 255.0
    x = (x - data["mean"]) / data["std"]
    return np.ascontiguousarray(x.transpose(0, 3, 1, 2)), data["labels"][:count]


def describe(label: str, terms: dict[str, float], seconds: tuple[float, float] | None = None) -> None:
    when = f"{seconds[0]:6.1f} s wall {seconds[1]:6.1f} s CPU" if seconds is not None else " " * 25
    print(f"{label:<34} {when}  top-1 agreement {terms['top1_agreement']:6.1%}   "
          f"BN loss {terms['bn']:7.3f}   CE {terms['ce']:6.3f}")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--n", type=int, default=256)
    ap.add_argument("--steps", type=int, default=None, help="default: the generator's own default")
    ap.add_argument("--lr", type=float, default=None)
    ap.add_argument("--batch-size", type=int, default=64)
    ap.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's choice)")
    ap.add_argument("--models", nargs="+", default=["resnet20_bn", "resnet20_folded"])
    args = ap.parse_args()
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    if args.lr is not None:
        synth.LR = args.lr
    kwargs = {"steps": args.steps} if args.steps is not None else {}

    judge_model = load(MODELS / "resnet20_bn.onnx")
    judge = synth._Generator(judge_model, synth.sample_shape(judge_model))

    real, labels = real_images(args.n)
    onehot = np.eye(judge.num_classes, dtype=np.float32)[labels]
    describe("real CIFAR-10 (true labels)", judge.evaluate(real, onehot))
    noise = np.random.default_rng(0).standard_normal(real.shape).astype(np.float32)
    describe("Gaussian noise", judge.evaluate(noise, onehot))

    for name in args.models:
        model = load(MODELS / f"{name}.onnx")
        t0, c0 = time.perf_counter(), time.process_time()
        s = synth.generate(model, args.n, batch_size=args.batch_size, cache=False, **kwargs)
        seconds = (time.perf_counter() - t0, time.process_time() - c0)
        own = synth._Generator(model, synth.sample_shape(model)).evaluate(s.images, s.targets)
        on_bn = judge.evaluate(s.images, s.targets)
        describe(f"{name} ({s.source})", {**on_bn, "top1_agreement": own["top1_agreement"]}, seconds)
        print(f"{'':<34}{'':<26} image mean {s.images.mean():+.3f} std {s.images.std():.3f}; "
              f"target max prob {s.targets.max(1).mean():.2f}")


if __name__ == "__main__":
    main()
