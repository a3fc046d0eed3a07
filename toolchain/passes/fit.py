"""Fit every compressed layer on synthetic images, in order (no real data).

For each layer, front to back, with ``X`` the layer's input in the network compressed
so far (activation fake-quant of earlier layers applied) and ``Y`` the same layer's
output in the float network:

1. activation range of ``X``: the grid that minimises the quantization MSE;
2. weights: ridge least squares ``min ||X̃ W + b − Y||² + λ||W − W₀||²``, where ``W₀``
   is the closed-form (UDFC-compensated) weight — exact when the kept channels span
   the pruned ones, never worse than ``W₀`` on the data it was fitted on, and it
   absorbs the error every earlier layer left behind.  λ is a tenth of the mean
   feature energy: the refit moves the weights freely along the input directions
   the images fill strongly and barely along the weak ones, which is where synthetic
   images differ most from real ones (ResNet-20 W4A4 on real dev images, three seeds:
   79.5 % with λ at 0.001, 80.6–81.1 from 0.01 to 1; pruned models unchanged within
   a seed's spread);
3. rounding: GPTQ (Frantar et al. 2023) on the centred Gram matrix of ``X̃``, which
   quantizes one input column at a time and pushes its rounding error onto the
   columns not yet quantized;
4. bias: refitted as ``ȳ − x̄ᵀŴ`` so the output mean is right.

A pruned layer is first fitted together with its consumers (:func:`fit_region`):
Adam moves the weights of both so the block's output (followed through a residual
Add and its activation) matches the float network's, so the kept channels can carry
what the removed ones did — least squares on the consumer alone can only recombine
what is left.  The pruned layer's own target is then the output that fit gave it.

All statistics are accumulated as Gram matrices, so memory is O(features²) per
layer, whatever the number of images.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import onnx_ir as ir
import torch
import torch.nn.functional as F

from ..graph import Layer, analyse, attr, set_const, single_consumer
from ..progress import ProgressFn, silent
from ..quant import act_qparams, act_range_grid, weight_qmax, weight_scales
from ..recipe import Recipe
from ..stats import mse_range
from .qdq import ActQuant, activation_plan
from .quantize import WeightQuant

RIDGE = 0.1         # λ relative to the mean diagonal of the Gram matrix (plus features / rows)
DAMP = 0.01         # GPTQ damping, relative to the mean diagonal
CELL_MARGIN = 1e-3  # nested GPTQ: fraction of a step kept from a cell's edge
CHUNK = 64          # images per forward pass
MAX_ROWS = 131072   # feature rows per layer for the Gram statistics
STATS_IMAGES = 512  # at most this many images (evenly spaced) for channel selection
REF_CACHE_BYTES = 2e9  # keep all float reference outputs in memory below this
FIT_BYTES = 1.5e9   # at most this much for one layer's input over the whole fitting set
RANGE_IMAGES = 64    # images when only activation ranges are set (nothing refitted)
ROUND_BITS = 8       # weights of this many bits and more, in layers pruning left alone: rounded to nearest
FRONTIER_BYTES = 4e9  # at most this much of the compressed network's live values kept between layers


@dataclass
class _Stats:
    G: torch.Tensor        # features x features (uncentred)
    C: torch.Tensor        # features x out  (Xᵀ Y)
    x_sum: torch.Tensor
    y_sum: torch.Tensor
    yy: float
    n: int


def fit_sequential(model: ir.Model, reference: ir.Model, layers: list[Layer], images: np.ndarray,
                   recipe: Recipe, *, progress: ProgressFn = silent, kept: dict[str, np.ndarray] | None = None,
                   regions: dict[str, tuple[list[str], list[str]]] | None = None, joint_steps: int = 0,
                   notes: list[str] | None = None):
    """``kept``: output channels kept by pruning, per layer name (the float targets are sliced to them).

    ``regions``: per pruned producer, the names of the layers carried with it
    (depthwise) and of its consumers; with ``joint_steps`` > 0 each region is first
    fitted jointly (:func:`fit_region`) and its producer and carried layers then keep
    the outputs that fit gave them as their targets.

    ``notes``: where a layer that cannot be fitted (:class:`FitFailed`) says why; it is
    rounded to nearest instead.
    """
    from ..torchgraph import TorchGraph

    torch.manual_seed(recipe.seed)
    ref_layers = {l.name: l for l in analyse(reference).layers}
    ref_graph = TorchGraph(reference).eval()
    weights: dict[str, WeightQuant] = {}
    acts: dict[str, ActQuant] = {}
    hooks: dict[str, callable] = {}
    todo = [l for l in layers if not recipe.for_layer(l.name, l.kind).skip and l.name in ref_layers]
    plan = activation_plan(layers, recipe)
    refit = _to_refit(todo, recipe, kept, regions)
    if not refit and len(images) > RANGE_IMAGES:     # only ranges to set: a few images hold their values
        images = images[np.linspace(0, len(images) - 1, RANGE_IMAGES).round().astype(np.int64)]
    x_all = torch.from_numpy(np.ascontiguousarray(images, dtype=np.float32))
    ref_outs = [ref_layers[l.name].node.outputs[0].name for l in todo if l.name in refit]
    by_name = {l.name: l for l in layers}
    layer_nodes = {id(l.node) for l in layers}
    own_target: set[str] = set()
    ref = _Reference(ref_graph, ref_layers, ref_outs, x_all, kept, by_name)

    frontier = _Frontier(x_all)
    for i, layer in enumerate(todo):
        progress("fit layers", i, len(todo))
        eff = recipe.for_layer(layer.name, layer.kind)
        graph = TorchGraph(model).eval()
        in_name = layer.node.inputs[0].name
        X = frontier.value(graph, in_name, hooks)
        if in_name in plan and in_name not in acts:
            _set_range(in_name, X, plan[in_name], acts, hooks)
        if in_name in hooks and not frontier.hooked(in_name):
            X = hooks[in_name](X)
            frontier.replace(in_name, X)
        if joint_steps > 0 and regions and layer.name in regions:
            carried, consumers = regions[layer.name]
            members = [layer] + [by_name[n] for n in carried + consumers]
            targets = {}
            for n in consumers:
                if kept and n in kept:
                    targets[by_name[n].node.outputs[0].name] = ref.layer_output(n)
                    continue
                name = _region_end(by_name[n].node.outputs[0], graph, in_name, layer_nodes)
                targets[name] = ref.value(name)
            fit_region(model, X, in_name, members, targets, joint_steps, seed=recipe.seed)
            own_target.update([layer.name, *carried])
        try:
            if layer.name not in refit:
                fitted = _nearest(layer, eff.wbits, recipe)
            else:
                Y = (_collect_after(TorchGraph(model).eval(), in_name, X, layer.node.outputs[0].name, hooks, x_all)
                     if layer.name in own_target else ref.layer_output(layer.name))
                fitted = fit_layer(layer, X, Y, eff.wbits, recipe)
        except FitFailed as exc:
            fitted = _nearest(layer, eff.wbits, recipe)
            if notes is not None:
                notes.append(f"{layer.name}: not fitted, {exc}: rounded to nearest")
        if fitted is not None:
            weights[layer.name] = fitted
        out_name = layer.output.name
        if out_name in plan and out_name not in acts:
            out = _collect_after(TorchGraph(model).eval(), in_name, X, out_name, hooks, x_all)
            _set_range(out_name, out, plan[out_name], acts, hooks)
    progress("fit layers", len(todo), len(todo))
    return weights, acts


class _Reference:
    """The float network's values on all images: the refitted layers' outputs computed in
    one pass when they fit in ``REF_CACHE_BYTES``, anything else step by step."""

    def __init__(self, graph, layers: dict[str, Layer], names: list[str], x_all: torch.Tensor, kept, by_name):
        self.graph, self.layers, self.kept, self.by_name = graph, layers, kept, by_name
        self.cached = {}
        if names and _bytes(graph, names, x_all) < REF_CACHE_BYTES:
            with torch.no_grad():
                self.cached = _collect_many(graph, x_all, names)
        self.frontier = _Frontier(x_all)

    def value(self, name: str) -> torch.Tensor:
        """Value ``name`` on all images."""
        return self.cached[name] if name in self.cached else self.frontier.value(self.graph, name, {})

    def layer_output(self, name: str) -> torch.Tensor:
        """Layer ``name``'s output, sliced to the channels pruning kept."""
        Y = self.value(self.layers[name].node.outputs[0].name)
        if self.kept and name in self.kept:
            idx = torch.from_numpy(self.kept[name])
            Y = Y[..., idx] if self.by_name[name].op in ("Gemm", "MatMul") else Y[:, idx]
        return Y


def _to_refit(todo: list[Layer], recipe: Recipe, kept, regions) -> set[str]:
    """The layers whose weights are refitted: those pruning changed (their inputs or outputs
    lost channels) and those quantized below ``ROUND_BITS``.  The others are rounded to
    nearest (or stay float): refitted on synthetic images, 8-bit weights moved further from
    what real photos need than rounding does (measured on real photos through detectors
    and classifiers: ``benchmarks/real_models.py``)."""
    changed = set(kept or {}) | {n for carried, consumers in (regions or {}).values() for n in carried + consumers}
    out = set()
    for layer in todo:
        bits = recipe.for_layer(layer.name, layer.kind).wbits
        if layer.name in changed or (bits is not None and bits < ROUND_BITS):
            out.add(layer.name)
    return out


def fitting_budget(model: ir.Model, layers: list[Layer], images: np.ndarray,
                   budget: float = FIT_BYTES) -> np.ndarray:
    """``images``, or an evenly spaced subset of them small enough that the largest layer
    input over the whole set stays within ``budget`` bytes (fitting holds one at a time)."""
    from ..torchgraph import TorchGraph

    names = sorted({l.node.inputs[0].name for l in layers} | {l.output.name for l in layers})
    with torch.no_grad():
        got = TorchGraph(model).eval().run(torch.from_numpy(np.ascontiguousarray(images[:1])), capture=names)
    per_image = max((4.0 * v.numel() for v in got.values() if v.is_floating_point()), default=0.0)
    keep = int(budget // per_image) if per_image else len(images)
    if keep >= len(images):
        return images
    idx = np.linspace(0, len(images) - 1, max(keep, 1)).round().astype(np.int64)
    return np.ascontiguousarray(images[idx])


def _set_range(name: str, x: torch.Tensor, bits: int, acts: dict, hooks: dict) -> None:
    """MSE-optimal range of ``x`` at ``bits``; later layers see it fake-quantized."""
    lo, hi = mse_range(_sample(x), bits)
    scale, zp, signed = act_qparams(lo, hi, bits)
    acts[name] = ActQuant(bits, scale, zp, signed)
    hooks[name] = _fake_quant_hook(scale, zp, bits, signed)


class _Frontier:
    """The compressed network's values on all images, computed once each, in graph order.

    Layers are fitted front to back, and a layer's input depends only on layers before
    it, already fitted: so the values are computed step by step as far as the next
    layer's input needs, and kept (in image chunks) while a later step reads them.  Each
    layer costs its own steps once, not a pass from the network input (quadratic in the
    depth, and most of a detector's fitting time).  Above ``FRONTIER_BYTES`` of
    live values it gives up and each value is computed from the input again.
    """

    def __init__(self, x_all: torch.Tensor):
        self.x_all = x_all
        self.env: dict[str, list[torch.Tensor]] = {}
        self.pos = 0
        self.done: set[str] = set()       # values already fake-quantized where they were made
        self.passed: set[str] = set()     # values made (kept while a later step reads them)
        self.live = True

    def hooked(self, name: str) -> bool:
        return name in self.done

    def replace(self, name: str, value: torch.Tensor) -> None:
        if self.live and name in self.env:
            self.env[name] = list(value.split(CHUNK))
            self.done.add(name)

    def value(self, graph, name: str, hooks) -> torch.Tensor:
        with torch.no_grad():
            if self.live:
                try:
                    return self._advance(graph, name, hooks)
                except _TooLarge:
                    self.live, self.env = False, {}
            return _collect(graph, self.x_all, name, hooks)

    def _advance(self, graph, name: str, hooks) -> torch.Tensor:
        env, steps = self.env, graph._steps
        if self.pos == 0 and not env:
            first = graph.input_names[0]
            env[first] = list(self.x_all.split(CHUNK))
            if first in hooks:
                env[first] = [hooks[first](c) for c in env[first]]
                self.done.add(first)
        n_chunks = -(-len(self.x_all) // CHUNK)
        while name not in env:
            if self.pos >= len(steps) or name in self.passed:
                return _collect(graph, self.x_all, name, hooks)    # made and dropped already
            i, step = self.pos, steps[self.pos]
            outs = [[] for _ in step.outputs]
            for k in range(n_chunks):
                args = [graph._value(n, {n: env[n][k]} if n in env else {}) for n in step.inputs]
                out = step.fn(*args, attrs=step.attrs)
                for j, v in enumerate(out if isinstance(out, tuple) else (out,)):
                    outs[j].append(v)
            self.passed.update(step.outputs)
            for out_name, chunks in zip(step.outputs, outs):
                if not out_name or (graph._last_use.get(out_name, -1) <= i and out_name != name):
                    continue                      # read by no later step
                hook = hooks.get(out_name)
                if hook is not None:
                    chunks = [hook(c) for c in chunks]
                    self.done.add(out_name)
                env[out_name] = chunks
            for n in step.inputs:
                if n is not None and graph._last_use.get(n) == i and n != name:
                    env.pop(n, None)
            self.pos += 1
            if sum(c.numel() * c.element_size() for v in env.values() for c in v) > FRONTIER_BYTES:
                raise _TooLarge
        return torch.cat(env[name])


class _TooLarge(Exception):
    pass


def _collect(graph, x_all: torch.Tensor, name: str, hooks) -> torch.Tensor:
    parts = [graph.run(x_all[s:s + CHUNK], capture=[name], stop_after={name}, hooks=hooks)[name]
             for s in range(0, len(x_all), CHUNK)]
    return torch.cat(parts)


def _collect_after(graph, in_name: str, X: torch.Tensor, name: str, hooks, x_all: torch.Tensor) -> torch.Tensor:
    """Value ``name`` computed from ``X`` (all images' value ``in_name``) when it depends on
    nothing else (a layer's output from its input), else from the network input."""
    with torch.no_grad():
        try:
            steps = graph.region([in_name], [name])
        except KeyError:
            return _collect(graph, x_all, name, hooks)
        return torch.cat([graph.run_region({in_name: X[s:s + CHUNK]}, [name], steps, hooks)[name]
                          for s in range(0, len(X), CHUNK)])


def _collect_many(graph, x_all: torch.Tensor, names: list[str]) -> dict[str, torch.Tensor]:
    parts = [graph.run(x_all[s:s + CHUNK], capture=names) for s in range(0, len(x_all), CHUNK)]
    return {n: torch.cat([p[n] for p in parts]) for n in names}


def _bytes(graph, names: list[str], x_all: torch.Tensor) -> float:
    """Memory the named values take on all of ``x_all`` (measured on its first image)."""
    with torch.no_grad():
        got = graph.run(x_all[:1], capture=names)
    return len(x_all) * float(sum(got[n].numel() * got[n].element_size() for n in names))


def _sample(x: torch.Tensor, n: int = 200_000) -> np.ndarray:
    flat = x.reshape(-1)
    if flat.numel() > n:
        idx = torch.randint(0, flat.numel(), (n,))
        flat = flat[idx]
    return flat.double().numpy()


def _fake_quant_hook(scale: float, zp: int, bits: int, signed: bool):
    qmin, qmax = act_range_grid(bits, signed)

    def hook(x: torch.Tensor) -> torch.Tensor:
        return (torch.clamp(torch.round(x / scale) + zp, qmin, qmax) - zp) * scale
    return hook


# ------------------------------------------------------------------ features
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
            idx = torch.randperm(len(f), generator=gen)[:keep]
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


# ------------------------------------------------------------------- fitting
def fit_layer(layer: Layer, X: torch.Tensor, Y: torch.Tensor, wbits: int | None, recipe: Recipe,
              ridge: float = RIDGE) -> WeightQuant | None:
    """Refit (and quantize) one layer in place; returns its quantization or None."""
    w0 = layer.w_oc()
    shape = w0.shape
    st = _stats(layer, X, Y) if _plain_columns(layer, X) else None
    if st is None:
        return _nearest(layer, wbits, recipe)
    if not all(torch.isfinite(t).all() for t in (st.G, st.C, st.x_sum, st.y_sum)):
        raise FitFailed("its input or output statistics are not finite")
    W0 = torch.from_numpy(w0.reshape(shape[0], -1).T.astype(np.float64))     # features x out
    W = ridge_refit(st, W0, layer.bias is not None or layer.op != "MatMul", ridge)
    if not torch.isfinite(W).all():
        raise FitFailed("its least-squares refit is not finite")
    q = scale = None
    if wbits is not None:
        H = centred_gram(st)
        scale = weight_scales(W.T.numpy(), wbits, recipe.clip)
        Wq, q = gptq(W.T.clone(), H, wbits, torch.from_numpy(scale.astype(np.float64)))
        W = Wq.T
    layer.set_w_oc(W.T.numpy().reshape(shape).astype(np.float32))
    if layer.op != "MatMul":
        b = (st.y_sum - st.x_sum @ W) / st.n
        layer.set_bias(b.numpy().astype(np.float32))
    if wbits is None:
        return None
    return WeightQuant(bits=wbits, q=q.numpy().astype(np.int8).reshape(shape), scale=scale.astype(np.float32))


def _nearest(layer: Layer, wbits: int | None, recipe: Recipe) -> WeightQuant | None:
    """The layer's weights rounded to nearest, unfitted (None when they stay float)."""
    if wbits is None:
        return None
    from .quantize import quantize_layer

    return quantize_layer(layer, wbits, recipe.clip)


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
    A = G + lam * torch.eye(G.shape[0], dtype=G.dtype)
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
    eye = torch.eye(d, dtype=H.dtype)
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
    err_fitted = torch.zeros(W.shape[0], dtype=torch.float64)
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


def consumer_statistics(model: ir.Model, groups, images: np.ndarray, layers: list[Layer]) -> dict[str, GroupStats]:
    """:class:`GroupStats` per prune group whose consumers are all plain Conv/Gemm layers
    (``layers``: every layer of ``model``; a block output is followed up to the next one)."""
    from ..torchgraph import TorchGraph

    graph = TorchGraph(model).eval()
    step = max(1, -(-len(images) // STATS_IMAGES))
    x_all = torch.from_numpy(np.ascontiguousarray(images[::step], dtype=np.float32))
    out: dict[str, GroupStats] = {}
    layer_nodes = {id(l.node) for l in layers}
    for g in groups:
        entries = []
        end_energy = 0.0
        for c in g.consumers:
            name = c.layer.node.inputs[0].name
            end = _region_end(c.layer.node.outputs[0], graph, g.producer.node.inputs[0].name, layer_nodes)
            with torch.no_grad():
                got = _collect_many(graph, x_all, [name, end])
            X, V = got[name], got[end]
            w = c.layer.w_oc()
            if not _plain_columns(c.layer, X):
                entries = []
                break
            st = _stats(c.layer, X, None)
            W = w.reshape(w.shape[0], -1).T.astype(np.float64)
            p = c.layer.bn_params()
            if p is not None:
                W = W * (np.abs(p["gamma"]) / np.sqrt(p["var"] + p["eps"]))[None, :]
            block = W.shape[0] // g.channels
            entries.append((centred_gram(st).numpy(), W, block))
            V = _targets(c.layer, V).double()                     # rows x channels
            end_energy += float(((V - V.mean(0)) ** 2).sum(1).mean()) * st.n
        if entries:
            out[g.name] = GroupStats(entries, end_energy)
    return out


# ------------------------------------------------------------- joint regions
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
    start = {v.name: torch.from_numpy(np.array(v.const_value.numpy(), dtype=np.float32)) for v in values}
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
            return sum(float(loss_of(torch.arange(s, min(s + CHUNK, len(x_in))), feeds)) *
                       min(CHUNK, len(x_in) - s) for s in range(0, len(x_in), CHUNK)) / len(x_in)

    before = full(start)
    gen = torch.Generator().manual_seed(seed)
    for _ in range(steps):
        idx = torch.randint(0, len(x_in), (min(batch, len(x_in)),), generator=gen)
        opt.zero_grad()
        loss_of(idx, params).backward()
        opt.step()
        sched.step()
    fitted = {n: p.detach() for n, p in params.items()}
    after = full(fitted)
    if after < before:
        for v in values:
            set_const(v, fitted[v.name].numpy().astype(v.const_value.numpy().dtype))
    return before, min(after, before)
