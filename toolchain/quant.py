"""Quantization primitives shared by every pass, report and the dynamic-precision ops.

Weights: symmetric, per output channel, on the narrow signed grid
``[-(2^(b-1)-1), 2^(b-1)-1]`` (zero point 0, the layout onnxruntime's integer Conv
kernels expect).  Activations: affine per tensor, unsigned when the tensor is
non-negative (after ReLU), signed otherwise.
"""

from __future__ import annotations

import numpy as np


# x86 CPUs without AVX-512 VNNI (AVX2 and plain AVX-512: AMD EPYC before Zen 4, Intel before
# Cascade Lake) run onnxruntime's u8 x s8 integer kernels with VPMADDUBSW, which adds two
# adjacent products into int16 with saturation: 255 * 127 * 2 overflows, 255 * 64 * 2 = 32640
# does not (onnxruntime's documented "reduce_range").  8-bit weights of layers whose input
# is quantized keep to +-63 there: ResNet-20 W8A8 in a plain session on an AVX2 EPYC scored
# 75.3 % with +-127 (83.3 % in ONNX semantics) and 83.1 % with +-63.  Depthwise convolutions
# (one input channel per output channel) run on another kernel, which widens both operands to
# int16 and accumulates pairs in int32 (MlasConvDepthwiseKernelAvx2): exact at +-127, so they
# keep it.
KERNEL_SAFE_BITS = 7


def kernel_bits(wbits: int | None, abits: int | None, reduce_range: bool = True,
                kind: str | None = None) -> int | None:
    """The bits a layer's weights are rounded to: ``wbits``, except 8-bit weights of a layer
    whose input is quantized to 8 bits (it runs on integer kernels), which keep
    ``KERNEL_SAFE_BITS`` of range in their int8 container (``reduce_range``; see above)
    unless the layer is depthwise (``kind``: ``Layer.kind``).  An input of at most
    ``KERNEL_SAFE_BITS`` bits lies in u8 0..127 (``passes.qdq.act_container``), where
    +-127 weights cannot saturate (2 * 127 * 127 = 32258)."""
    if reduce_range and wbits is not None and abits is not None and wbits > KERNEL_SAFE_BITS \
            and abits > KERNEL_SAFE_BITS and kind != "depthwise":
        return KERNEL_SAFE_BITS
    return wbits


def weight_qmax(bits: int) -> int:
    return 2 ** (bits - 1) - 1


def weight_scales(w_oc: np.ndarray, bits: int, clip: str = "max") -> np.ndarray:
    """Per-output-channel scale for ``w_oc`` (output channels first)."""
    flat = np.abs(w_oc.reshape(w_oc.shape[0], -1)).astype(np.float64)
    qmax = weight_qmax(bits)
    amax = flat.max(axis=1)
    if clip == "mse":
        amax = _mse_clip(w_oc.reshape(w_oc.shape[0], -1).astype(np.float64), amax, qmax)
    amax = np.where(amax > 0, amax, 1.0)
    return (amax / qmax).astype(np.float32)


def _mse_clip(w: np.ndarray, amax: np.ndarray, qmax: int, grid: int = 40) -> np.ndarray:
    best, best_err = amax.copy(), np.full(len(amax), np.inf)
    for frac in np.linspace(0.3, 1.0, grid):
        a = np.where(amax > 0, amax * frac, 1.0)
        s = (a / qmax)[:, None]
        err = ((np.clip(np.round(w / s), -qmax, qmax) * s - w) ** 2).sum(axis=1)
        better = err < best_err
        best[better], best_err[better] = a[better], err[better]
    return best


def quantize_weight(w_oc: np.ndarray, bits: int, scale: np.ndarray | None = None,
                    clip: str = "max") -> tuple[np.ndarray, np.ndarray]:
    """Integer weights (int8 container) and per-channel scales, rounding to nearest."""
    if scale is None:
        scale = weight_scales(w_oc, bits, clip)
    qmax = weight_qmax(bits)
    s = scale.reshape((-1,) + (1,) * (w_oc.ndim - 1))
    q = np.clip(np.round(w_oc / s), -qmax, qmax).astype(np.int8)
    return q, scale.astype(np.float32)


def dequantize_weight(q: np.ndarray, scale: np.ndarray) -> np.ndarray:
    return (q.astype(np.float32) * scale.reshape((-1,) + (1,) * (q.ndim - 1))).astype(np.float32)


def fake_quant_weight(w_oc: np.ndarray, bits: int, clip: str = "max") -> np.ndarray:
    return dequantize_weight(*quantize_weight(w_oc, bits, clip=clip))


# ----------------------------------------------------------------- activations
def act_range_grid(bits: int, signed: bool) -> tuple[int, int]:
    if signed:
        return -(2 ** (bits - 1)), 2 ** (bits - 1) - 1
    return 0, 2 ** bits - 1


def act_qparams(lo: float, hi: float, bits: int) -> tuple[float, int, bool]:
    """(scale, zero_point, signed) covering [lo, hi] with zero exactly representable."""
    lo, hi = min(float(lo), 0.0), max(float(hi), 0.0)
    signed = lo < 0
    qmin, qmax = act_range_grid(bits, signed)
    if hi - lo <= 0:
        return 1.0, 0, signed
    scale = (hi - lo) / (qmax - qmin)
    zp = int(np.clip(round(qmin - lo / scale), qmin, qmax))
    return float(scale), zp, signed


def fake_quant_act(x: np.ndarray, scale: float, zp: int, bits: int, signed: bool) -> np.ndarray:
    qmin, qmax = act_range_grid(bits, signed)
    return ((np.clip(np.round(x / scale) + zp, qmin, qmax) - zp) * scale).astype(x.dtype)


def sqnr_db(ref: np.ndarray, approx: np.ndarray) -> float:
    """10 log10(mean(ref^2) / mean((ref-approx)^2)); inf when exact."""
    ref = np.asarray(ref, dtype=np.float64)
    err = np.mean((ref - np.asarray(approx, dtype=np.float64)) ** 2)
    if err == 0:
        return float("inf")
    return float(10 * np.log10(np.mean(ref ** 2) / err))
