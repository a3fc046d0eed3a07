"""Closed-form weight solvers on Gram statistics: ridge least squares and GPTQ.

Given a layer's input features ``X`` (im2col columns for convolutions) and targets
``Y``, :func:`_stats` accumulates ``XᵀX``, ``XᵀY`` and the means, so memory is
O(features²) whatever the number of images.  :func:`ridge_refit` solves
``min ||X̃ W + b − Y||² + λ||W − W₀||²``; :func:`gptq` (Frantar et al. 2023) rounds
one input column at a time and pushes its error onto the columns not yet rounded;
:func:`nested_gptq` does so for a set of bit-widths whose grids nest, so every width
requantised from one stored integer tensor is fitted.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F

from ..graph import Layer, attr
from ..quant import weight_qmax

CHUNK = 64          # images per forward pass
RIDGE = 0.1         # λ relative to the mean diagonal of the Gram matrix (plus features / rows)


DAMP = 0.01         # GPTQ damping, relative to the mean diagonal


CELL_MARGIN = 1e-3  # nested GPTQ: fraction of a step kept from a cell's edge


MAX_ROWS = 131072   # feature rows per layer for the Gram statistics


@dataclass
class _Stats:
    G: torch.Tensor        # features x features (uncentred)
    C: torch.Tensor        # features x out  (Xᵀ Y)
    x_sum: torch.Tensor
    y_sum: torch.Tensor
    yy: float
    n: int


def _features(layer: Layer, X: torch.Tensor) -> torch.Tensor | None:
    """Rows of input features matching ``layer.w_oc().reshape(out, -1)`` columns."""
    if layer.op == "Gemm" or layer.op == "MatMul":
        return X.reshape(-1, X.shape[-1])
    if layer.op != "Conv" or layer.groups != 1 or X.dim() != 4:
        return None
    k = list(attr(layer.node, "kernel_shape", None) or layer.w_oc().shape[2:])
    pads = list(attr(layer.node, "pads", None) or [0] * 4)
    if attr(layer.node, "auto_pad", "NOTSET") not in ("NOTSET", b"NOTSET"):
        return None
    if pads[0] != pads[2] or pads[1] != pads[3]:
        X = F.pad(X, (pads[1], pads[3], pads[0], pads[2]))
        pads = [0, 0, 0, 0]
    cols = F.unfold(X, kernel_size=k, dilation=list(attr(layer.node, "dilations", None) or [1, 1]),
                    padding=(pads[0], pads[1]), stride=list(attr(layer.node, "strides", None) or [1, 1]))
    return cols.transpose(1, 2).reshape(-1, cols.shape[1])


def _targets(layer: Layer, Y: torch.Tensor) -> torch.Tensor:
    if layer.op in ("Gemm", "MatMul"):
        return Y.reshape(-1, Y.shape[-1])
    return Y.permute(0, 2, 3, 1).reshape(-1, Y.shape[1])


def _stats(layer: Layer, X: torch.Tensor, Y: torch.Tensor | None, max_rows: int = MAX_ROWS) -> _Stats | None:
    """Gram statistics of the layer's input features, accumulated image chunk by chunk.

    Products run in float32 (fast BLAS) and are summed in float64; at most
    ``max_rows`` feature rows are used (a seeded random subset of positions).
    """
    total = None
    gen = torch.Generator().manual_seed(0)
    for s in range(0, len(X), CHUNK):
        f = _features(layer, X[s:s + CHUNK])
        if f is None:
            return None
        t = _targets(layer, Y[s:s + CHUNK]) if Y is not None else f[:, :0]
        keep = max(1, int(round(max_rows * len(f) / _rows_total(layer, X))))
        if len(f) > keep:
            idx = torch.randperm(len(f), generator=gen, device="cpu")[:keep].to(f.device)
            f, t = f[idx], t[idx]
        part = _Stats(G=(f.T @ f).double(), C=(f.T @ t).double(), x_sum=f.double().sum(0),
                      y_sum=t.double().sum(0), yy=float((t.double() ** 2).sum()), n=f.shape[0])
        total = part if total is None else _Stats(total.G + part.G, total.C + part.C, total.x_sum + part.x_sum,
                                                  total.y_sum + part.y_sum, total.yy + part.yy, total.n + part.n)
    return total


def _plain_columns(layer: Layer, X: torch.Tensor) -> bool:
    """Whether the layer's input features on ``X`` are plain columns of its weight
    (not, e.g., a grouped convolution's), so least squares and GPTQ apply."""
    probe = _features(layer, X[:1])
    return probe is not None and probe.shape[1] == int(np.prod(layer.w_oc().shape[1:]))


def input_gram(layer: Layer, X: torch.Tensor) -> torch.Tensor | None:
    """XᵀX of the layer's input features on the inputs ``X`` (None where they are not
    plain columns of its weight, e.g. grouped convolutions)."""
    return _stats(layer, X, None).G if _plain_columns(layer, X) else None


def _rows_total(layer: Layer, X: torch.Tensor) -> int:
    f = _features(layer, X[:1])
    return max(1, len(f) * len(X)) if f is not None else 1


def centred_gram(st: _Stats) -> torch.Tensor:
    mean = st.x_sum / st.n
    return st.G - st.n * torch.outer(mean, mean)


def ridge_refit(st: _Stats, W0: torch.Tensor, with_bias: bool, ridge: float = RIDGE) -> torch.Tensor:
    """argmin ||X W + b − Y||² + λ||W − W0||²  (b free when ``with_bias``)."""
    if with_bias:
        G = centred_gram(st)
        C = st.C - torch.outer(st.x_sum, st.y_sum) / st.n
    else:
        G, C = st.G, st.C
    # shrink toward W0 more when rows are few per feature (d/n): no overfitting on small sets
    d = G.shape[0]
    lam = (ridge + (d / max(st.n, 1) if ridge > 0 else 0.0)) * float(torch.diagonal(G).mean().clamp_min(1e-12))
    A = G + lam * torch.eye(G.shape[0], dtype=G.dtype, device=G.device)
    return torch.linalg.solve(A, C + lam * W0)


def gptq(W: torch.Tensor, H: torch.Tensor, bits: int, scale: torch.Tensor,
         block: int = 128, damp: float = DAMP, bounds: tuple[torch.Tensor, torch.Tensor] | None = None
         ) -> tuple[torch.Tensor, torch.Tensor]:
    """Quantize rows of ``W`` (out x features) minimising ||X(W − Ŵ)ᵀ||², H = XᵀX.

    Returns (dequantized weights, integer weights).  Columns are processed in order
    of decreasing H diagonal ("act order"), the standard GPTQ heuristic.  ``bounds``
    (integer tensors shaped like ``W``) confine each integer weight to [lo, hi]: the
    rounding picks the nearest allowed level and the error feedback spreads what the
    box costs over the columns still to come (used for nested bit-widths,
    :func:`nested_gptq`).
    """
    W = W.double().clone()
    H = H.double().clone()
    d = H.shape[0]
    dead = torch.diagonal(H) <= 0
    H[dead, dead] = 1.0
    W[:, dead] = 0.0
    perm = torch.argsort(torch.diagonal(H), descending=True)
    inv = torch.argsort(perm)
    W, H = W[:, perm], H[perm][:, perm]
    qmax = weight_qmax(bits)
    lo = torch.full_like(W, -qmax) if bounds is None else bounds[0].double()[:, perm].clamp(-qmax, qmax)
    hi = torch.full_like(W, qmax) if bounds is None else torch.maximum(bounds[1].double()[:, perm].clamp(-qmax, qmax), lo)
    U = _inverse_cholesky(H, damp)
    s = scale.double()[:, None]
    Q = torch.zeros_like(W)
    for i1 in range(0, d, block):
        i2 = min(i1 + block, d)
        W1 = W[:, i1:i2].clone()
        E1 = torch.zeros_like(W1)
        U1 = U[i1:i2, i1:i2]
        for j in range(i2 - i1):
            w = W1[:, j:j + 1]
            q = torch.minimum(torch.maximum(torch.round(w / s), lo[:, i1 + j:i1 + j + 1]), hi[:, i1 + j:i1 + j + 1])
            Q[:, i1 + j:i1 + j + 1] = q
            err = (w - q * s) / U1[j, j]
            W1[:, j:] -= err @ U1[j:j + 1, j:]
            E1[:, j:j + 1] = err
        W[:, i2:] -= E1 @ U[i1:i2, i2:]
    Q = Q[:, inv]
    return Q * s, Q


class FitFailed(Exception):
    """A layer's statistics cannot be fitted (not finite, or no damping makes them positive definite)."""


def _inverse_cholesky(H: torch.Tensor, damp: float, tries: int = 6) -> torch.Tensor:
    """Upper Cholesky factor of (H + δI)⁻¹, δ = ``damp`` x the mean diagonal, raised tenfold
    until the factorisation succeeds (dead, constant or duplicate channels make H singular,
    and rounding can leave it a little indefinite)."""
    if not torch.isfinite(H).all():
        raise FitFailed("its input statistics are not finite")
    d = H.shape[0]
    base = float(torch.diagonal(H).mean().clamp_min(1e-12))
    eye = torch.eye(d, dtype=H.dtype, device=H.device)
    for k in range(tries):
        L, info = torch.linalg.cholesky_ex(H + damp * 10 ** k * base * eye)
        if int(info) == 0:
            U, info = torch.linalg.cholesky_ex(torch.cholesky_inverse(L), upper=True)
            if int(info) == 0 and torch.isfinite(U).all():
                return U
    raise FitFailed("its input Gram matrix is not positive definite even with strong damping")


def nested_gptq(W: torch.Tensor, H: torch.Tensor, scales: dict[int, torch.Tensor]) -> torch.Tensor:
    """Integer weights at the highest bit-width of ``scales`` ({bits: per-row scale})
    from which every lower bit-width, requantised by rounding to its own scale
    (``ops.reference.derive_weight``), is a fitted rounding of ``W`` too.

    The bit-widths are fitted from the lowest up, each by GPTQ confined to the
    quantization cells the lower ones chose (the values that round back to them):
    the low bit-widths, which lose the most, get plain GPTQ; the higher ones the best
    rounding still compatible with them.  Cells of different bit-widths do not
    nest exactly, so a weight moved far by a low bit-width drags the higher ones
    with it: a row whose output errors ||X(w − ŵ_b)ᵀ||², summed over the
    bit-widths, come out above those of the top bit-width's nearest rounding keeps
    that rounding (its lower bit-widths requantised from it, as the ops derive them).
    """
    W = W.double()
    Hd = H.double()
    top = max(scales)
    s_top = scales[top].double()[:, None]
    nearest = torch.clamp(torch.round(W / s_top), -weight_qmax(top), weight_qmax(top))

    def row_error(Wq: torch.Tensor) -> torch.Tensor:
        D = W - Wq
        return ((D @ Hd) * D).sum(dim=1)

    lo = torch.full_like(W, -math.inf)          # float values every fitted bit-width allows
    hi = torch.full_like(W, math.inf)
    err_fitted = torch.zeros(W.shape[0], dtype=torch.float64, device=W.device)
    err_nearest = torch.zeros_like(err_fitted)
    Q = None
    for bits in sorted(scales):
        s = scales[bits].double()[:, None]
        qmax = weight_qmax(bits)
        margin = CELL_MARGIN * s                 # stay clear of the rounding ties at a cell's edge
        qlo = torch.ceil((lo + margin) / s).clamp(-qmax, qmax)
        qhi = torch.floor((hi - margin) / s).clamp(-qmax, qmax)
        Wq, Q = gptq(W, H, bits, scales[bits], bounds=(qlo, qhi))
        err_fitted += row_error(Wq)
        err_nearest += row_error(torch.clamp(torch.round(nearest * s_top / s), -qmax, qmax) * s)
        lo = torch.maximum(lo, torch.where(Q <= -qmax, -math.inf, (Q - 0.5) * s))
        hi = torch.minimum(hi, torch.where(Q >= qmax, math.inf, (Q + 0.5) * s))
    return torch.where((err_fitted < err_nearest)[:, None], Q, nearest)
