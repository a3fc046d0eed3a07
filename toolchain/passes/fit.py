"""Fit every compressed layer on synthetic images, in order (no real data).

For each layer, front to back, with ``X`` the layer's input in the network compressed
so far (activation fake-quant of earlier layers applied) and ``Y`` the same layer's
output in the float network:

1. activation range of ``X``: the grid that minimises the quantization MSE;
2. weights: ridge least squares ``min ||X̃ W + b − Y||² + λ||W − W₀||²``, where ``W₀``
   is the closed-form (UDFC-compensated) weight — exact when the kept channels span
   the pruned ones, never worse than ``W₀`` on the data it was fitted on, and it
   absorbs the error every earlier layer left behind;
3. rounding: GPTQ (Frantar et al. 2023) on the centred Gram matrix of ``X̃``, which
   quantizes one input column at a time and pushes its rounding error onto the
   columns not yet quantized;
4. bias: refitted as ``ȳ − x̄ᵀŴ`` so the output mean is right.

All statistics are accumulated as Gram matrices, so memory is O(features²) per
layer, whatever the number of images.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import onnx_ir as ir
import torch
import torch.nn.functional as F

from ..graph import Layer, analyse, attr
from ..progress import ProgressFn, silent
from ..quant import act_qparams, act_range_grid, weight_qmax, weight_scales
from ..recipe import Recipe
from ..stats import mse_range
from .qdq import ActQuant, activation_plan
from .quantize import WeightQuant

RIDGE = 1e-3        # λ relative to the mean diagonal of the Gram matrix (plus features / rows)
DAMP = 0.01         # GPTQ damping, relative to the mean diagonal
CHUNK = 64          # images per forward pass
MAX_ROWS = 131072   # feature rows per layer for the Gram statistics
REF_CACHE_BYTES = 2e9  # keep all float reference outputs in memory below this


@dataclass
class _Stats:
    G: torch.Tensor        # features x features (uncentred)
    C: torch.Tensor        # features x out  (Xᵀ Y)
    x_sum: torch.Tensor
    y_sum: torch.Tensor
    yy: float
    n: int


def fit_sequential(model: ir.Model, reference: ir.Model, layers: list[Layer], images: np.ndarray,
                   recipe: Recipe, *, progress: ProgressFn = silent, kept: dict[str, np.ndarray] | None = None):
    """``kept``: output channels kept by pruning, per layer name (the float targets are sliced to them)."""
    from ..torchgraph import TorchGraph

    torch.manual_seed(recipe.seed)
    ref_layers = {l.name: l for l in analyse(reference).layers}
    ref_graph = TorchGraph(reference).eval()
    weights: dict[str, WeightQuant] = {}
    acts: dict[str, ActQuant] = {}
    hooks: dict[str, callable] = {}
    x_all = torch.from_numpy(np.ascontiguousarray(images, dtype=np.float32))
    todo = [l for l in layers if not recipe.for_layer(l.name).skip and l.name in ref_layers]
    plan = activation_plan(layers, recipe)
    ref_outs = [ref_layers[l.name].node.outputs[0].name for l in todo]
    cached = {}
    if _bytes(reference, ref_outs, len(x_all)) < REF_CACHE_BYTES:
        with torch.no_grad():
            cached = _collect_many(ref_graph, x_all, ref_outs)
    for i, layer in enumerate(todo):
        progress("fit layers", i, len(todo))
        eff = recipe.for_layer(layer.name)
        graph = TorchGraph(model).eval()
        in_name = layer.node.inputs[0].name
        ref_out = ref_layers[layer.name].node.outputs[0].name
        with torch.no_grad():
            X = _collect(graph, x_all, in_name, hooks)
            Y = cached[ref_out] if ref_out in cached else _collect(ref_graph, x_all, ref_out, {})
        if kept and layer.name in kept:
            idx = torch.from_numpy(kept[layer.name])
            Y = Y[..., idx] if layer.op in ("Gemm", "MatMul") else Y[:, idx]
        if in_name in plan and in_name not in acts:
            _set_range(in_name, X, plan[in_name], acts, hooks)
        if in_name in hooks:
            X = hooks[in_name](X)
        fitted = fit_layer(layer, X, Y, eff.wbits, recipe)
        if fitted is not None:
            weights[layer.name] = fitted
        out_name = layer.output.name
        if out_name in plan and out_name not in acts:
            with torch.no_grad():
                out = _collect(TorchGraph(model).eval(), x_all, out_name, hooks)
            _set_range(out_name, out, plan[out_name], acts, hooks)
    progress("fit layers", len(todo), len(todo))
    return weights, acts


def _set_range(name: str, x: torch.Tensor, bits: int, acts: dict, hooks: dict) -> None:
    """MSE-optimal range of ``x`` at ``bits``; later layers see it fake-quantized."""
    lo, hi = mse_range(_sample(x), bits)
    scale, zp, signed = act_qparams(lo, hi, bits)
    acts[name] = ActQuant(bits, scale, zp, signed)
    hooks[name] = _fake_quant_hook(scale, zp, bits, signed)


def _collect(graph, x_all: torch.Tensor, name: str, hooks) -> torch.Tensor:
    parts = [graph.run(x_all[s:s + CHUNK], capture=[name], stop_after={name}, hooks=hooks)[name]
             for s in range(0, len(x_all), CHUNK)]
    return torch.cat(parts)


def _collect_many(graph, x_all: torch.Tensor, names: list[str]) -> dict[str, torch.Tensor]:
    parts = [graph.run(x_all[s:s + CHUNK], capture=names) for s in range(0, len(x_all), CHUNK)]
    return {n: torch.cat([p[n] for p in parts]) for n in names}


def _bytes(model: ir.Model, names: list[str], n: int) -> float:
    """Memory the named float values take for ``n`` images (inf when a shape is unknown)."""
    values = {v.name: v for node in model.graph for v in node.outputs}
    total = 0.0
    for name in names:
        shape = values[name].shape
        if shape is None or any(not isinstance(d, int) for d in list(shape)[1:]):
            return float("inf")
        total += 4.0 * n * float(np.prod(list(shape)[1:]))
    return total


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


def _rows_total(layer: Layer, X: torch.Tensor) -> int:
    f = _features(layer, X[:1])
    return max(1, len(f) * len(X)) if f is not None else 1


# ------------------------------------------------------------------- fitting
def fit_layer(layer: Layer, X: torch.Tensor, Y: torch.Tensor, wbits: int | None, recipe: Recipe,
              ridge: float = RIDGE) -> WeightQuant | None:
    """Refit (and quantize) one layer in place; returns its quantization or None."""
    w0 = layer.w_oc()
    shape = w0.shape
    probe = _features(layer, X[:1])
    st = None
    if probe is not None and probe.shape[1] == int(np.prod(shape[1:])):
        st = _stats(layer, X, Y)
    if st is None:
        if wbits is None:
            return None
        from .quantize import quantize_layer
        return quantize_layer(layer, wbits, recipe.clip)
    W0 = torch.from_numpy(w0.reshape(shape[0], -1).T.astype(np.float64))     # features x out
    W = ridge_refit(st, W0, layer.bias is not None or layer.op != "MatMul", ridge)
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
         block: int = 128, damp: float = DAMP) -> tuple[torch.Tensor, torch.Tensor]:
    """Quantize rows of ``W`` (out x features) minimising ||X(W − Ŵ)ᵀ||², H = XᵀX.

    Returns (dequantized weights, integer weights).  Columns are processed in order
    of decreasing H diagonal ("act order"), the standard GPTQ heuristic.
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
    H += damp * torch.diagonal(H).mean() * torch.eye(d, dtype=H.dtype)
    L = torch.linalg.cholesky(H)
    Hinv = torch.cholesky_inverse(L)
    U = torch.linalg.cholesky(Hinv, upper=True)
    qmax = weight_qmax(bits)
    s = scale.double()[:, None]
    Q = torch.zeros_like(W)
    for i1 in range(0, d, block):
        i2 = min(i1 + block, d)
        W1 = W[:, i1:i2].clone()
        E1 = torch.zeros_like(W1)
        U1 = U[i1:i2, i1:i2]
        for j in range(i2 - i1):
            w = W1[:, j:j + 1]
            q = torch.clamp(torch.round(w / s), -qmax, qmax)
            Q[:, i1 + j:i1 + j + 1] = q
            err = (w - q * s) / U1[j, j]
            W1[:, j:] -= err @ U1[j:j + 1, j:]
            E1[:, j:j + 1] = err
        W[:, i2:] -= E1 @ U[i1:i2, i2:]
    Q = Q[:, inv]
    return Q * s, Q


def consumer_statistics(model: ir.Model, groups, images: np.ndarray) -> dict[str, list]:
    """Per prune group, ``(H, W, block)`` of each consumer on the float model (for channel selection).

    ``H``: centred Gram of the consumer's input features; ``W``: its weights as
    (features x out), scaled by the BN after it so errors count in the space the
    next layer sees; ``block``: features per channel of the group.
    """
    from ..torchgraph import TorchGraph

    graph = TorchGraph(model).eval()
    x_all = torch.from_numpy(np.ascontiguousarray(images, dtype=np.float32))
    out: dict[str, list] = {}
    for g in groups:
        entries = []
        for c in g.consumers:
            name = c.layer.node.inputs[0].name
            with torch.no_grad():
                X = _collect(graph, x_all, name, {})
            probe = _features(c.layer, X[:1])
            w = c.layer.w_oc()
            if probe is None or probe.shape[1] != int(np.prod(w.shape[1:])):
                entries = []
                break
            st = _stats(c.layer, X, None)
            W = w.reshape(w.shape[0], -1).T.astype(np.float64)
            p = c.layer.bn_params()
            if p is not None:
                W = W * (np.abs(p["gamma"]) / np.sqrt(p["var"] + p["eps"]))[None, :]
            block = W.shape[0] // g.channels
            entries.append((centred_gram(st).numpy(), W, block))
        if entries:
            out[g.name] = entries
    return out
