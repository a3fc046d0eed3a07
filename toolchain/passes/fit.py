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
from .qdq import ActQuant
from .quantize import WeightQuant

RIDGE = 1e-3        # λ relative to the mean diagonal of the Gram matrix
DAMP = 0.01         # GPTQ damping, relative to the mean diagonal
CHUNK = 64          # images per forward pass


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
    for i, layer in enumerate(todo):
        progress("fit layers", i, len(todo))
        eff = recipe.for_layer(layer.name)
        graph = TorchGraph(model).eval()
        in_name = layer.node.inputs[0].name
        ref_out = ref_layers[layer.name].node.outputs[0].name
        with torch.no_grad():
            X = _collect(graph, x_all, in_name, hooks)
            Y = _collect(ref_graph, x_all, ref_out, {})
        if kept and layer.name in kept:
            idx = torch.from_numpy(kept[layer.name])
            Y = Y[..., idx] if layer.op in ("Gemm", "MatMul") else Y[:, idx]
        if eff.abits is not None and in_name not in acts:
            lo, hi = mse_range(_sample(X), eff.abits)
            scale, zp, signed = act_qparams(lo, hi, eff.abits)
            acts[in_name] = ActQuant(eff.abits, scale, zp, signed)
            hooks[in_name] = _fake_quant_hook(scale, zp, eff.abits, signed)
        if in_name in hooks:
            X = hooks[in_name](X)
        fitted = fit_layer(layer, X, Y, eff.wbits, recipe)
        if fitted is not None:
            weights[layer.name] = fitted
    progress("fit layers", len(todo), len(todo))
    return weights, acts


def _collect(graph, x_all: torch.Tensor, name: str, hooks) -> torch.Tensor:
    parts = [graph.run(x_all[s:s + CHUNK], capture=[name], stop_after={name}, hooks=hooks)[name]
             for s in range(0, len(x_all), CHUNK)]
    return torch.cat(parts)


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


def _stats(feats: torch.Tensor, targets: torch.Tensor) -> _Stats:
    f = feats.double()
    t = targets.double()
    return _Stats(G=f.T @ f, C=f.T @ t, x_sum=f.sum(0), y_sum=t.sum(0), yy=float((t * t).sum()), n=f.shape[0])


# ------------------------------------------------------------------- fitting
def fit_layer(layer: Layer, X: torch.Tensor, Y: torch.Tensor, wbits: int | None, recipe: Recipe) -> WeightQuant | None:
    """Refit (and quantize) one layer in place; returns its quantization or None."""
    feats = _features(layer, X)
    w0 = layer.w_oc()
    shape = w0.shape
    if feats is None or feats.shape[1] != int(np.prod(shape[1:])):
        if wbits is None:
            return None
        from .quantize import quantize_layer
        return quantize_layer(layer, wbits, recipe.clip)
    st = _stats(feats, _targets(layer, Y))
    W0 = torch.from_numpy(w0.reshape(shape[0], -1).T.astype(np.float64))     # features x out
    W = ridge_refit(st, W0, layer.bias is not None or layer.op != "MatMul")
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
    lam = ridge * float(torch.diagonal(G).mean().clamp_min(1e-12))
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
