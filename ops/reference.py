"""The maths of the dynamic-precision ops in numpy: one definition, used by the
kernels, by the pass that builds the tables, and by the tests.

Tables are indexed by bit-width: ``scale[b]`` is the scale used at ``b`` bits
(entries for bit-widths that are not candidates are unused and hold 1).

* ``DynQuant`` (activations, affine): ``y = (clip(round(x/s) + z, qmin, qmax) − z)·s``
  with ``s = scale[b]``, ``z = zero_point[b]`` and the grid of ``b`` bits
  (signed ``[−2^(b−1), 2^(b−1)−1]``, unsigned ``[0, 2^b−1]``).
* Weights at ``b`` bits are *derived* from the stored highest-precision integers:
  ``w_b = clip(round(w_int·w_scale / scale[b]), ±(2^(b−1)−1))·scale[b]``, per output
  channel.  Only one int8 tensor is stored (see ``datafree.ops`` for why).
"""

from __future__ import annotations

import numpy as np


def act_grid(bits: np.ndarray | int, signed: bool) -> tuple[np.ndarray, np.ndarray]:
    b = np.asarray(bits, dtype=np.float32)
    if signed:
        return -np.exp2(b - 1), np.exp2(b - 1) - 1
    return np.zeros_like(b), np.exp2(b) - 1


def fake_quant(x: np.ndarray, bits: int, scale: float, zero_point: float, signed: bool) -> np.ndarray:
    """Fake-quantize ``x`` (float32) at ``bits`` with one scale / zero point."""
    qmin, qmax = act_grid(bits, signed)
    s = np.float32(scale)
    z = np.float32(zero_point)
    q = np.clip(np.round(x / s) + z, qmin, qmax)
    return ((q - z) * s).astype(np.float32)


def dyn_quant(x: np.ndarray, bits: np.ndarray, scale: np.ndarray, zero_point: np.ndarray,
              signed: bool) -> np.ndarray:
    """Per-sample fake quantization: sample ``n`` at ``bits[n]`` bits."""
    y = np.empty_like(x, dtype=np.float32)
    for b in np.unique(bits):
        idx = np.nonzero(bits == b)[0]
        y[idx] = fake_quant(x[idx], int(b), scale[int(b)], zero_point[int(b)], signed)
    return y


def weight_qmax(bits: int) -> float:
    return float(2 ** (bits - 1) - 1)


def derive_weight(w_int: np.ndarray, w_scale: np.ndarray, scale_table: np.ndarray, bits: int) -> np.ndarray:
    """Float weights at ``bits`` bits, requantised from the stored integers."""
    shape = (-1,) + (1,) * (w_int.ndim - 1)
    w = w_int.astype(np.float32) * w_scale.astype(np.float32).reshape(shape)
    s = scale_table[bits].astype(np.float32).reshape(shape)
    q = np.clip(np.round(w / s), -weight_qmax(bits), weight_qmax(bits))
    return (q * s).astype(np.float32)
