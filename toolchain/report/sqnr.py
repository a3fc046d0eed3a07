"""Signal-to-quantization-noise ratios: weights, layer outputs, and the Gaussian reference.

``SQNR(w, F) = 10 log10( mean(w^2) / mean((w - F(w))^2) )`` (Kuzmin et al., 2023).
At equal compression against an FP16 baseline, b-bit quantization is compared with
unstructured magnitude pruning at sparsity ``1 - b/16`` (index overhead ignored).
The analytic values for a standard Gaussian are integrals over its density, so the
empirical functions below can be checked against them.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from datafree.toolchain import quant
from datafree.toolchain.quant import sqnr_db

__all__ = ["sqnr_db", "equal_compression_sparsity", "magnitude_prune", "kurtosis",
           "quant_sqnr", "prune_sqnr", "uniform_quantize", "mse_optimal_step",
           "gaussian_quant_sqnr", "gaussian_prune_sqnr", "WeightRow", "weight_rows"]


# ------------------------------------------------------------------ empirical
def equal_compression_sparsity(bits: int) -> float:
    """Sparsity whose FP16 storage equals b-bit storage: ``1 - b/16``."""
    return 1.0 - bits / 16.0


def magnitude_prune(w: np.ndarray, sparsity: float) -> np.ndarray:
    """Zero the ``round(sparsity * size)`` smallest-magnitude entries of the whole tensor."""
    flat = np.asarray(w).ravel()
    k = int(round(sparsity * flat.size))
    out = flat.copy()
    if k > 0:
        out[np.argpartition(np.abs(flat), k - 1)[:k]] = 0
    return out.reshape(np.shape(w))


def kurtosis(w: np.ndarray) -> float:
    """Pearson kurtosis ``E[(w-mu)^4] / sigma^4`` (3 for a Gaussian; larger = heavier tails)."""
    x = np.asarray(w, dtype=np.float64).ravel()
    d = x - x.mean()
    var = float(np.mean(d * d))
    return float(np.mean(d ** 4) / (var * var)) if var > 0 else float("nan")


def quant_sqnr(w_oc: np.ndarray, bits: int) -> float:
    """Weight SQNR of per-channel symmetric quantization (the compressor's own quantizer)."""
    return sqnr_db(w_oc, quant.fake_quant_weight(w_oc, bits))


def prune_sqnr(w: np.ndarray, sparsity: float) -> float:
    """Weight SQNR of unstructured magnitude pruning at ``sparsity``."""
    return sqnr_db(w, magnitude_prune(w, sparsity))


def uniform_quantize(w: np.ndarray, step: float, qmin: int, qmax: int) -> np.ndarray:
    """Per-tensor uniform quantizer with zero point 0 on the integer grid ``qmin..qmax``."""
    return np.clip(np.round(np.asarray(w) / step), qmin, qmax) * step


def mse_optimal_step(w: np.ndarray, qmin: int, qmax: int) -> float:
    """The step minimising ``mean((w - Q(w))^2)`` for the per-tensor grid ``qmin..qmax``."""
    from scipy import optimize

    w = np.asarray(w, dtype=np.float64).ravel()
    amax = float(np.abs(w).max()) or 1.0
    mse = lambda s: float(np.mean((w - uniform_quantize(w, s, qmin, qmax)) ** 2))
    grid = np.linspace(amax / (4 * max(qmax, 1)), amax / max(qmax, 1), 60)
    s0 = grid[int(np.argmin([mse(s) for s in grid]))]
    res = optimize.minimize_scalar(mse, bounds=(0.8 * s0, 1.2 * s0), method="bounded",
                                   options={"xatol": s0 * 1e-5})
    return float(res.x)


# ------------------------------------------------------------------- analytic
def _gaussian_quant_mse(step: float, qmin: int, qmax: int) -> float:
    """E[(x - Q(x))^2] for x ~ N(0, 1): one integral per quantization cell."""
    from scipy import integrate, stats

    phi = stats.norm.pdf
    total = 0.0
    for q in range(qmin, qmax + 1):
        lo = -np.inf if q == qmin else (q - 0.5) * step
        hi = np.inf if q == qmax else (q + 0.5) * step
        total += integrate.quad(lambda x, c=q * step: (x - c) ** 2 * phi(x), lo, hi,
                                epsabs=1e-13, epsrel=1e-11)[0]
    return total


def gaussian_quant_sqnr(qmin: int, qmax: int, step: float | None = None) -> tuple[float, float]:
    """(SQNR in dB, step in sigma) of a per-tensor uniform quantizer on N(0, 1).

    With ``step=None`` the MSE-optimal step is found: grid -8..7 gives 19.26 dB at
    0.3386 sigma, -7..7 gives 18.90 dB at 0.3534 sigma.
    """
    from scipy import optimize

    if step is None:
        res = optimize.minimize_scalar(lambda s: _gaussian_quant_mse(s, qmin, qmax),
                                       bounds=(0.5 / max(qmax, 1), 4.0 / max(qmax, 1)), method="bounded",
                                       options={"xatol": 1e-7})
        step = float(res.x)
    return float(10 * np.log10(1.0 / _gaussian_quant_mse(step, qmin, qmax))), float(step)


def gaussian_prune_sqnr(sparsity: float) -> float:
    """SQNR in dB of magnitude pruning N(0, 1) at ``sparsity``: error = E[x^2; |x| < t]."""
    from scipy import integrate, stats

    t = stats.norm.ppf(0.5 + sparsity / 2)
    err = integrate.quad(lambda x: x * x * stats.norm.pdf(x), -t, t, epsabs=1e-13, epsrel=1e-11)[0]
    return float(10 * np.log10(1.0 / err))


# ----------------------------------------------------------------- per layer
@dataclass
class WeightRow:
    """Weight SQNR of one layer at one bit-width: quantization against equal-size pruning."""

    layer: str
    bits: int
    sparsity: float
    quant_db: float
    prune_db: float
    kurtosis: float

    @property
    def winner(self) -> str:
        return "prune" if self.prune_db > self.quant_db else "quant"


def weight_rows(layers, bits_list) -> list[WeightRow]:
    """One row per (layer, bits) for ``layers`` exposing ``name`` and ``w_oc()``."""
    rows = []
    for layer in layers:
        w = layer.w_oc().astype(np.float64)
        k = kurtosis(w)
        for b in bits_list:
            s = equal_compression_sparsity(b)
            rows.append(WeightRow(layer.name, int(b), s, quant_sqnr(w, b), prune_sqnr(w, s), k))
    return rows
