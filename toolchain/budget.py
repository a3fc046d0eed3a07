"""A time budget for compression: how many synthetic images, generator steps and joint-fit
steps fit it on this machine.

Compression time is mostly making images and fitting on them, and both are forward and
backward passes of the model's differentiable copy.  So the time of a recipe is
predicted from one measured quantity, ``t``: seconds per image for a forward and
backward pass of this model, here, now (a few passes on a small batch):

    T ≈ T₀ + t · (G · n · s_gen + F · n + J · s_joint)

with ``n`` synthetic images, ``s_gen`` generator steps (only on the routes that optimise
images; procedural photographs cost nothing) and ``s_joint`` joint-fit steps (only where
channels are pruned).  ``F`` covers the per-layer fits over the images (least squares,
GPTQ, ranges, the activation floor), ``J`` the joint fits' mini-batches over every
pruned group and its consumers, ``T₀`` loading, probing and timing the result.  The
constants are fitted to stage times measured on models of several kinds and sizes
(``benchmarks/budget_fit.py``, ``benchmarks/results/budget.md``).

Given a budget, the recipe's settings are scaled down together by the largest factor
whose prediction fits (images and joint steps in proportion, generator steps by its
square root: a few more steps buy more than a few more images), never below
``MIN_*``; the summary says what was predicted and what was given up.
"""

from __future__ import annotations

import math
import re
import time
from dataclasses import dataclass

from .errors import UserError

# fitted constants (benchmarks/budget_fit.py): image passes per unit of each setting
G_GEN = 0.5         # per image and generator step (generation runs 64 images a batch: cheaper per image)
F_FIT = 96.0        # per image: the per-layer fits over it and its mirrored and shifted copies
J_JOINT = 20.0      # per joint step, all pruned groups and their consumers together
T_FIXED = 3.7       # seconds: loading, the input probe, timing the result
SAFETY = 0.8        # plan for this share of the budget: the fit is within 16 % on the models measured, and
                    # a shared machine's speed varies

MIN_IMAGES, MIN_GEN_STEPS = 16, 20


def parse_duration(text: str | float | int) -> float:
    """Seconds from ``300``, ``90s``, ``5m``, ``1.5h`` or ``2m30s``."""
    if isinstance(text, (int, float)) and not isinstance(text, bool):
        seconds = float(text)
    else:
        s = str(text).strip().lower()
        parts = re.fullmatch(r"(?:(\d+(?:\.\d+)?)h)?\s*(?:(\d+(?:\.\d+)?)m(?:in)?)?\s*(?:(\d+(?:\.\d+)?)s?)?", s)
        if not s or parts is None or not any(parts.groups()):
            raise UserError(f"time_budget must be a duration such as 90s, 5m or 1h, got {text!r}")
        h, m, sec = (float(g) if g else 0.0 for g in parts.groups())
        seconds = 3600 * h + 60 * m + sec
    if not math.isfinite(seconds) or seconds <= 0:
        raise UserError(f"time_budget must be a positive duration, got {text!r}")
    return seconds


def format_duration(seconds: float) -> str:
    if seconds < 90:
        return f"{seconds:.0f} s"
    if seconds < 5400:
        return f"{seconds / 60:.1f} min"
    return f"{seconds / 3600:.1f} h"


@dataclass(frozen=True)
class Work:
    images: int
    gen_steps: int
    joint_steps: int


def predict(work: Work, t: float, *, generates: bool, prunes: bool) -> float:
    """Predicted seconds for ``work`` on a model costing ``t`` seconds per image pass."""
    passes = F_FIT * work.images
    if generates:
        passes += G_GEN * work.images * work.gen_steps
    if prunes:
        passes += J_JOINT * work.joint_steps
    return T_FIXED + t * passes


@dataclass(frozen=True)
class Plan:
    work: Work
    predicted: float
    note: str | None


def plan(asked: Work, budget: float, t: float, *, generates: bool, prunes: bool, spent: float = 0.0) -> Plan:
    """The richest scaling of ``asked`` predicted to fit ``budget`` seconds (``spent``
    of them already used), and a note saying what was given up and why."""
    left = SAFETY * budget - spent

    def scaled(f: float) -> Work:
        return Work(images=max(min(asked.images, MIN_IMAGES), round(asked.images * f)),
                    gen_steps=max(min(asked.gen_steps, MIN_GEN_STEPS), round(asked.gen_steps * math.sqrt(f))),
                    joint_steps=round(asked.joint_steps * f))

    def fits(f: float) -> bool:
        return predict(scaled(f), t, generates=generates, prunes=prunes) <= left

    if fits(1.0):
        work = asked
    else:   # the largest scale that fits (predictions grow with it), to 1 %
        lo, hi = 0.0, 1.0
        while hi - lo > 0.01:
            mid = (lo + hi) / 2
            lo, hi = (mid, hi) if fits(mid) else (lo, mid)
        work = scaled(lo)
    predicted = predict(work, t, generates=generates, prunes=prunes)
    full = predict(asked, t, generates=generates, prunes=prunes)
    if work == asked:
        return Plan(work, predicted, None)
    given_up = [f"{work.images} synthetic images instead of {asked.images}"]
    if generates and work.gen_steps != asked.gen_steps:
        given_up.append(f"{work.gen_steps} generator steps instead of {asked.gen_steps}")
    if prunes and work.joint_steps != asked.joint_steps:
        given_up.append(f"{work.joint_steps} joint steps instead of {asked.joint_steps}")
    met = predicted <= left
    note = (f"time budget {format_duration(budget)}: the recipe's settings would take about "
            f"{format_duration(spent + full)} here, so " + ", ".join(given_up) +
            (f" (about {format_duration(spent + predicted)} predicted)" if met else
             f"; that is the least this model is fitted with, about {format_duration(spent + predicted)}: "
             "the budget cannot be met"))
    return Plan(work, predicted, note)


def seconds_per_image(model, shape: tuple[int, ...], batch: int = 8, repeats: int = 3) -> float:
    """Seconds per image for one forward and backward pass of ``model``'s differentiable
    copy at ``shape`` (one sample), measured here: the median of a few passes (the
    fastest alone promised more than a shared machine kept up)."""
    import numpy as np
    import torch

    from . import device as dev
    from .inputs import fixed_batch
    from .torchgraph import TorchGraph

    net = TorchGraph(model).eval()
    batch = fixed_batch(model) or batch
    x = dev.tensor(np.random.default_rng(0).standard_normal((batch, *shape)).astype(np.float32))
    times = []
    for _ in range(repeats + 1):      # the first pass warms up and is not counted
        xg = x.clone().requires_grad_(True)
        start = time.perf_counter()
        out = net.run(xg)
        loss = sum(v.float().square().mean() for v in out.values() if v.is_floating_point() and v.requires_grad)
        if isinstance(loss, torch.Tensor):
            loss.backward()
        if x.is_cuda:
            torch.cuda.synchronize(x.device)
        times.append(time.perf_counter() - start)
    return float(np.median(times[1:])) / batch


__all__ = ["Plan", "Work", "format_duration", "parse_duration", "plan", "predict", "seconds_per_image"]
