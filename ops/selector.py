"""The bit selector of a dynamic model, in numpy: its choice and its price per bit.

``BitSelect`` pools the features over space, then scores each configuration with a
small MLP, ``relu(x·W1 + b1)·W2 + b2``, and takes the best.  A price μ per bit
folded into the last bias, ``b2 − μ·bits``, moves the average bits its choices
cost; :func:`calibrate_price` finds the μ that brings a set of images to a target.
The compressor prices the selector on its synthetic probes; ``retarget``
(:mod:`datafree.runtime.retarget`) prices it again, on a device, on the images it sees.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np


@dataclass
class Selector:
    w1: np.ndarray
    b1: np.ndarray
    w2: np.ndarray
    b2: np.ndarray

    @property
    def params(self) -> int:
        return int(self.w1.size + self.b1.size + self.w2.size + self.b2.size)

    def logits(self, pooled: np.ndarray) -> np.ndarray:
        return np.maximum(pooled @ self.w1 + self.b1, 0) @ self.w2 + self.b2

    def choose(self, pooled: np.ndarray) -> np.ndarray:
        return np.argmax(self.logits(pooled), axis=1)


def calibrate_price(selector: Selector, pooled: np.ndarray, cfg_bits: np.ndarray, target: float) -> float:
    """The price per bit μ with the largest mean chosen bits ≤ target; folds it into b2.

    Each image's chosen bit-width never rises as μ grows, so the mean is monotone
    in μ and bisection finds it.  μ < 0 (a bonus per bit) lifts a selector that
    spends less than the target up to it.
    """
    hidden = np.maximum(pooled @ selector.w1 + selector.b1, 0) @ selector.w2

    def choices(mu: float) -> np.ndarray:   # exactly as the folded float32 bias will choose
        return np.argmax(hidden + (selector.b2 - mu * cfg_bits).astype(np.float32), axis=1)

    def mean_bits(mu: float) -> float:
        return float(cfg_bits[choices(mu)].mean())

    hi = 1.0
    while mean_bits(hi) > target and hi < 1e6:
        hi *= 2
    lo = -1.0
    while mean_bits(lo) <= target and lo > -1e6:
        lo *= 2
    if mean_bits(lo) <= target:          # even the most precise choice for every image is within the target
        mu = lo
    else:
        for _ in range(60):
            mid = (lo + hi) / 2
            lo, hi = (mid, hi) if mean_bits(mid) > target else (lo, mid)
        # hi sits on a tie of some image; move to the middle of the interval of μ with
        # the same choices, so float noise at run time cannot flip that image back
        same = choices(hi)
        up = hi + max(1.0, abs(hi))
        while np.array_equal(choices(up), same) and up < 1e6:
            up += max(1.0, abs(up))
        a, b = hi, up
        for _ in range(60):
            mid = (a + b) / 2
            a, b = (mid, b) if np.array_equal(choices(mid), same) else (a, mid)
        mu = (hi + a) / 2
    selector.b2 = (selector.b2 - mu * cfg_bits).astype(np.float32)
    return mu
