"""ResNet-20 on CIFAR-10, end to end: compress without data, then measure.

    python examples/resnet20_end_to_end.py --out build/ --prune 0.3 --wbits 4 --abits 8

Compresses the bundled ResNet-20 with the library call, writes the result, runs
``datafree report`` on it (into ``OUT/report/``) when that command is installed, and measures top-1
accuracy of the original and the compressed model on the 500 bundled CIFAR-10
test images (which the compression never sees).
"""

from __future__ import annotations

import argparse
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import onnxruntime as ort

from datafree.exporters import save
from datafree.toolchain.compress import compress
from datafree.toolchain.recipe import Recipe

HERE = Path(__file__).resolve().parent
MODEL = HERE / "models" / "resnet20_bn.onnx"
IMAGES = HERE / "data" / "cifar10_dev500.npz"


def load_images(path: Path) -> tuple[np.ndarray, np.ndarray]:
    """uint8 NHWC images -> float32 NCHW normalised with the file's mean/std, and labels."""
    d = np.load(path)
    x = (d["images"].astype(np.float32) / 255.0 - d["mean"]) / d["std"]
    return np.ascontiguousarray(x.transpose(0, 3, 1, 2), dtype=np.float32), d["labels"]


def accuracy(model_path: Path, x: np.ndarray, y: np.ndarray) -> float:
    sess = ort.InferenceSession(str(model_path), providers=["CPUExecutionProvider"])
    name = sess.get_inputs()[0].name
    logits = np.concatenate([sess.run(None, {name: x[i:i + 100]})[0] for i in range(0, len(x), 100)])
    return float((logits.argmax(1) == y).mean())


def report(path: Path, reference: Path, images: Path, folder: Path) -> None:
    """Run ``datafree report`` (what compression cost) if this install has that command."""
    from datafree.toolchain.cli import main

    if "report" not in main.commands:
        print("(datafree report is not available in this install)")
        return
    cmd = [sys.executable, "-c", "from datafree.toolchain.cli import main; main()", "report", str(path),
           "--reference", str(reference), "--images", str(images), "--out", str(folder)]
    done = subprocess.run(cmd, capture_output=True, text=True)
    print(done.stdout if done.returncode == 0 else f"(datafree report failed: {done.stderr.strip()})")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", type=Path, required=True, help="folder for the compressed model")
    p.add_argument("--model", type=Path, default=MODEL)
    p.add_argument("--images", type=Path, default=IMAGES)
    p.add_argument("--prune", type=float, default=0.3)
    p.add_argument("--wbits", type=int, default=4)
    p.add_argument("--abits", type=int, default=8)
    p.add_argument("--synthetic", type=int, default=Recipe.synthetic, help="synthetic images for fitting")
    p.add_argument("--synthetic-steps", type=int, default=Recipe.synthetic_steps)
    args = p.parse_args()

    args.out.mkdir(parents=True, exist_ok=True)
    recipe = Recipe(prune=args.prune, wbits=args.wbits, abits=args.abits,
                    synthetic=args.synthetic, synthetic_steps=args.synthetic_steps)
    t = time.perf_counter()
    result = compress(args.model, recipe)
    out = save(result.model, args.out / "resnet20_small.onnx")
    print(f"compressed in {time.perf_counter() - t:.1f}s -> {out}")
    for key, value in result.summary.totals.items():
        print(f"  {key:<22} {value:,.0f}")

    report(out, args.model, args.images, args.out / "report")

    x, y = load_images(args.images)
    before, after = accuracy(args.model, x, y), accuracy(out, x, y)
    size_before = args.model.stat().st_size
    print(f"top-1 on {len(y)} CIFAR-10 test images: {before:.1%} -> {after:.1%}")
    print(f"file size: {size_before / 1024:.0f} KiB -> {out.stat().st_size / 1024:.0f} KiB")


if __name__ == "__main__":
    main()
