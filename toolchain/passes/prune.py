"""Structured pruning with UDFC next-layer compensation.

Removing output channel ``j`` of a layer L is compensated in closed form (UDFC,
Bai et al. 2023): approximate L's pre-activation ``z_j`` by a combination ``Σ s_i z_i``
of the kept channels, solving

    min_s ||Q s - vec(W_j)||² + α1 ||P s - K_j||²,   Q[:, i] = (γ_i σ_j / (σ_i γ_j)) vec(W_i),  P[i] = K_i

as one least-squares system, then fold the coefficients into the next layer:
``W'[:, i] += s_i W'[:, j]``.  Channels are then physically removed from every member
of the prune group (L, its BN and activation, depthwise layers, per-channel
constants) and from the input of every consumer.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from ..graph import Layer, add_initializer, const_array, set_const
from ..groups import Consumer, PruneGroup

ALPHA1 = 0.01


@dataclass
class PrunePlan:
    group: PruneGroup
    keep: np.ndarray          # sorted indices of kept channels
    pruned: np.ndarray        # sorted indices of removed channels


# ---------------------------------------------------------------- selection
def channel_scores(layer: Layer, criterion: str) -> np.ndarray:
    """Importance per output channel (higher = keep)."""
    w = layer.w_oc().reshape(layer.out_channels, -1).astype(np.float64)
    if criterion == "l2":
        return np.sqrt((w ** 2).sum(axis=1))
    score = np.abs(w).sum(axis=1)
    if criterion == "bn_l1":
        p = layer.bn_params()
        if p is not None:
            score = score * np.abs(p["gamma"]) / np.sqrt(p["var"] + p["eps"])
    return score


AUTO_WIDE = 128       # "auto": multiples of 8 in groups this wide, of 4 below ...
AUTO_MIN_STEPS = 8    # ... and of less where a group would have fewer steps than this


def group_multiple(channels: int, multiple: int | str) -> int:
    """The multiple one group's kept count is rounded to.

    ``"auto"``: 8 for groups of ``AUTO_WIDE`` channels and more, else 4, halved while the
    group would have fewer than ``AUTO_MIN_STEPS`` steps (16 channels: 2).  CPU
    convolution kernels run channels in blocks (onnxruntime: 16 floats on AVX-512, 8 on
    AVX2; its int8 kernels favour multiples of 4 and 8): counts off the blocks run at
    the speed of the next whole block, so pruning them saves MACs but little time.  A
    coarser grain in narrow layers costs accuracy, since global allocation can then only
    take large steps there (``benchmarks/results/plain_session.md`` and
    ``compress.md``: ResNet-20's rows with any count and with multiples of 8)."""
    if multiple != "auto":
        return int(multiple)
    m = 8 if channels >= AUTO_WIDE else 4
    while m > 1 and channels < AUTO_MIN_STEPS * m:
        m //= 2
    return m


def n_keep(channels: int, ratio: float, multiple: int | str = 1) -> int:
    """Channels kept at ``ratio``, rounded up to a multiple the vector units like."""
    multiple = group_multiple(channels, multiple)
    keep = channels - int(np.floor(ratio * channels + 1e-9))
    if multiple > 1 and channels >= multiple:
        keep = min(channels, int(np.ceil(keep / multiple)) * multiple)
    return max(1, keep)


def choose(scores: np.ndarray, keep: int) -> tuple[np.ndarray, np.ndarray]:
    order = np.argsort(-scores, kind="stable")
    return np.sort(order[:keep]), np.sort(order[keep:])


def channel_macs(group: PruneGroup, positions: dict[str, int] | None = None) -> float:
    """MACs per image one channel of ``group`` costs: its producer and carried depthwise and
    gate rows plus the consumers' input slices, counted at the input size assumed where
    shapes are symbolic (``positions``: ``Layer.macs``); 1 where a size is still unknown."""
    total = 0.0
    for layer in [group.producer] + group.carried:
        m = layer.macs(positions)
        total += (m or 0) / max(layer.out_channels, 1)
    for c in group.consumers:
        m = c.layer.macs(positions)
        total += (m or 0) * c.stride / max(c.layer.in_channels, 1)
    return total or 1.0


def global_allocation(groups: list[PruneGroup], curves: dict[str, np.ndarray], ratio: float,
                      multiple: int | str = 1, cap: float = 0.9,
                      positions: dict[str, int] | None = None) -> dict[str, int]:
    """Channels kept per group when pruning removes the MACs a uniform ``ratio`` would,
    taken where they cost least.

    ``curves[g]``: the cost of removing each next channel of group ``g`` (ascending
    order of removal, comparable across groups).  Channels go one at a time, always the
    cheapest per MAC saved, until the MACs saved reach the uniform plan's; no group loses
    more than ``cap`` of its channels.  With ``multiple`` > 1 (or ``"auto"``, per group:
    :func:`group_multiple`), channels go that many at a time so every count stays a
    multiple the vector units like.  ``positions``: output positions per layer at the input
    size assumed, where shapes are symbolic (without them every such channel would count as
    one MAC, and the budget would be met by the few layers whose size is known).
    """
    multiples = {g.name: group_multiple(g.channels, multiple) for g in groups}
    per_channel = {g.name: channel_macs(g, positions) for g in groups}
    budget = sum((g.channels - n_keep(g.channels, ratio)) * per_channel[g.name] for g in groups)
    removed = {g.name: 0 for g in groups}
    limit = {g.name: min(int(cap * g.channels), len(curves[g.name])) for g in groups}

    def chunk(g) -> int:
        """Channels the group gives up next: whole ``multiple``s, so its count stays aligned."""
        m = multiples[g.name]
        if m <= 1 or g.channels < m:
            return 1
        return (g.channels - removed[g.name]) % m or m

    saved = 0.0
    while saved < budget - 1e-9:
        best, best_cost = None, np.inf
        for g in groups:
            k, m = removed[g.name], chunk(g)
            if k + m <= limit[g.name]:
                cost = float(np.sum(curves[g.name][k:k + m])) / (m * per_channel[g.name])
                if cost < best_cost:
                    best, best_cost = g, cost
        if best is None:
            break
        m = chunk(best)
        removed[best.name] += m
        saved += m * per_channel[best.name]
    return {g.name: max(1, g.channels - removed[g.name]) for g in groups}


def score_curve(scores: np.ndarray) -> np.ndarray:
    """Removal costs by a magnitude criterion: the scores in ascending order, relative to
    the layer's mean so layers of different scale compete fairly."""
    return np.sort(scores / (scores.mean() + 1e-12))


def select_by_output(consumers: list[tuple[np.ndarray, np.ndarray, int]], channels: int, n_remove: int,
                     damp: float = 0.01) -> np.ndarray:
    """Channels whose removal costs the consumers' outputs least (greedy structured OBS)."""
    return np.sort(removal_order(consumers, channels, n_remove, damp)[0])


MAX_UPDATES = 64     # removal_order: updates of H⁻¹ at most (channels go in chunks beyond)


def removal_order(consumers: list[tuple[np.ndarray, np.ndarray, int]], channels: int, n_remove: int,
                  damp: float = 0.01, energy: float | None = None,
                  max_updates: int = MAX_UPDATES) -> tuple[np.ndarray, np.ndarray]:
    """Greedy structured OBS: channels in the order they go, and what each one costs.

    ``consumers``: per consumer ``(H, W, block)`` with ``H`` the centred Gram matrix of
    its input features on synthetic images, ``W`` (features x out) its weights and
    ``block`` the features per channel (kernel positions, or spatial positions after a
    Flatten).  Removing channel c and refitting the rest optimally raises the squared
    output error by ``tr(W_cᵀ [H⁻¹]_cc⁻¹ W_c)``; the cheapest channel goes, H⁻¹ and W
    are updated as the refit would, and the search repeats.  Costs are relative to the
    consumers' output energy ``tr(Wᵀ H W)``, so groups can be compared.

    Each update costs a pass over ``H⁻¹`` (channels·block squared): where more than
    ``max_updates`` channels go, they go that many times in equal chunks (the cheapest
    of the chunk's step, then one update for all of them), so a wide layer (a 3072-channel
    MLP, a 512-channel conv read by a 3 x 3 one) is ordered in seconds, not minutes.
    """
    state = []
    own = 0.0
    for H, W, block in consumers:
        H = H.astype(np.float64).copy()
        own += float(np.trace(W.T @ H @ W))
        H += damp * max(float(np.mean(np.diag(H))), 1e-12) * np.eye(len(H))
        state.append([np.linalg.inv(H), W.astype(np.float64).copy(), block])
    energy = own if energy is None else energy
    removed: list[int] = []
    costs: list[float] = []
    alive = np.ones(channels, dtype=bool)
    chunk = max(1, -(-n_remove // max_updates))
    while len(removed) < n_remove:
        cost = np.zeros(channels)
        idx = np.flatnonzero(alive)
        for Hinv, W, b in state:   # every alive channel's cost at once: its b x b block of H^-1
            blocks = Hinv.reshape(channels, b, channels, b)[idx, :, idx, :]
            Wc = W.reshape(channels, b, -1)[idx]
            cost[idx] += np.einsum("nbo,nbo->n", Wc, np.linalg.solve(blocks, Wc))
        cost[~alive] = np.inf
        picks = np.argsort(cost, kind="stable")[:min(chunk, n_remove - len(removed))]
        for st in state:
            Hinv, W, b = st
            sl = (picks[:, None] * b + np.arange(b)).ravel()
            K = Hinv[:, sl] @ np.linalg.inv(Hinv[np.ix_(sl, sl)])
            W -= K @ W[sl]
            Hinv -= K @ Hinv[sl, :]
            W[sl] = 0.0
            Hinv[sl, :] = 0.0
            Hinv[:, sl] = 0.0
            st[0], st[1] = Hinv, W
        alive[picks] = False
        removed.extend(int(c) for c in picks)
        costs.extend(float(cost[c]) / max(energy, 1e-12) for c in picks)
    return np.array(removed, dtype=np.int64), np.array(costs)


# ------------------------------------------------------------- compensation
def closed_form_coefficients(layer: Layer, keep: np.ndarray, pruned: np.ndarray,
                             alpha1: float = ALPHA1) -> np.ndarray:
    """S[k, p]: coefficient of kept channel keep[k] standing in for pruned channel pruned[p]."""
    w = layer.w_oc().reshape(layer.out_channels, -1).astype(np.float64)
    p = layer.bn_params()
    if p is not None:
        gamma = p["gamma"].astype(np.float64)
        sigma = np.sqrt(p["var"].astype(np.float64) + p["eps"])
        scale = gamma / sigma
        K = p["beta"] - scale * p["mean"] + scale * layer.bias_array()
    else:
        scale = np.ones(layer.out_channels)
        K = layer.bias_array().astype(np.float64)
    if scale[0] != 0 and np.all(scale == scale[0]):   # no BN (or a uniform one): one system for every column
        A = np.vstack([w[keep].T, np.sqrt(alpha1) * K[keep][None, :]])
        B = np.vstack([w[pruned].T, np.sqrt(alpha1) * K[pruned][None, :]])
        return np.linalg.lstsq(A, B, rcond=None)[0]
    S = np.zeros((len(keep), len(pruned)))
    for col, j in enumerate(pruned):
        ratio = np.divide(scale[keep], scale[j], out=np.zeros(len(keep)), where=scale[j] != 0)
        Q = w[keep].T * ratio[None, :]
        A = np.vstack([Q, np.sqrt(alpha1) * K[keep][None, :]])
        b = np.concatenate([w[j], [np.sqrt(alpha1) * K[j]]])
        S[:, col] = np.linalg.lstsq(A, b, rcond=None)[0]
    return S


def compensate_consumers(group: PruneGroup, keep: np.ndarray, pruned: np.ndarray, S: np.ndarray) -> None:
    """Fold the coefficients into every consumer: W'[:, i] += s_i W'[:, j]."""
    for c in group.consumers:
        w = consumer_in_weight(c)              # (out, C, stride, ...)
        add = np.einsum("kp,op...->ok...", S, w[:, pruned])
        w[:, keep] += add.astype(w.dtype)
        set_consumer_in_weight(c, w)


# ------------------------------------------------------ consumer input layout
def consumer_in_weight(c: Consumer) -> np.ndarray:
    """The consumer's weight as (out, channel, stride, ...) of the group's channels."""
    w = c.layer.w_oc()
    out = w.shape[0]
    if c.layer.op in ("Gemm", "MatMul"):
        return w.reshape(out, -1, c.stride).copy()
    return w.copy()


def set_consumer_in_weight(c: Consumer, w: np.ndarray) -> None:
    if c.layer.op in ("Gemm", "MatMul"):
        w = w.reshape(w.shape[0], -1)
    c.layer.set_w_oc(w)


# ----------------------------------------------------------------- surgery
def apply(plan: PrunePlan) -> None:
    """Physically remove ``plan.pruned`` from every member of the group."""
    g, keep = plan.group, plan.keep
    channels = g.channels                      # before slicing: per-channel constants still have them all
    _slice_out(g.producer, keep)
    for dw in g.depthwise:
        _slice_out(dw, keep)
        dw.node.attributes["group"] = _int_attr("group", len(keep))
    for gate in g.gates:
        _slice_out(gate, keep)
    for node in g.members:
        _slice_member(node, keep, channels)
    for c in g.consumers:
        w = consumer_in_weight(c)[:, keep]
        set_consumer_in_weight(c, w)


def _int_attr(name: str, v: int):
    import onnx_ir as ir

    return ir.AttrInt64(name, int(v))


def _slice_out(layer: Layer, keep: np.ndarray) -> None:
    layer.set_w_oc(layer.w_oc()[keep])
    if layer.bias is not None:
        set_const(layer.bias, const_array(layer.bias)[keep])
    if layer.bn is not None:
        for v in layer.bn.inputs[1:5]:
            set_const(v, const_array(v)[keep])
    for node in layer.act:
        if node.op_type == "PRelu":
            _slice_member(node, keep)


def _slice_member(node, keep: np.ndarray, channels: int | None = None) -> None:
    """Slice a member's per-channel constants to ``keep`` (``channels``: the group's count
    before pruning; constants with a multiple of it hold that many features per channel)."""
    if node.op_type == "BatchNormalization":
        for v in node.inputs[1:5]:
            set_const(v, const_array(v)[keep])
        return
    if node.op_type == "Reshape":
        shape = np.array([0, -1], dtype=np.int64)   # keep the batch, infer the features
        node.replace_input_with(1, add_initializer(node.graph, node.inputs[1].name + "_pruned", shape))
        node.attributes.pop("allowzero", None)       # dynamo writes allowzero=1, where 0 would mean 0
        return
    C = channels
    for i, v in enumerate(node.inputs):
        arr = const_array(v)
        if arr is None or arr.size == 1:
            continue
        # the per-channel axis: the one non-1 dimension
        axes = [a for a, d in enumerate(arr.shape) if d != 1]
        if len(axes) != 1:
            continue
        ax = axes[0]
        n = arr.shape[ax]
        if C is not None and n != C:
            stride = n // C
            idx = (keep[:, None] * stride + np.arange(stride)[None, :]).reshape(-1)
        else:
            idx = keep
        if v.is_initializer() and len(list(v.uses())) > 1:
            node.replace_input_with(i, add_initializer(node.graph, f"{v.name}_{node.name}",
                                                       np.take(arr, idx, axis=ax)))
        else:
            set_const(v, np.take(arr, idx, axis=ax))
