"""A model with a hand-written activation, through the export-and-compress pipeline.

    python examples/custom_activation.py --out build/

``Mish`` below is written out as ``x * tanh(softplus(x))``, so it exports as three
plain ONNX ops (Softplus, Tanh, Mul) rather than one known activation.  The
compressor follows channels through elementwise ops, so the convolutions around
it are still pruned and quantized.  The example prints what happened to each layer.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np
import onnxruntime as ort
import torch
from torch import nn

from datafree.exporters import export, save
from datafree.toolchain.compress import compress
from datafree.toolchain.recipe import Recipe


class Mish(nn.Module):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * torch.tanh(nn.functional.softplus(x))


def block(cin: int, cout: int, stride: int = 1) -> nn.Sequential:
    return nn.Sequential(nn.Conv2d(cin, cout, 3, stride, 1, bias=False), nn.BatchNorm2d(cout), Mish())


class SmallNet(nn.Module):
    def __init__(self, classes: int = 10) -> None:
        super().__init__()
        self.features = nn.Sequential(block(3, 32), block(32, 64, 2), block(64, 64), block(64, 128, 2))
        self.head = nn.Linear(128, classes)
        g = torch.Generator().manual_seed(0)
        with torch.no_grad():
            for m in self.modules():
                if isinstance(m, nn.BatchNorm2d):  # statistics away from (0, 1), as after training
                    m.weight.copy_(0.5 + torch.rand(m.num_features, generator=g))
                    m.bias.copy_(0.2 * torch.randn(m.num_features, generator=g))
                    m.running_mean.copy_(0.2 * torch.randn(m.num_features, generator=g))
                    m.running_var.copy_(0.5 + torch.rand(m.num_features, generator=g))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.features(x).mean(dim=(2, 3)))


def run(path: Path, x: np.ndarray) -> np.ndarray:
    sess = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    return sess.run(None, {sess.get_inputs()[0].name: x})[0]


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", type=Path, required=True)
    p.add_argument("--prune", type=float, default=0.25)
    p.add_argument("--wbits", type=int, default=8)
    p.add_argument("--abits", type=int, default=8)
    p.add_argument("--synthetic", type=int, default=Recipe.synthetic)
    p.add_argument("--synthetic-steps", type=int, default=Recipe.synthetic_steps)
    args = p.parse_args()

    args.out.mkdir(parents=True, exist_ok=True)
    model = SmallNet().eval()
    recipe = Recipe(prune=args.prune, wbits=args.wbits, abits=args.abits,
                    synthetic=args.synthetic, synthetic_steps=args.synthetic_steps)

    # The pipeline in three lines; the summary tells which layers were changed and why not.
    float_path = export(model, torch.zeros(1, 3, 32, 32), args.out / "mish_net.onnx")
    result = compress(float_path, recipe)
    small = save(result.model, args.out / "mish_net_small.onnx")

    for row in result.summary.rows:
        bits = f"W{row.wbits or 'f'}A{row.abits or 'f'}"
        print(f"  {row.name:<28} {row.op:<5} {row.channels_before:>4} -> {row.channels_after:<4} {bits}")
    for name, why in result.summary.skipped.items():
        print(f"  not pruned: {name}: {why}")

    x = np.random.default_rng(0).standard_normal((16, 3, 32, 32)).astype(np.float32)
    ref, out = run(float_path, x), run(small, x)
    cos = float((ref * out).sum() / (np.linalg.norm(ref) * np.linalg.norm(out) + 1e-12))
    print(f"{small}: {float_path.stat().st_size / 1024:.0f} KiB -> {small.stat().st_size / 1024:.0f} KiB, "
          f"cosine to float outputs {cos:.4f}")


if __name__ == "__main__":
    main()
