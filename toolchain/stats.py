"""Activation statistics without data.

BatchNorm promises each channel's pre-activation is ``N(β, γ²)``; pushing that
Gaussian through the activation (Gauss–Hermite quadrature, so any elementwise
activation works) gives the expected activations that bias correction needs, and
samples of it give activation ranges.  Where no BN exists, statistics come from
synthetic images instead (``synth``).
"""

from __future__ import annotations

import numpy as np
from scipy.special import erf

from .graph import Layer, attr, clip_bounds
from .quant import act_qparams, fake_quant_act

_GH_T, _GH_W = np.polynomial.hermite.hermgauss(64)


def act_fn(layer: Layer):
    """A numpy version of the layer's activation chain (identity when none)."""
    t = layer.act_type
    if t is None:
        return lambda z: z
    node = layer.act[0]
    if t == "relu":
        return lambda z: np.maximum(z, 0.0)
    if t == "clip":
        lo, hi = clip_bounds(node)
        return lambda z: np.clip(z, lo, hi)
    if t == "leakyrelu":
        a = float(attr(node, "alpha", 0.01))
        return lambda z: np.where(z >= 0, z, a * z)
    if t == "sigmoid":
        return lambda z: 1.0 / (1.0 + np.exp(-z))
    if t == "silu":
        return lambda z: z / (1.0 + np.exp(-z))
    if t in ("hardswish",):
        return lambda z: z * np.clip(z / 6.0 + 0.5, 0.0, 1.0)
    if t == "hardsigmoid":
        a, b = float(attr(node, "alpha", 0.2)), float(attr(node, "beta", 0.5))
        return lambda z: np.clip(a * z + b, 0.0, 1.0)
    if t == "tanh":
        return np.tanh
    if t == "elu":
        a = float(attr(node, "alpha", 1.0))
        return lambda z: np.where(z > 0, z, a * (np.exp(np.minimum(z, 0)) - 1))
    if t == "gelu":
        return lambda z: 0.5 * z * (1 + erf(z / np.sqrt(2)))
    if t == "softplus":
        return lambda z: np.logaddexp(0, z)
    return None


def gaussian_expectation(fn, mean: np.ndarray, std: np.ndarray) -> np.ndarray:
    """E[fn(z)] per channel for z ~ N(mean, std²)."""
    z = mean[:, None] + np.sqrt(2.0) * std[:, None] * _GH_T[None, :]
    return (fn(z) * _GH_W[None, :]).sum(axis=1) / np.sqrt(np.pi)


def output_mean(layer: Layer, moments: tuple[np.ndarray, np.ndarray]) -> np.ndarray | None:
    """Expected value of each output channel after the activation."""
    fn = act_fn(layer)
    if fn is None:
        return None
    return gaussian_expectation(fn, *moments)


def output_samples(layer: Layer, moments: tuple[np.ndarray, np.ndarray], n: int = 4096,
                   seed: int = 0) -> np.ndarray | None:
    """Samples (n x C) of the layer's activation under its BN Gaussian."""
    fn = act_fn(layer)
    if fn is None:
        return None
    rng = np.random.default_rng(seed)
    mean, std = moments
    return fn(mean[None, :] + std[None, :] * rng.standard_normal((n, len(mean))))


def mse_range(samples: np.ndarray, bits: int, grid: int = 60) -> tuple[float, float]:
    """The [lo, hi] whose quantization grid minimises the MSE on ``samples``."""
    x = np.asarray(samples, dtype=np.float64).reshape(-1)
    if x.size > 200_000:
        x = np.random.default_rng(0).choice(x, 200_000, replace=False)
    lo0, hi0 = min(float(x.min()), 0.0), max(float(x.max()), 0.0)
    if hi0 - lo0 <= 0:
        return 0.0, 1.0
    best, best_err = (lo0, hi0), np.inf
    for frac in np.linspace(0.2, 1.0, grid):
        lo, hi = lo0 * frac, hi0 * frac
        scale, zp, signed = act_qparams(lo, hi, bits)
        err = np.mean((fake_quant_act(x, scale, zp, bits, signed) - x) ** 2)
        if err < best_err:
            best, best_err = (lo, hi), err
    return best
