"""MobileNetV2 from torch to a compressed ONNX file in one call.

    python examples/mobilenetv2_pipeline.py --out build/ [--width 1.0 --resolution 224]

The network is torchvision's MobileNetV2, written out here so the example needs
only torch.  Weights are random (with non-trivial BatchNorm statistics), which is
enough to show the pipeline: ``compress_module`` exports with BN kept, compresses
without data and writes the file atomically.  The example then compares the float
and compressed models on random inputs.
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import numpy as np
import onnxruntime as ort
import torch
from torch import nn

from datafree.exporters import compress_module, export
from datafree.toolchain.recipe import Recipe


def _make_divisible(v: float, divisor: int = 8) -> int:
    new_v = max(divisor, int(v + divisor / 2) // divisor * divisor)
    return new_v + divisor if new_v < 0.9 * v else new_v


class ConvBNReLU6(nn.Sequential):
    def __init__(self, cin: int, cout: int, kernel: int = 3, stride: int = 1, groups: int = 1) -> None:
        super().__init__(nn.Conv2d(cin, cout, kernel, stride, (kernel - 1) // 2, groups=groups, bias=False),
                         nn.BatchNorm2d(cout), nn.ReLU6(inplace=True))


class InvertedResidual(nn.Module):
    def __init__(self, cin: int, cout: int, stride: int, expand_ratio: int) -> None:
        super().__init__()
        hidden = int(round(cin * expand_ratio))
        self.use_res_connect = stride == 1 and cin == cout
        layers: list[nn.Module] = [ConvBNReLU6(cin, hidden, kernel=1)] if expand_ratio != 1 else []
        layers += [ConvBNReLU6(hidden, hidden, stride=stride, groups=hidden),
                   nn.Conv2d(hidden, cout, 1, bias=False), nn.BatchNorm2d(cout)]
        self.conv = nn.Sequential(*layers)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.conv(x) if self.use_res_connect else self.conv(x)


class MobileNetV2(nn.Module):
    # t (expansion), c (channels), n (repeats), s (first stride)
    SETTING = [[1, 16, 1, 1], [6, 24, 2, 2], [6, 32, 3, 2], [6, 64, 4, 2], [6, 96, 3, 1], [6, 160, 3, 2],
               [6, 320, 1, 1]]

    def __init__(self, num_classes: int = 1000, width_mult: float = 1.0, dropout: float = 0.2) -> None:
        super().__init__()
        cin = _make_divisible(32 * width_mult)
        last = _make_divisible(1280 * max(1.0, width_mult))
        features: list[nn.Module] = [ConvBNReLU6(3, cin, stride=2)]
        for t, c, n, s in self.SETTING:
            cout = _make_divisible(c * width_mult)
            for i in range(n):
                features.append(InvertedResidual(cin, cout, s if i == 0 else 1, t))
                cin = cout
        features.append(ConvBNReLU6(cin, last, kernel=1))
        self.features = nn.Sequential(*features)
        self.classifier = nn.Sequential(nn.Dropout(dropout), nn.Linear(last, num_classes))
        self._init_weights()

    def _init_weights(self) -> None:
        g = torch.Generator().manual_seed(0)
        with torch.no_grad():
            for m in self.modules():
                if isinstance(m, nn.Conv2d):
                    nn.init.kaiming_normal_(m.weight, mode="fan_out", generator=g)
                elif isinstance(m, nn.BatchNorm2d):  # as if trained: statistics away from (0, 1)
                    c = m.num_features
                    m.weight.copy_(0.5 + torch.rand(c, generator=g))
                    m.bias.copy_(0.2 * torch.randn(c, generator=g))
                    m.running_mean.copy_(0.2 * torch.randn(c, generator=g))
                    m.running_var.copy_(0.5 + torch.rand(c, generator=g))
                elif isinstance(m, nn.Linear):
                    nn.init.normal_(m.weight, 0, 0.01, generator=g)
                    nn.init.zeros_(m.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = nn.functional.adaptive_avg_pool2d(self.features(x), 1)
        return self.classifier(torch.flatten(x, 1))


def run(path: Path, x: np.ndarray) -> np.ndarray:
    sess = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    return sess.run(None, {sess.get_inputs()[0].name: x})[0]


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", type=Path, required=True, help="folder for the float and compressed models")
    p.add_argument("--width", type=float, default=1.0, help="width multiplier")
    p.add_argument("--resolution", type=int, default=224)
    p.add_argument("--prune", type=float, default=0.0)
    p.add_argument("--wbits", type=int, default=8)
    p.add_argument("--abits", type=int, default=8)
    # 0: ranges and corrections from the BN statistics alone, seconds on a CPU.  Fitting on
    # synthetic images (the library default, 512 x 80 steps) takes far longer at 224x224.
    p.add_argument("--synthetic", type=int, default=0, help="synthetic images for fitting (0 = closed form)")
    p.add_argument("--synthetic-steps", type=int, default=Recipe.synthetic_steps)
    args = p.parse_args()

    args.out.mkdir(parents=True, exist_ok=True)
    model = MobileNetV2(width_mult=args.width).eval()
    example = torch.zeros(1, 3, args.resolution, args.resolution)
    recipe = Recipe(prune=args.prune, wbits=args.wbits, abits=args.abits,
                    synthetic=args.synthetic, synthetic_steps=args.synthetic_steps)

    float_path = export(model, example, args.out / "mobilenetv2.onnx")
    t = time.perf_counter()
    small = compress_module(model, example, recipe, path=args.out / "mobilenetv2_small.onnx")
    print(f"export + compress in {time.perf_counter() - t:.1f}s -> {small}")

    x = np.random.default_rng(0).standard_normal((8, 3, args.resolution, args.resolution)).astype(np.float32)
    ref, out = run(float_path, x), run(small, x)
    cos = float((ref * out).sum() / (np.linalg.norm(ref) * np.linalg.norm(out) + 1e-12))
    print(f"file size: {float_path.stat().st_size / 1e6:.2f} MB -> {small.stat().st_size / 1e6:.2f} MB")
    print(f"outputs vs float on random inputs: cosine {cos:.4f}, "
          f"top-1 agreement {(ref.argmax(1) == out.argmax(1)).mean():.0%}")


if __name__ == "__main__":
    main()
