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
   images differ most from real ones (measured: docs/results.md, "Ridge strength");
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

import numpy as np
import onnx_ir as ir
import torch

from .. import device as dev
from ..graph import Layer, analyse
from ..progress import ProgressFn, silent
from ..quant import act_qparams, act_range_grid, kernel_bits, weight_scales
from .quantize import kernel_grid
from ..recipe import Recipe
from ..stats import mse_range
from .qdq import ActQuant, activation_plan, kernel_points
from .quantize import WeightQuant
from .regions import (STATS_IMAGES, GroupStats, _collect_many, _region_end,  # noqa: F401  (fit.* names)
                      consumer_statistics, fit_region)
from .solvers import (CHUNK, RIDGE, FitFailed, _plain_columns, _stats, centred_gram, gptq,  # noqa: F401
                      input_gram, nested_gptq, ridge_refit)

REF_CACHE_BYTES = 2e9  # keep all float reference outputs in memory below this
FIT_BYTES = 1.5e9   # at most this much for one layer's input over the whole fitting set
RANGE_IMAGES = 64    # images when only activation ranges are set (nothing refitted)
ROUND_BITS = 8       # weights of this many bits and more, in layers pruning left alone: rounded to nearest
FRONTIER_BYTES = 4e9  # at most this much of the compressed network's live values kept between layers


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
    x_all = dev.tensor(np.ascontiguousarray(images, dtype=np.float32))
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
        wbits, grid = kernel_grid(eff, recipe, layer.kind)
        try:
            if layer.name not in refit:
                fitted = _nearest(layer, wbits, grid)
            else:
                Y = (_collect_after(TorchGraph(model).eval(), in_name, X, layer.node.outputs[0].name, hooks, x_all)
                     if layer.name in own_target else ref.layer_output(layer.name))
                fitted = fit_layer(layer, X, Y, wbits, grid)
        except FitFailed as exc:
            fitted = _nearest(layer, wbits, grid)
            if notes is not None:
                notes.append(f"{layer.name}: not fitted, {exc}: rounded to nearest")
        if fitted is not None:
            weights[layer.name] = fitted
        _output_ranges(model, layer, X, plan, acts, hooks, x_all, recipe.integer_kernels)
    progress("fit layers", len(todo), len(todo))
    return weights, acts


def _output_ranges(model: ir.Model, layer: Layer, X: torch.Tensor, plan: dict, acts: dict[str, ActQuant],
                   hooks: dict, x_all: torch.Tensor, integer_kernels: bool) -> None:
    """The ranges ``plan`` wants after ``layer`` (its output; with ``integer_kernels``
    the points where onnxruntime's kernels requantize), measured on the model as fitted
    so far from the layer's input ``X``."""
    from ..torchgraph import TorchGraph

    in_name = layer.node.inputs[0].name
    points = [v.name for v in kernel_points(layer)] if integer_kernels else []
    wanted = [n for n in points + [layer.output.name] if n in plan and n not in acts]
    collected: dict[str, torch.Tensor] = {}
    graph = TorchGraph(model).eval() if wanted else None
    for out_name in wanted:
        collected[out_name] = _collect_after(graph, in_name, X, out_name, hooks, x_all)
        after = None
        if out_name in points:
            after = _after_activation(graph, out_name, points, layer.output.name, collected) or \
                ((lambda v: v), [])
        _set_range(out_name, collected[out_name], plan[out_name], acts, hooks, after)


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
            idx = torch.as_tensor(self.kept[name], device=Y.device)
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
        eff = recipe.for_layer(layer.name, layer.kind)
        bits = kernel_bits(eff.wbits, eff.abits, recipe.reduce_range, layer.kind)
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
        got = TorchGraph(model).eval().run(dev.tensor(np.ascontiguousarray(images[:1])), capture=names)
    per_image = max((4.0 * v.numel() for v in got.values() if v.is_floating_point()), default=0.0)
    keep = int(budget // per_image) if per_image else len(images)
    if keep >= len(images):
        return images
    idx = np.linspace(0, len(images) - 1, max(keep, 1)).round().astype(np.int64)
    return np.ascontiguousarray(images[idx])


def _set_range(name: str, x: torch.Tensor, bits: int, acts: dict, hooks: dict, after=None) -> None:
    """The range of ``x`` at ``bits``: MSE-optimal, and later layers see it fake-quantized;
    with ``after`` (a kernel point: ``qdq.kernel_points``) chosen by :func:`_range_after`,
    and later layers are fitted as if it stayed float.  Fitting them through these extra
    8-bit roundings fitted the synthetic images better and real photos worse (W4A8
    detector: 3 dB of output SQNR on photos lost, over two seeds; the points themselves
    cost 0.2 dB): the layers make up for the rounding's pattern on the synthetic images,
    which photos do not share."""
    lo, hi = mse_range(_sample(x), bits) if after is None else _range_after(x, bits, *after)
    scale, zp, signed = act_qparams(lo, hi, bits)
    acts[name] = ActQuant(bits, scale, zp, signed)
    if after is None:
        hooks[name] = _fake_quant_hook(scale, zp, bits, signed)


def _after_activation(graph, name: str, points: list[str], out_name: str, collected: dict):
    """For a kernel point ``name`` (qdq.kernel_points) before the layer's activation: the
    function from its values to the layer's output (the activation; for a gate, the
    product with the values it gates), and those other values, for :func:`_range_after`."""
    others = [p for p in points if p != name and p in collected]
    try:
        steps = graph.region([name, *others], [out_name])
    except KeyError:
        return None

    def fn(x: torch.Tensor, *rest: torch.Tensor) -> torch.Tensor:
        return graph.run_region({name: x, **dict(zip(others, rest))}, [out_name], steps, {})[out_name]
    return fn, [collected[p] for p in others]


def _range_after(x: torch.Tensor, bits: int, fn, others: list[torch.Tensor], n: int = 50_000,
                 grid: int = 40) -> tuple[float, float]:
    """The [lo, hi] of ``x`` whose grid minimises the error after ``fn`` (the activation
    the values go through next): a SiLU input may clip far below zero, where SiLU is flat,
    to resolve the positive side finely; a gate's top is kept where it multiplies large
    values.  Both ends shrunk together (as :func:`stats.mse_range`), then each alone."""
    with torch.no_grad():
        flat = x.reshape(-1).double()
        idx = torch.randint(0, flat.numel(), (min(n, flat.numel()),), generator=torch.Generator().manual_seed(0),
                            device="cpu").to(flat.device)
        xs = flat[idx]
        rest = [o.reshape(-1).double()[idx] for o in others]
        ref = fn(xs, *rest)
        lo0, hi0 = min(float(xs.min()), 0.0), max(float(xs.max()), 0.0)
        if hi0 - lo0 <= 0:
            return 0.0, 1.0

        def err(lo: float, hi: float) -> float:
            scale, zp, signed = act_qparams(lo, hi, bits)
            q = _fake_quant_hook(scale, zp, bits, signed)(xs)
            return float(torch.mean((fn(q, *rest) - ref) ** 2))

        fracs = np.linspace(0.05, 1.0, grid)
        best = min(((lo0 * f, hi0 * f) for f in fracs), key=lambda r: err(*r))
        best = min([best] + [(best[0], hi0 * f) for f in fracs], key=lambda r: err(*r))
        best = min([best] + [(lo0 * f, best[1]) for f in fracs], key=lambda r: err(*r))
    return best


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


def _bytes(graph, names: list[str], x_all: torch.Tensor) -> float:
    """Memory the named values take on all of ``x_all`` (measured on its first image)."""
    with torch.no_grad():
        got = graph.run(x_all[:1], capture=names)
    return len(x_all) * float(sum(got[n].numel() * got[n].element_size() for n in names))


def _sample(x: torch.Tensor, n: int = 200_000) -> np.ndarray:
    flat = x.reshape(-1)
    if flat.numel() > n:
        idx = torch.randint(0, flat.numel(), (n,), device="cpu")      # the same draws on any device
        flat = flat[idx.to(flat.device)]
    return dev.numpy(flat.double())


def _fake_quant_hook(scale: float, zp: int, bits: int, signed: bool):
    qmin, qmax = act_range_grid(bits, signed)

    def hook(x: torch.Tensor) -> torch.Tensor:
        return (torch.clamp(torch.round(x / scale) + zp, qmin, qmax) - zp) * scale
    return hook


# ------------------------------------------------------------------ features


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
    W0 = dev.tensor(w0.reshape(shape[0], -1).T.astype(np.float64))     # features x out
    W = ridge_refit(st, W0, layer.bias is not None or layer.op != "MatMul", ridge)
    if not torch.isfinite(W).all():
        raise FitFailed("its least-squares refit is not finite")
    q = scale = None
    if wbits is not None:
        H = centred_gram(st)
        scale = weight_scales(dev.numpy(W.T), wbits, recipe.clip)
        Wq, q = gptq(W.T.clone(), H, wbits, dev.tensor(scale.astype(np.float64)))
        W = Wq.T
    layer.set_w_oc(dev.numpy(W.T).reshape(shape).astype(np.float32))
    if layer.op != "MatMul":
        b = (st.y_sum - st.x_sum @ W) / st.n
        layer.set_bias(dev.numpy(b).astype(np.float32))
    if wbits is None:
        return None
    return WeightQuant(bits=wbits, q=dev.numpy(q).astype(np.int8).reshape(shape), scale=scale.astype(np.float32))


def _nearest(layer: Layer, wbits: int | None, recipe: Recipe) -> WeightQuant | None:
    """The layer's weights rounded to nearest, unfitted (None when they stay float)."""
    if wbits is None:
        return None
    from .quantize import quantize_layer

    return quantize_layer(layer, wbits, recipe.clip)


# ------------------------------------------------------------- joint regions


