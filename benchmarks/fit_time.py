"""How long does the default compression take, synthetic images included, as networks get deeper?

    python benchmarks/fit_time.py [--depths 20,56] [--recipe 'prune=0.3,wbits=4,abits=8']

Builds CIFAR ResNets of the given depths (3 stages of (depth-2)/6 basic blocks, 1x1
conv shortcuts) with seeded random weights and BN statistics -- time does not depend
on what the weights are -- and runs ``compress()`` with an empty synthetic-image
cache, so generation is timed too.  Prints wall and CPU time per stage and writes
them to ``benchmarks/results/fit_time.md``.
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from pathlib import Path

import torch
from torch import nn

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests"))
import zoo  # noqa: E402  (the test zoo's export and randomisation helpers)


class Block(nn.Module):
    def __init__(self, cin: int, cout: int, stride: int):
        super().__init__()
        self.c1, self.b1 = nn.Conv2d(cin, cout, 3, stride, 1, bias=False), nn.BatchNorm2d(cout)
        self.c2, self.b2 = nn.Conv2d(cout, cout, 3, 1, 1, bias=False), nn.BatchNorm2d(cout)
        self.short = nn.Sequential() if stride == 1 and cin == cout else \
            nn.Sequential(nn.Conv2d(cin, cout, 1, stride, bias=False), nn.BatchNorm2d(cout))

    def forward(self, x):
        return torch.relu(self.b2(self.c2(torch.relu(self.b1(self.c1(x))))) + self.short(x))


def cifar_resnet(depth: int) -> nn.Module:
    n = (depth - 2) // 6
    layers: list[nn.Module] = [nn.Conv2d(3, 16, 3, 1, 1, bias=False), nn.BatchNorm2d(16), nn.ReLU()]
    cin = 16
    for cout, stride in ((16, 1), (32, 2), (64, 2)):
        for i in range(n):
            layers.append(Block(cin, cout, stride if i == 0 else 1))
            cin = cout
    layers += [nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(64, 10)]
    return nn.Sequential(*layers)


def resnet18() -> nn.Module:
    """An ImageNet-shaped ResNet-18 (7x7 stem, max pool, widths 64..512, 1,000 classes)."""
    layers: list[nn.Module] = [nn.Conv2d(3, 64, 7, 2, 3, bias=False), nn.BatchNorm2d(64), nn.ReLU(),
                               nn.MaxPool2d(3, 2, 1)]
    cin = 64
    for cout, stride in ((64, 1), (128, 2), (256, 2), (512, 2)):
        for i in range(2):
            layers.append(Block(cin, cout, stride if i == 0 else 1))
            cin = cout
    layers += [nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(512, 1000)]
    return nn.Sequential(*layers)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--depths", default="20,56", help="CIFAR ResNet depths (32 x 32)")
    ap.add_argument("--imagenet", action="store_true", help="also a ResNet-18 at 224 x 224 (about 15 minutes)")
    ap.add_argument("--recipe", default="prune=0.3,wbits=4,abits=8",
                    help="Recipe fields, e.g. 'prune=0.3,wbits=4,abits=8' (the rest: defaults)")
    args = ap.parse_args()
    from datafree.toolchain.compress import compress
    from datafree.toolchain.stages.synthetic import fitting_work
    from datafree.toolchain.recipe import Recipe

    fields = {}
    for part in filter(None, args.recipe.split(",")):
        key, value = part.split("=")
        fields[key] = None if value == "float" else (float(value) if "." in value else int(value))
    recipe = Recipe(**fields)
    lines = ["# Compression time, synthetic images included", "", "```",
             "python benchmarks/fit_time.py " + " ".join(sys.argv[1:]), "```", "",
             f"ResNets with random weights (time does not depend on them), recipe `{args.recipe}` "
             f"(everything else default), empty image cache; {os.cpu_count()} cores.", ""]
    with tempfile.TemporaryDirectory() as tmp:
        os.environ["DATAFREE_CACHE"] = str(Path(tmp) / "cache")
        nets = [(f"ResNet-{d}", cifar_resnet(int(d)), (1, 3, 32, 32)) for d in args.depths.split(",")]
        if args.imagenet:
            nets.append(("ResNet-18 (224 x 224)", resnet18(), (1, 3, 224, 224)))
        for name, net, shape in nets:
            path = zoo.export_model(zoo.randomize(net).eval(), Path(tmp), name.split()[0].lower(), shape)
            t, c = time.perf_counter(), time.process_time()
            result = compress(path, recipe)
            wall, cpu = time.perf_counter() - t, time.process_time() - c
            stages = ", ".join(f"{k} {v:.1f}" for k, v in result.summary.timings.items() if k != "total")
            work = fitting_work(recipe, result.summary.totals["macs_before"])
            line = (f"{name}: {wall:.1f} s wall, {cpu:.1f} s CPU ({stages}); "
                    f"{work.images} synthetic images ({work.gen_steps} generator steps), {work.joint_steps} joint "
                    "steps, MACs "
                    f"{result.summary.totals['macs_before'] / 1e6:.1f} M "
                    f"-> {result.summary.totals['macs_after'] / 1e6:.1f} M; 1-min load {os.getloadavg()[0]:.1f}")
            print(line, flush=True)
            lines.append(f"* {line}")
    out = ROOT / "benchmarks" / "results" / "fit_time.md"
    out.write_text("\n".join(lines) + "\n")
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
