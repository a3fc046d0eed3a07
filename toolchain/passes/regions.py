"""Pruned blocks fitted as a whole, and the statistics that choose which channels go.

:func:`consumer_statistics`: per prune group, the Gram statistics of what its
consumers read, on synthetic images, for choosing channels by the output error their
removal causes.  :func:`fit_region`: Adam moves the weights of a pruned layer and its
consumers together so the block's output (followed through a residual Add and its
activation, :func:`_region_end`) matches the float network's, so the kept channels can
carry what the removed ones did.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import onnx_ir as ir
import torch

from .. import device as dev
from ..graph import Layer, set_const, single_consumer
from .solvers import CHUNK, _plain_columns, _stats, _targets, centred_gram

STATS_IMAGES = 512  # at most this many images (evenly spaced) for channel selection
CAPTURE_BYTES = 1 << 30   # values captured per forward pass for it, at most (a single group may need more)


@dataclass
class GroupStats:
    """What choosing a prune group's channels by output error needs (float model, synthetic images).

    ``consumers``: per consumer ``(H, W, block)``: ``H`` the centred Gram of its input
    features, ``W`` its weights as (features x out), scaled by the BN after it so errors
    count in the space the next layer sees, ``block`` the features per channel.
    ``energy``: centred energy, in the same rows as ``H``, of the values where the
    consumers' outputs end up (after a residual Add and its activation), so an error in
    a block whose skip path carries most of the signal counts for less.
    """

    consumers: list[tuple[np.ndarray, np.ndarray, int]]
    energy: float


def consumer_statistics(model: ir.Model, groups, images: np.ndarray, layers: list[Layer],
                        capture_bytes: int = CAPTURE_BYTES) -> dict[str, GroupStats]:
    """:class:`GroupStats` per prune group whose consumers are all plain Conv/Gemm layers
    (``layers``: every layer of ``model``; a block output is followed up to the next one).
    The values the groups read are captured several groups per forward pass, up to about
    ``capture_bytes`` at a time (one pass per group made a wide model's channel choice
    mostly forward passes)."""
    from ..torchgraph import TorchGraph

    graph = TorchGraph(model).eval()
    step = max(1, -(-len(images) // STATS_IMAGES))
    x_all = dev.tensor(np.ascontiguousarray(images[::step], dtype=np.float32))
    layer_nodes = {id(l.node) for l in layers}
    wanted = {g.name: [(c, c.layer.node.inputs[0].name,
                        _region_end(c.layer.node.outputs[0], graph, g.producer.node.inputs[0].name, layer_nodes))
                       for c in g.consumers] for g in groups}
    needs = {name: {n for _, *pair in w for n in pair} for name, w in wanted.items()}
    with torch.no_grad():   # bytes per image of each value, from one image
        probe = graph.run(x_all[:1], capture=sorted(set().union(*needs.values())))
    per_image = {n: t.numel() * t.element_size() for n, t in probe.items()}
    del probe
    out: dict[str, GroupStats] = {}

    def run(batch: list, names: set[str]) -> None:
        with torch.no_grad():
            got = _collect_many(graph, x_all, sorted(names))
        for b in batch:
            stats = _group_stats(b, wanted[b.name], got)
            if stats is not None:
                out[b.name] = stats

    batch, names = [], set()
    for g in groups:
        more = names | needs[g.name]
        if batch and sum(per_image[n] for n in more) * len(x_all) > capture_bytes:
            run(batch, names)
            batch, more = [], needs[g.name]
        batch.append(g)
        names = more
    if batch:
        run(batch, names)
    return out


def _group_stats(g, wanted, got: dict[str, torch.Tensor]) -> GroupStats | None:
    entries = []
    end_energy = 0.0
    for c, name, end in wanted:
        X, V = got[name], got[end]
        w = c.layer.w_oc()
        if not _plain_columns(c.layer, X):
            return None
        st = _stats(c.layer, X, None)
        W = w.reshape(w.shape[0], -1).T.astype(np.float64)
        p = c.layer.bn_params()
        if p is not None:
            W = W * (np.abs(p["gamma"]) / np.sqrt(p["var"] + p["eps"]))[None, :]
        block = W.shape[0] // g.channels
        entries.append((dev.numpy(centred_gram(st)), W, block))
        V = _targets(c.layer, V).double()                     # rows x channels
        end_energy += float(((V - V.mean(0)) ** 2).sum(1).mean()) * st.n
    return GroupStats(entries, end_energy) if entries else None


_ELEMENTWISE = {"Add", "Sub", "Mul", "Div", "Relu", "Clip", "LeakyRelu", "PRelu", "Sigmoid", "HardSigmoid",
                "HardSwish", "Tanh", "Elu", "Selu", "Softplus", "Gelu", "BatchNormalization"}


def _region_end(value: ir.Value, graph, in_name: str, layer_nodes: set[int]) -> str:
    """Follow ``value`` through single-use elementwise ops (a residual Add, the activation
    after it) while the result stays computable from ``in_name`` alone: errors that the
    activation then removes need not be fitted."""
    while True:
        node = single_consumer(value)
        if node is None or node.op_type not in _ELEMENTWISE or id(node) in layer_nodes:
            return value.name
        try:
            graph.region([in_name], [node.outputs[0].name])
        except KeyError:
            return value.name
        value = node.outputs[0]


def fit_region(model: ir.Model, x_in: torch.Tensor, in_name: str, layers: list[Layer],
               targets: dict[str, torch.Tensor], steps: int, *, seed: int = 0,
               batch: int = 32, lr: float = 3e-2) -> tuple[float, float]:
    """Fit the weights of ``layers`` jointly so the region's outputs match ``targets``.

    The region runs from the value ``in_name`` (fed with ``x_in``, the inputs the
    compressed network gives it) to the values named in ``targets`` (float outputs of
    the original network).  Every weight and bias of ``layers`` moves, so a pruned
    producer's kept channels can carry what the removed ones did and the consumers
    read it back; Adam on the normalised squared error, learning rate relative to each
    tensor's RMS, cosine decay.  Returns (error before, error after) on all of
    ``x_in``; the weights change only when the error went down.
    """
    from ..torchgraph import TorchGraph

    graph = TorchGraph(model).eval()
    for p in graph.parameters():
        p.requires_grad_(False)
    names = list(targets)
    order = graph.region([in_name], names)
    for layer in layers:
        if layer.bias is None and layer.op != "MatMul":
            layer.set_bias(np.zeros(layer.out_channels, np.float32))
    values = [v for l in layers for v in (l.weight, l.bias) if v is not None]
    start = {v.name: dev.tensor(np.array(v.const_value.numpy(), dtype=np.float32)) for v in values}
    params = {n: t.clone().requires_grad_(True) for n, t in start.items()}
    scale = {n: float(torch.sqrt((t ** 2).mean()).clamp_min(1e-8)) for n, t in start.items()}
    opt = torch.optim.Adam([{"params": [params[n]], "lr": lr * scale[n]} for n in params])
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, max(steps, 1))
    norm = {n: float((t.double() ** 2).mean().clamp_min(1e-12)) for n, t in targets.items()}

    def loss_of(idx, feeds) -> torch.Tensor:
        out = graph.run_region({in_name: x_in[idx], **feeds}, names, order)
        return sum(((out[n] - targets[n][idx]) ** 2).mean() / norm[n] for n in names)

    def full(feeds) -> float:
        with torch.no_grad():
            return sum(float(loss_of(torch.arange(s, min(s + CHUNK, len(x_in)), device=x_in.device), feeds)) *
                       min(CHUNK, len(x_in) - s) for s in range(0, len(x_in), CHUNK)) / len(x_in)

    before = full(start)
    gen = torch.Generator().manual_seed(seed)
    for _ in range(steps):
        idx = torch.randint(0, len(x_in), (min(batch, len(x_in)),), generator=gen, device="cpu").to(x_in.device)
        opt.zero_grad()
        loss_of(idx, params).backward()
        opt.step()
        sched.step()
    fitted = {n: p.detach() for n, p in params.items()}
    after = full(fitted)
    if after < before:
        for v in values:
            set_const(v, dev.numpy(fitted[v.name]).astype(v.const_value.numpy().dtype))
    return before, min(after, before)


def _collect_many(graph, x_all: torch.Tensor, names: list[str]) -> dict[str, torch.Tensor]:
    parts = [graph.run(x_all[s:s + CHUNK], capture=names) for s in range(0, len(x_all), CHUNK)]
    return {n: torch.cat([p[n] for p in parts]) for n in names}
