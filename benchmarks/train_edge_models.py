"""Train the edge test models (tests/edge_zoo.py) briefly, so their weights and activations
have the statistics of trained networks, and write their float16 state dicts to tests/models/.

    python benchmarks/train_edge_models.py [--models yolo_like,db_like,mbv3_like] [--steps 300]

Each model learns a task made from photos 500-999 of ``../shared/data/cifar10_dev.npz``
(from the repository root); photos 0-499 are the bundled dev images, kept for measuring:

* ``yolo_like`` -- where a photo pasted on another one lies (box) and its CIFAR-10 class;
* ``db_like``   -- the boxes of text lines drawn on an upscaled photo (probability map);
* ``mbv3_like`` -- whether a text line drawn on a photo is upright or turned 180 degrees.

Prints a held-out score per model (on scenes from the bundled dev images).
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import numpy as np
import torch
from torch.nn import functional as F

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "tests"))
import edge_zoo  # noqa: E402  (the models, renderers and input conventions)

TRAIN_IMAGES = ROOT.parent / "shared" / "data" / "cifar10_dev.npz"
FIRST_TRAIN = 500


def train_photos() -> tuple[np.ndarray, np.ndarray]:
    """Photos 500-999 of the shared dev set, after checking 0-499 are the bundled ones."""
    d = np.load(TRAIN_IMAGES)
    bundled, _ = edge_zoo.dev_photos()
    if not np.array_equal(d["images"][:FIRST_TRAIN], bundled):
        raise SystemExit(f"{TRAIN_IMAGES}: its first {FIRST_TRAIN} images are not the bundled dev images")
    return d["images"][FIRST_TRAIN:], d["labels"][FIRST_TRAIN:]


def batch(name: str, photos, labels, n: int, rng, index=None, hw=None):
    """A float32 NCHW input batch for ``name`` (at ``hw``, else its usual size) and its targets as tensors."""
    hw = hw or edge_zoo.INFO[name]["size"][1:]
    images, drawn = edge_zoo.render(name, photos, labels, n, rng, hw, index)
    x = torch.from_numpy(edge_zoo.normalise(name, images))
    return x, tuple(torch.from_numpy(np.asarray(d)) for d in drawn)


# ------------------------------------------------------------------------ losses
def detection_loss(model, x, boxes, classes):
    """Anchor-free assignment: anchors inside a box and near its centre predict its sides and class."""
    dist, logits, anchors, strides = model.detect.raw(model.features(x))
    centres = (anchors * strides)[None]                            # [1, 2, A] pixels
    b = boxes[:, :, None]                                          # [N, 4, 1]
    ltrb = torch.cat((centres - b[:, :2], b[:, 2:] - centres), 1) / strides[None]     # [N, 4, A] cells
    box_centre = (b[:, :2] + b[:, 2:]) / 2
    near = ((centres - box_centre).abs() < 2.5 * strides[None]).all(1)
    reach = ltrb.max(1).values < model.detect.reg_max - 1
    pos = (ltrb.min(1).values > 0) & near & reach                  # [N, A]
    target = torch.zeros_like(logits)
    target[torch.arange(len(x))[:, None].expand_as(pos)[pos], classes[:, None].expand_as(pos)[pos], pos.nonzero()[:, 1]] = 1
    npos = pos.sum().clamp(min=1)
    cls_loss = F.binary_cross_entropy_with_logits(logits, target, reduction="sum") / npos
    box_loss = (dist - ltrb).abs().sum(1)[pos].sum() / npos
    return cls_loss + 0.5 * box_loss


def text_map_loss(model, x, masks):
    """BCE plus dice on the text-probability map."""
    p = model(x)[:, 0].clamp(1e-6, 1 - 1e-6)
    bce = F.binary_cross_entropy(p, masks)
    dice = 1 - 2 * (p * masks).sum() / (p.sum() + masks.sum() + 1)
    return bce + dice


def direction_loss(model, x, flips):
    return F.cross_entropy(model.logits(x), flips.long())


def loss(name, model, x, targets):
    if name == "yolo_like":
        return detection_loss(model, x, *targets)
    if name == "db_like":
        return text_map_loss(model, x, *targets)
    return direction_loss(model, x, *targets)


# ----------------------------------------------------------------- held-out score
def held_out_score(name: str, model, n: int = 64) -> str:
    """What the trained model gets right on scenes from the bundled dev images (never trained on)."""
    photos, labels = edge_zoo.dev_photos()
    x, targets = batch(name, photos, labels, n, np.random.default_rng(0), np.arange(n))
    with torch.no_grad():
        y = model.eval()(x)
    if name == "mbv3_like":
        return f"direction accuracy {(y.argmax(1) == targets[0].long()).float().mean():.3f}"
    if name == "db_like":
        ious = [edge_zoo.map_iou(m.numpy(), p.numpy()) for m, p in zip(targets[0], y[:, 0])]
        return f"text-map IoU with the drawn boxes {np.mean(ious):.3f}"
    boxes, classes = targets
    best = y[:, 4:].max(1).values.argmax(1)                        # most confident anchor per image
    pred = y[torch.arange(n), :4, best]
    pred = torch.cat((pred[:, :2] - pred[:, 2:] / 2, pred[:, :2] + pred[:, 2:] / 2), 1)
    lt, rb = torch.maximum(pred[:, :2], boxes[:, :2]), torch.minimum(pred[:, 2:], boxes[:, 2:])
    inter = (rb - lt).clamp(min=0).prod(1)
    union = (pred[:, 2:] - pred[:, :2]).prod(1) + (boxes[:, 2:] - boxes[:, :2]).prod(1) - inter
    cls_acc = (y[torch.arange(n), 4:, best].argmax(1) == classes).float().mean()
    return (f"box IoU of the most confident anchor {(inter / union).mean():.3f}, its class right "
            f"{cls_acc:.3f}, max score {y[:, 4:].max():.2f}")


# ------------------------------------------------------------------------ training
def train(name: str, steps: int, batch_size: int, lr: float, sizes: list[tuple[int, int]],
          seed: int = 0) -> torch.nn.Module:
    """``steps`` AdamW steps (one-cycle schedule) on fresh scenes, each step at the next of ``sizes``."""
    torch.manual_seed(seed)
    rng = np.random.default_rng(seed)
    photos, labels = train_photos()
    model = edge_zoo.build(name, trained=False).train()
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=1e-4)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=lr, total_steps=steps, pct_start=0.1)
    t0 = time.perf_counter()
    for step in range(steps):
        x, targets = batch(name, photos, labels, batch_size, rng, hw=sizes[step % len(sizes)])
        value = loss(name, model, x, targets)
        opt.zero_grad()
        value.backward()
        opt.step()
        sched.step()
        if step % 50 == 0 or step == steps - 1:
            print(f"{name} step {step:4d} loss {value.item():.4f} ({time.perf_counter() - t0:.0f} s)", flush=True)
    return recalibrate_bn(name, model, photos, labels, rng)


def recalibrate_bn(name: str, model, photos, labels, rng, batches: int = 8, batch_size: int = 16):
    """BN running statistics re-estimated (plain average) on training scenes at the usual size.

    The convolutional models train (partly) at smaller sizes, faster; their statistics at
    the size they are used at are what the compressor and the tests see.
    """
    for m in model.modules():
        if isinstance(m, torch.nn.BatchNorm2d):
            m.reset_running_stats()
            m.momentum = None
    model.train()
    with torch.no_grad():
        for _ in range(batches):
            model(batch(name, photos, labels, batch_size, rng)[0])
    return model.eval()


def save(name: str, model: torch.nn.Module) -> Path:
    """The state dict with float tensors in float16 (integers, e.g. BN step counts, as they are)."""
    edge_zoo.WEIGHTS.mkdir(exist_ok=True)
    path = edge_zoo.WEIGHTS / f"{name}.pt"
    torch.save({k: v.half() if v.is_floating_point() else v for k, v in model.state_dict().items()}, path)
    return path


SETTINGS = {   # steps, batch, learning rate, training sizes (H, W) taken in turn
    "yolo_like": (450, 16, 4e-3, [(128, 128), (192, 192), (256, 256)]),
    "db_like": (600, 16, 4e-3, [(128, 128)]),
    "mbv3_like": (1000, 32, 4e-3, [(48, 192)]),
}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--models", default=",".join(edge_zoo.NAMES))
    ap.add_argument("--steps", type=int, default=None, help="steps per model (default: its own)")
    args = ap.parse_args()
    torch.set_num_threads(1)   # on a shared machine one thread is the fastest
    for name in args.models.split(","):
        steps, batch_size, lr, sizes = SETTINGS[name]
        model = train(name, args.steps or steps, batch_size, lr, sizes)
        path = save(name, model)
        print(f"{name}: {held_out_score(name, edge_zoo.build(name))} -> {path} ({path.stat().st_size // 1024} KiB)")


if __name__ == "__main__":
    main()
