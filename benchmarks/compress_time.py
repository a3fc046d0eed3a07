"""Compression wall time from an empty image cache, on the machine it runs on.

    python benchmarks/compress_time.py [--only mobilenetv2-w8a8,...]

Rows: the README's main job on the bundled ResNet-20; an ImageNet-sized MobileNetV2
(width 1.0, 224 x 224, ~0.3 G MACs, random weights with BN statistics re-estimated on
procedural photographs, exported as users export it: BN folded, symbolic height and
width) at W8A8, W4A8 and 8-bit weights only.  Each row runs ``compress()`` in this
process with a fresh temporary image cache, so generation is counted.  Writes
``benchmarks/results/compress_time.md``.
"""

from __future__ import annotations

import argparse
import datetime as dt
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch
from torch import nn

ROOT = Path(__file__).resolve().parent.parent
OUT = ROOT / "benchmarks" / "results" / "compress_time.md"


def _cbr(cin, cout, k=3, s=1, groups=1):
    return nn.Sequential(nn.Conv2d(cin, cout, k, s, k // 2, groups=groups, bias=False), nn.BatchNorm2d(cout),
                         nn.ReLU6())


class _Inverted(nn.Module):
    def __init__(self, cin, cout, stride, expand):
        super().__init__()
        mid = cin * expand
        layers = ([_cbr(cin, mid, 1)] if expand != 1 else []) + [_cbr(mid, mid, 3, stride, mid),
                                                                  nn.Conv2d(mid, cout, 1, bias=False),
                                                                  nn.BatchNorm2d(cout)]
        self.body = nn.Sequential(*layers)
        self.res = stride == 1 and cin == cout

    def forward(self, x):
        return x + self.body(x) if self.res else self.body(x)


def mobilenet_v2(classes: int = 1000) -> nn.Module:
    cfg = [(1, 16, 1, 1), (6, 24, 2, 2), (6, 32, 3, 2), (6, 64, 4, 2), (6, 96, 3, 1), (6, 160, 3, 2), (6, 320, 1, 1)]
    layers, cin = [_cbr(3, 32, 3, 2)], 32
    for t, c, n, s in cfg:
        for i in range(n):
            layers.append(_Inverted(cin, c, s if i == 0 else 1, t))
            cin = c
    layers += [_cbr(cin, 1280, 1), nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(1280, classes)]
    return nn.Sequential(*layers)


def export_mobilenet(path: Path) -> None:
    from datafree.toolchain import natural

    torch.manual_seed(0)
    net = mobilenet_v2()
    x = torch.from_numpy((natural.images(32, (3, 224, 224), seed=5) - 0.45) / 0.225).float()
    net.train()
    with torch.no_grad():                  # BN statistics of these inputs, so ranges mean something
        for m in net.modules():
            if isinstance(m, nn.BatchNorm2d):
                m.momentum = None
        net(x)
    net.eval()
    torch.onnx.export(net, x[:1], str(path), input_names=["input"], output_names=["logits"], opset_version=17,
                      dynamic_axes={"input": {0: "batch", 2: "height", 3: "width"}}, dynamo=False)


ROWS = {
    "resnet20-main-job": ("resnet20", dict(prune=0.3, wbits=4, abits=8)),
    "mobilenetv2-w8": ("mobilenetv2", dict(wbits=8)),
    "mobilenetv2-w8a8": ("mobilenetv2", dict(wbits=8, abits=8)),
    "mobilenetv2-w4a8": ("mobilenetv2", dict(wbits=4, abits=8)),
}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--only", default=None)
    args = ap.parse_args()
    from datafree.toolchain.compress import compress
    from datafree.toolchain.recipe import Recipe

    tmp = Path(tempfile.mkdtemp())
    models = {"resnet20": ROOT / "examples" / "models" / "resnet20_bn.onnx", "mobilenetv2": tmp / "mbv2.onnx"}
    export_mobilenet(models["mobilenetv2"])
    lines = []
    for key, (model, recipe) in ROWS.items():
        if args.only and key not in args.only.split(","):
            continue
        os.environ["DATAFREE_CACHE"] = tempfile.mkdtemp(dir=tmp)
        t = time.perf_counter()
        result = compress(models[model], Recipe(**recipe))
        wall = time.perf_counter() - t
        stages = ", ".join(f"{k} {v:.0f}" for k, v in result.summary.timings.items() if k != "total" and v >= 0.5)
        gmacs = result.summary.totals["macs_before"] / 1e9
        lines.append(f"| {key} | {gmacs:.2f} | {wall:.0f} | {stages} |")
        print(lines[-1], flush=True)
    commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True, cwd=ROOT).stdout.strip()
    head = ["# Compression wall time, empty image cache\n", "```\npython benchmarks/compress_time.py\n```\n",
            f"Run {dt.datetime.now(dt.timezone.utc):%Y-%m-%d %H:%M} UTC, code {commit}, {os.cpu_count()} cores, "
            f"1-min load at the end {os.getloadavg()[0]:.1f}.\n",
            "| row | G MACs per image | wall s | stages over 0.5 s (s) |", "|---|---|---|---|"]
    if not args.only:
        OUT.write_text("\n".join(head + lines) + "\n")
        print(f"wrote {OUT.relative_to(ROOT)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
