"""How good can post-training rounding be?  Per-channel bounds on the output error.

For one output channel with weights ``w``, scale ``s`` and input second moments
``G = E[x x^T]``, rounding to integers ``q`` costs ``f(q) = (w - s q)^T G (w - s q)``
(the output error energy; ``|X(w - s q)|^2`` up to the number of samples).  Over
integer ``q`` in ``[-qmax, qmax]`` this is an integer least-squares problem:

* lower bound: the semidefinite relaxation of Park & Boyd (2018).  With ``q = z + y``
  and ``z = floor(w / s)``, every integer ``y`` in the box satisfies ``y_i^2 >= y_i``
  and ``(y_i - lo_i)(hi_i - y_i) >= 0``; relaxing ``y y^T`` to ``Y`` with
  ``[[Y, y], [y^T, 1]] >= 0`` gives a convex problem whose optimum is below every
  integer solution (solved with cvxpy + Clarabel);
* upper bound: randomized rounding of ``N(y, Y - y y^T)`` followed by greedy
  coordinate descent, and round-to-nearest (RTN) for comparison.

Pruning has the analogous problem ``min f`` over weights with at most ``k``
non-zeros (kept weights refitted); for small ``n`` every support is enumerated.
"""

from __future__ import annotations

import itertools
import math
import time
from dataclasses import dataclass, field

import numpy as np

from datafree.toolchain import quant


# ------------------------------------------------------------------ one channel
def objective(G: np.ndarray, w: np.ndarray, s: float, q: np.ndarray) -> float:
    d = w - s * np.asarray(q, dtype=np.float64)
    return float(d @ G @ d)


def round_to_nearest(w: np.ndarray, s: float, qmax: int) -> np.ndarray:
    return np.clip(np.round(w / s), -qmax, qmax)


def exhaustive(G: np.ndarray, w: np.ndarray, s: float, qmax: int) -> tuple[float, np.ndarray]:
    """The exact optimum by enumerating every integer vector (tests and tiny n only)."""
    n = len(w)
    grid = np.arange(-qmax, qmax + 1, dtype=np.float64)
    best, best_q = math.inf, None
    for head in itertools.product(grid, repeat=max(n - 4, 0)):
        tail = np.array(list(itertools.product(grid, repeat=min(n, 4))))
        Q = np.hstack([np.broadcast_to(np.array(head), (len(tail), len(head))), tail])
        D = w[None, :] - s * Q
        err = np.einsum("ij,jk,ik->i", D, G, D)
        i = int(np.argmin(err))
        if err[i] < best:
            best, best_q = float(err[i]), Q[i].copy()
    return best, best_q


def greedy_descent(G: np.ndarray, w: np.ndarray, s: float, q: np.ndarray, qmax: int,
                   sweeps: int = 100) -> np.ndarray:
    """Coordinate descent over integers: each step moves one q_i to its best value."""
    P = s * s * G
    q = np.asarray(q, dtype=np.float64).copy()
    g = P @ q - s * (G @ w)                   # half the gradient of f in q
    diag = np.maximum(np.diag(P), 1e-300)
    for _ in range(sweeps):
        moved = False
        for i in range(len(q)):
            new = float(np.clip(np.round(q[i] - g[i] / diag[i]), -qmax, qmax))
            d = new - q[i]
            if d != 0 and diag[i] * d * d + 2 * d * g[i] < -1e-15 * max(abs(g[i]), 1.0):
                q[i] = new
                g += P[:, i] * d
                moved = True
        if not moved:
            break
    return q


def sdp_relaxation(G: np.ndarray, w: np.ndarray, s: float, qmax: int) -> tuple[float, np.ndarray, np.ndarray]:
    """(lower bound on min f, relaxed y + z, relaxed second moment of q) via cvxpy/Clarabel."""
    import cvxpy as cp

    n = len(w)
    ref = float(w @ G @ w) or 1.0
    z = np.clip(np.floor(w / s), -qmax, qmax - 1)
    lo, hi = -qmax - z, qmax - z
    # f(z + y) / ref = y^T A y + 2 b^T y + c
    A = s * s * G / ref
    A = (A + A.T) / 2
    b = (s * s * G @ z - s * G @ w) / ref
    c = objective(G, w, s, z) / ref
    M = cp.Variable((n + 1, n + 1), PSD=True)
    Y, y = M[:n, :n], M[:n, n]
    dY = cp.diag(Y)
    cons = [M[n, n] == 1, dY >= y, dY <= cp.multiply(lo + hi, y) - lo * hi, y >= lo, y <= hi]
    prob = cp.Problem(cp.Minimize(cp.trace(A @ Y) + 2 * b @ y + c), cons)
    prob.solve(solver=cp.CLARABEL)
    if prob.status not in ("optimal", "optimal_inaccurate"):
        raise RuntimeError(f"SDP relaxation ended {prob.status}")
    lower = max(float(prob.value), 0.0) * ref
    yv, Yv = np.asarray(y.value, dtype=np.float64), np.asarray(Y.value, dtype=np.float64)
    mean = z + yv
    second = Yv - np.outer(yv, yv)
    return lower, mean, second


def randomized_rounding(G: np.ndarray, w: np.ndarray, s: float, qmax: int, mean: np.ndarray,
                        cov: np.ndarray, samples: int = 32, seed: int = 0) -> tuple[float, np.ndarray]:
    """Best of ``samples`` Gaussian roundings of the SDP solution, each polished by descent."""
    rng = np.random.default_rng(seed)
    vals, vecs = np.linalg.eigh((cov + cov.T) / 2)
    root = vecs * np.sqrt(np.clip(vals, 0, None))
    starts = [round_to_nearest(w, s, qmax), np.clip(np.round(mean), -qmax, qmax)]
    starts += [np.clip(np.round(mean + root @ rng.standard_normal(len(w))), -qmax, qmax) for _ in range(samples)]
    best, best_q = math.inf, None
    for q0 in starts:
        q = greedy_descent(G, w, s, q0, qmax)
        f = objective(G, w, s, q)
        if f < best:
            best, best_q = f, q
    return best, best_q


@dataclass
class ChannelBound:
    channel: int
    reference: float      # w^T G w: output energy of the float channel
    rtn: float            # error of round-to-nearest
    upper: float          # best integer solution found (feasible)
    lower: float          # SDP lower bound: no rounding does better
    seconds: float


def channel_bound(G: np.ndarray, w: np.ndarray, s: float, bits: int, channel: int = 0,
                  samples: int = 32, seed: int = 0) -> ChannelBound:
    t0 = time.perf_counter()
    qmax = quant.weight_qmax(bits)
    w = np.asarray(w, dtype=np.float64)
    G = np.asarray(G, dtype=np.float64)
    rtn = objective(G, w, s, round_to_nearest(w, s, qmax))
    lower, mean, cov = sdp_relaxation(G, w, s, qmax)
    upper, _ = randomized_rounding(G, w, s, qmax, mean, cov, samples, seed)
    return ChannelBound(channel, float(w @ G @ w), rtn, min(upper, rtn), min(lower, upper, rtn),
                        time.perf_counter() - t0)


# ------------------------------------------------------------------- pruning
def pruned_error(G: np.ndarray, w: np.ndarray, keep: np.ndarray, refit: bool = True) -> float:
    """Output error when only the indices ``keep`` survive (kept weights refitted by least squares)."""
    n = len(w)
    drop = np.setdiff1d(np.arange(n), keep)
    if len(drop) == 0:
        return 0.0
    wd = w[drop]
    if not refit or len(keep) == 0:
        e = np.zeros(n)
        e[drop] = wd
        return float(e @ G @ e)
    Gkk, Gkd, Gdd = G[np.ix_(keep, keep)], G[np.ix_(keep, drop)], G[np.ix_(drop, drop)]
    schur = Gdd - Gkd.T @ np.linalg.lstsq(Gkk, Gkd, rcond=None)[0]
    return float(max(wd @ schur @ wd, 0.0))


def prune_bound(G: np.ndarray, w: np.ndarray, keep: int, limit: int = 20000) -> dict | None:
    """Magnitude pruning (with and without refit) against the exact best support; None when too many."""
    n = len(w)
    if math.comb(n, keep) > limit:
        return None
    mag = np.argsort(-np.abs(w))[:keep]
    best = min(pruned_error(G, w, np.array(S, dtype=int)) for S in itertools.combinations(range(n), keep))
    return {"magnitude": pruned_error(G, w, mag, refit=False), "magnitude_refit": pruned_error(G, w, mag),
            "optimal": best, "reference": float(w @ G @ w)}


# --------------------------------------------------------------- per layer
@dataclass
class LayerBound:
    layer: str
    bits: int
    n: int
    channels: list[ChannelBound] = field(default_factory=list)
    out_channels: int = 0
    gram: str = ""                   # where G came from
    prune: dict | None = None        # summed pruning errors over the channels, when enumerable
    prune_note: str = ""
    samples: int | None = None       # input vectors behind G (None: from moments)
    note: str = ""

    def _db(self, attr: str) -> float:
        ref = sum(c.reference for c in self.channels)
        err = sum(getattr(c, attr) for c in self.channels)
        return float("inf") if err <= 0 else float(10 * np.log10(ref / err))

    @property
    def rtn_db(self) -> float:
        return self._db("rtn")

    @property
    def best_db(self) -> float:
        """SQNR of the best integer solution found (achievable)."""
        return self._db("upper")

    @property
    def limit_db(self) -> float:
        """SQNR no rounding can exceed (from the SDP lower bound on the error)."""
        return self._db("lower")

    @property
    def seconds(self) -> float:
        return sum(c.seconds for c in self.channels)


# ------------------------------------------------------------ second moments
def gram_from_inputs(layer, x: np.ndarray, max_rows: int = 200_000, seed: int = 0) -> list[np.ndarray]:
    """``E[p p^T]`` of the input patches ``p`` each output channel reads, one per group."""
    import torch
    import torch.nn.functional as F

    from datafree.toolchain import graph

    x = np.asarray(x, dtype=np.float32)
    if layer.op in ("Gemm", "MatMul"):
        rows = x.reshape(-1, x.shape[-1]).astype(np.float64)
        return [rows.T @ rows / len(rows)]
    node = layer.node
    w = layer.w_oc()
    k = tuple(w.shape[2:])
    pads = list(graph.attr(node, "pads", [0] * (2 * len(k))))
    strides = tuple(graph.attr(node, "strides", [1] * len(k)))
    dil = tuple(graph.attr(node, "dilations", [1] * len(k)))
    t = torch.from_numpy(x)
    if len(k) != 2:
        raise ValueError("only 2-D convolutions")
    t = F.pad(t, (pads[1], pads[3], pads[0], pads[2]))
    cols = F.unfold(t, k, dilation=dil, stride=strides)          # (N, C*kh*kw, L)
    cols = cols.permute(0, 2, 1).reshape(-1, cols.shape[1]).double().numpy()
    if len(cols) > max_rows:
        cols = cols[np.random.default_rng(seed).choice(len(cols), max_rows, replace=False)]
    n = w.shape[1] * int(np.prod(k))
    return [c.T @ c / len(c) for c in (cols[:, g * n:(g + 1) * n] for g in range(layer.groups))]


def rectified_moments(mu: np.ndarray, sigma: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """E[x] and E[x^2] of ``relu(N(mu, sigma^2))``, per channel."""
    from scipy import stats

    sigma = np.maximum(sigma, 1e-12)
    a = mu / sigma
    cdf, pdf = stats.norm.cdf(a), stats.norm.pdf(a)
    return mu * cdf + sigma * pdf, (mu * mu + sigma * sigma) * cdf + mu * sigma * pdf


def gram_from_moments(layer, source) -> list[np.ndarray] | None:
    """Data-free ``E[p p^T]`` when the input is ``relu(BN(...))`` of ``source``: channels
    are independent rectified Gaussians (padding ignored).  None when that does not hold."""
    if source is None or source.preact_moments() is None or source.act_type != "relu" or layer.groups != 1:
        return None
    m1, m2 = rectified_moments(*source.preact_moments())
    w = layer.w_oc()
    per = int(np.prod(w.shape[2:])) if w.ndim > 2 else 1
    if len(m1) != w.shape[1]:
        return None
    mean, sq = np.repeat(m1, per), np.repeat(m2, per)
    G = np.outer(mean, mean)
    G[np.diag_indices_from(G)] = sq
    return [G]


# --------------------------------------------------------------- the driver
def layer_bounds(layers, inputs: dict[str, np.ndarray], bits: dict[str, int], *, budget_s: float = 60.0,
                 max_n: int = 64, max_channels: int = 16, moments: dict | None = None,
                 progress=None, seed: int = 0) -> tuple[list[LayerBound], dict[str, str]]:
    """Bounds for every eligible layer within ``budget_s`` seconds; the rest with a reason.

    ``inputs`` maps a layer name to its input activations on the probes;
    ``moments`` maps a layer name to the layer producing its input (BN+ReLU), used
    when that layer has no probe input.  Channels are sampled evenly when a layer
    has more than ``max_channels`` or the remaining budget does not cover them all.
    """
    skipped: dict[str, str] = {}
    eligible = []
    for layer in layers:
        w = layer.w_oc()
        n = int(np.prod(w.shape[1:]))
        if layer.name not in bits:
            skipped[layer.name] = "stays in float: nothing to round"
        elif layer.op == "ConvTranspose":
            skipped[layer.name] = "transposed convolution: patch statistics not implemented"
        elif n > max_n:
            skipped[layer.name] = (f"input dimension {n} per output channel > {max_n}: "
                                   f"the SDP would take minutes per channel")
        else:
            eligible.append((layer, n))
    done: list[LayerBound] = []
    start = time.perf_counter()
    for i, (layer, n) in enumerate(eligible):
        left = budget_s - (time.perf_counter() - start)
        if left <= 0:
            skipped[layer.name] = f"time budget of {budget_s:g} s used up"
            continue
        grams, how = _grams(layer, inputs, moments or {})
        if grams is None:
            skipped[layer.name] = how
            continue
        share = left / (len(eligible) - i)
        lb = _one_layer(layer, n, grams, how, bits[layer.name], share, max_channels, seed, inputs, progress)
        done.append(lb)
    return done, skipped


def _samples(layer, x: np.ndarray) -> int:
    """Input vectors (patches) each output channel sees in ``x``."""
    if layer.op in ("Gemm", "MatMul"):
        return int(np.prod(x.shape[:-1]))
    shape = layer.node.outputs[0].shape
    spatial = [d for d in (shape or ())[2:] if isinstance(d, int)]
    return int(x.shape[0] * (np.prod(spatial) if spatial else 1))


def _grams(layer, inputs, moments):
    if layer.name in inputs:
        try:
            return gram_from_inputs(layer, inputs[layer.name]), "probes"
        except ValueError as exc:
            return None, f"no patch statistics: {exc}"
    g = gram_from_moments(layer, moments.get(layer.name))
    if g is not None:
        return g, "rectified-Gaussian moments of the BN before it"
    return None, "no probe activations and the input is not BN+ReLU"


def _one_layer(layer, n, grams, how, bits, share_s, max_channels, seed, inputs_of=None, progress=None) -> LayerBound:
    """Bounds for evenly spread channels of one layer while its time share lasts (at least one)."""
    inputs_of = inputs_of or {}
    stage = f"bounds {layer.name}"
    w = layer.w_oc().reshape(layer.out_channels, -1).astype(np.float64)
    scales = quant.weight_scales(layer.w_oc(), bits).astype(np.float64)
    per_group = layer.out_channels // len(grams)
    order = _spread(layer.out_channels, max_channels)
    lb = LayerBound(layer=layer.name, bits=bits, n=n, out_channels=layer.out_channels, gram=how)
    if how == "probes":
        lb.samples = _samples(layer, inputs_of.get(layer.name)) if inputs_of.get(layer.name) is not None else None
        if lb.samples is not None and lb.samples < n:
            lb.note = (f"G from {lb.samples} input vectors has rank < n = {n}: the bounds hold for these probes, "
                       f"and errors in its null space are free; use more probes")
    t0 = time.perf_counter()
    for c in order:
        if lb.channels and (time.perf_counter() - t0) * (1 + 1 / len(lb.channels)) > share_s:
            break
        if progress is not None:
            progress(stage, len(lb.channels), len(order))
        G = grams[c // per_group]
        lb.channels.append(channel_bound(G, w[c], float(scales[c]), bits, c, seed=seed + c))
    if progress is not None:
        progress(stage, len(order), len(order))
    keep = max(1, int(round(n * bits / 16)))
    sums = None
    for cb in lb.channels:
        r = prune_bound(grams[cb.channel // per_group], w[cb.channel], keep)
        if r is None:
            lb.prune_note = f"pruning optimum not enumerated: C({n},{keep}) = {math.comb(n, keep):,} supports"
            sums = None
            break
        sums = r if sums is None else {k: sums[k] + r[k] for k in r}
    lb.prune = sums
    return lb


def _spread(total: int, k: int) -> list[int]:
    """Up to ``k`` channel indices spread evenly over ``range(total)``."""
    if total <= k:
        return list(range(total))
    return sorted({int(round(i)) for i in np.linspace(0, total - 1, k)})
