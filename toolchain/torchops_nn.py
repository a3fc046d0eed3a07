"""The neural-network ONNX operators as torch functions (convolutions, normalisations,
pooling, padding, resizing), for the table in :mod:`.torchops`."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from .errors import UserError

Tensor = torch.Tensor


def _ints(t: Tensor | None) -> list[int] | None:
    return None if t is None else [int(v) for v in t.reshape(-1).tolist()]


def _axis(a: int, rank: int) -> int:
    return a + rank if a < 0 else a


def _spatial_pads(attrs: dict, x: Tensor, kernel: list[int], strides: list[int], dilations: list[int]) -> list[int]:
    """ONNX pads [b1, b2, ..., e1, e2, ...] with auto_pad resolved."""
    n = len(kernel)
    auto = attrs.get("auto_pad", "NOTSET")
    if isinstance(auto, bytes):
        auto = auto.decode()
    if auto in ("SAME_UPPER", "SAME_LOWER"):
        begins, ends = [], []
        for i in range(n):
            size = x.shape[2 + i]
            out = -(-size // strides[i])
            total = max((out - 1) * strides[i] + (kernel[i] - 1) * dilations[i] + 1 - size, 0)
            small, big = total // 2, total - total // 2
            begins.append(small if auto == "SAME_UPPER" else big)
            ends.append(big if auto == "SAME_UPPER" else small)
        return begins + ends
    if auto == "VALID":
        return [0] * (2 * n)
    return list(attrs.get("pads") or [0] * (2 * n))


def _torch_pad_order(pads: list[int]) -> list[int]:
    """ONNX [b1..bn, e1..en] for the last n dims to F.pad's (last dim first) order."""
    n = len(pads) // 2
    out = []
    for i in reversed(range(n)):
        out += [pads[i], pads[i + n]]
    return out


def _sym(pads: list[int]) -> list[int] | None:
    n = len(pads) // 2
    return pads[:n] if pads[:n] == pads[n:] else None


def _conv(x, w, b=None, *, attrs):
    n = w.dim() - 2
    kernel = list(attrs.get("kernel_shape") or w.shape[2:])
    strides = list(attrs.get("strides") or [1] * n)
    dil = list(attrs.get("dilations") or [1] * n)
    pads = _spatial_pads(attrs, x, kernel, strides, dil)
    sym = _sym(pads)
    if sym is None:
        x, sym = F.pad(x, _torch_pad_order(pads)), [0] * n
    conv = (F.conv1d, F.conv2d, F.conv3d)[n - 1]
    return conv(x, w, b, strides, sym, dil, int(attrs.get("group", 1)))


def _conv_transpose(x, w, b=None, *, attrs):
    n = w.dim() - 2
    g = int(attrs.get("group", 1))
    kernel = list(attrs.get("kernel_shape") or w.shape[2:])
    strides = list(attrs.get("strides") or [1] * n)
    dil = list(attrs.get("dilations") or [1] * n)
    out_pad = list(attrs.get("output_padding") or [0] * n)
    full = [(x.shape[2 + i] - 1) * strides[i] + (kernel[i] - 1) * dil[i] + 1 for i in range(n)]
    auto = attrs.get("auto_pad", "NOTSET")
    out_shape = attrs.get("output_shape")
    if out_shape is not None or auto in ("SAME_UPPER", "SAME_LOWER"):
        if out_shape is None:
            out_shape = [x.shape[2 + i] * strides[i] for i in range(n)]
        out_shape = list(out_shape)[-n:]
        total = [full[i] + out_pad[i] - out_shape[i] for i in range(n)]
        if auto == "SAME_UPPER":
            pads = [t // 2 for t in total] + [t - t // 2 for t in total]
        else:
            pads = [t - t // 2 for t in total] + [t // 2 for t in total]
    elif auto == "VALID":
        pads = [0] * (2 * n)
    else:
        pads = list(attrs.get("pads") or [0] * (2 * n))
    convt = (F.conv_transpose1d, F.conv_transpose2d, F.conv_transpose3d)[n - 1]
    sym = _sym(pads)
    if sym is not None and all(out_pad[i] < max(strides[i], dil[i]) for i in range(n)):
        return convt(x, w, b, strides, sym, out_pad, g, dil)
    y = convt(x, w, None, strides, 0, 0, g, dil)
    # output_padding adds positions at the end (bias only), pads crop
    crop = [-p for p in pads[:n]] + [out_pad[i] - pads[n + i] for i in range(n)]
    y = F.pad(y, _torch_pad_order(crop))
    if b is not None:
        y = y + b.reshape(1, -1, *([1] * n))
    return y


def _gemm(a, b, c=None, *, attrs):
    if attrs.get("transA", 0):
        a = a.transpose(0, 1)
    if attrs.get("transB", 0):
        b = b.transpose(0, 1)
    y = a @ b
    alpha, beta = float(attrs.get("alpha", 1.0)), float(attrs.get("beta", 1.0))
    if alpha != 1.0:
        y = y * alpha
    if c is not None:
        y = y + (c * beta if beta != 1.0 else c)
    return y


def _batchnorm(x, scale, bias, mean, var, *, attrs):
    return F.batch_norm(x, mean, var, scale, bias, False, 0.0, float(attrs.get("epsilon", 1e-5)))


def _layernorm(x, scale, bias=None, *, attrs, n_out=1):
    """LayerNormalization (opset 17): normalised over the axes from ``axis`` on."""
    axis = _axis(int(attrs.get("axis", -1)), x.dim())
    y = F.layer_norm(x, x.shape[axis:], scale.expand(x.shape[axis:]),
                     None if bias is None else bias.expand(x.shape[axis:]), float(attrs.get("epsilon", 1e-5)))
    if n_out == 1:
        return y
    dims = tuple(range(axis, x.dim()))     # the mean and inverse std the op may also return
    mean = x.mean(dim=dims, keepdim=True)
    inv = torch.rsqrt(x.var(dim=dims, unbiased=False, keepdim=True) + float(attrs.get("epsilon", 1e-5)))
    return (y, mean, inv)[:n_out]


def _groupnorm(x, scale, bias, *, attrs):
    """GroupNormalization (opset 18: scale and bias per group; 21: per channel)."""
    groups = int(attrs["num_groups"])
    eps = float(attrs.get("epsilon", 1e-5))
    c = x.shape[1]
    if scale.numel() == groups and groups != c:
        scale, bias = scale.repeat_interleave(c // groups), bias.repeat_interleave(c // groups)
    return F.group_norm(x, groups, scale, bias, eps)


def _instancenorm(x, scale, bias, *, attrs):
    return F.instance_norm(x, weight=scale, bias=bias, eps=float(attrs.get("epsilon", 1e-5)))


def _pool_params(x, attrs):
    kernel = list(attrs["kernel_shape"])
    n = len(kernel)
    strides = list(attrs.get("strides") or [1] * n)
    dil = list(attrs.get("dilations") or [1] * n)
    pads = _spatial_pads(attrs, x, kernel, strides, dil)
    return n, kernel, strides, dil, pads, bool(attrs.get("ceil_mode", 0))


def _maxpool(x, *, attrs):
    n, kernel, strides, dil, pads, ceil = _pool_params(x, attrs)
    sym = _sym(pads)
    if sym is None or any(sym[i] > kernel[i] // 2 for i in range(n)):
        x, sym = F.pad(x, _torch_pad_order(pads), value=-math.inf), [0] * n
    pool = (F.max_pool1d, F.max_pool2d, F.max_pool3d)[n - 1]
    return pool(x, kernel, strides, sym, dil, ceil_mode=ceil)


def _avgpool(x, *, attrs):
    n, kernel, strides, dil, pads, ceil = _pool_params(x, attrs)
    if any(d != 1 for d in dil):
        raise UserError("cannot build a differentiable copy: AveragePool with dilations is not supported")
    include = bool(attrs.get("count_include_pad", 0))
    pool = (F.avg_pool1d, F.avg_pool2d, F.avg_pool3d)[n - 1]
    sym = _sym(pads)
    if sym is not None and all(sym[i] <= kernel[i] // 2 for i in range(n)) and not (ceil and any(sym)):
        return pool(x, kernel, strides, sym, ceil_mode=ceil, count_include_pad=include)
    # general case: sum of values over count of (real or, with count_include_pad, padded) cells
    order = _torch_pad_order(pads)
    ones = torch.ones((1, 1, *x.shape[2:]), dtype=x.dtype, device=x.device)
    xp = F.pad(x, order)
    mask = F.pad(ones, order, value=1.0 if include else 0.0)
    return pool(xp, kernel, strides, 0, ceil_mode=ceil) / pool(mask, kernel, strides, 0, ceil_mode=ceil)


def _pad(x, pads, value=None, axes=None, *, attrs):
    mode = attrs.get("mode", "constant")
    pads = _ints(pads)
    rank = x.dim()
    if axes is not None:
        ax = [_axis(a, rank) for a in _ints(axes)]
        full = [0] * (2 * rank)
        for i, a in enumerate(ax):
            full[a], full[rank + a] = pads[i], pads[len(ax) + i]
        pads = full
    begins, ends = pads[:rank], pads[rank:]
    first = next((i for i in range(rank) if begins[i] or ends[i]), rank)
    if first == rank:
        return x
    if mode == "constant":
        v = 0.0 if value is None or value.numel() == 0 else float(value.reshape(-1)[0])
        return F.pad(x, _torch_pad_order(begins[first:] + ends[first:]), value=v)
    first = 2 if rank >= 3 else rank - 1  # torch pads spatial axes only in these modes
    if any(begins[:first] + ends[:first]) or rank - first > 3:
        raise UserError(f"cannot build a differentiable copy: Pad mode {mode} on batch/channel axes is not supported")
    torch_mode = {"reflect": "reflect", "edge": "replicate", "wrap": "circular"}[mode]
    return F.pad(x, _torch_pad_order(begins[first:] + ends[first:]), mode=torch_mode)


def _resize_coords(mode: str, out_len: int, in_len: int, scale: float, device) -> Tensor:
    x = torch.arange(out_len, dtype=torch.float64, device=device)
    if mode == "asymmetric":
        return x / scale
    if mode == "align_corners":
        return x * ((in_len - 1) / (out_len - 1)) if out_len > 1 else torch.zeros_like(x)
    if mode == "pytorch_half_pixel":
        return (x + 0.5) / scale - 0.5 if out_len > 1 else torch.zeros_like(x)
    if mode == "half_pixel_symmetric":
        adj = out_len / (scale * in_len)
        offset = in_len / 2 * (1 - adj)
        return offset + (x + 0.5) / scale - 0.5
    if mode == "half_pixel":
        return (x + 0.5) / scale - 0.5
    raise UserError(f"cannot build a differentiable copy: Resize coordinate mode {mode} is not supported")


def _resize_impl(x, scales, sizes, *, mode, coord, nearest, axes=None):
    rank = x.dim()
    axes = list(range(rank)) if axes is None else [_axis(a, rank) for a in axes]
    for i, a in enumerate(axes):
        in_len = x.shape[a]
        if sizes is not None:
            out_len = int(sizes[i])
            scale = out_len / in_len
        else:
            scale = float(scales[i])
            out_len = int(math.floor(in_len * scale))
        if out_len == in_len and scale == 1.0:
            continue
        c = _resize_coords(coord, out_len, in_len, scale, x.device)
        if mode == "nearest":
            if nearest == "round_prefer_ceil":
                idx = torch.floor(c + 0.5)
            elif nearest == "floor":
                idx = torch.floor(c)
            elif nearest == "ceil":
                idx = torch.ceil(c)
            else:  # round_prefer_floor
                idx = torch.ceil(c - 0.5)
            idx = idx.clamp(0, in_len - 1).long()
            x = x.index_select(a, idx)
        elif mode == "linear":
            c = c.clamp(0, in_len - 1)
            lo = torch.floor(c).long()
            hi = torch.clamp(lo + 1, max=in_len - 1)
            shape = [1] * rank
            shape[a] = out_len
            w = (c - lo).to(x.dtype).reshape(shape)
            x = x.index_select(a, lo) * (1 - w) + x.index_select(a, hi) * w
        else:
            raise UserError(f"cannot build a differentiable copy: Resize mode {mode} is not supported")
    return x


def _resize(x, roi=None, scales=None, sizes=None, *, attrs):
    if attrs.get("antialias", 0):
        raise UserError("cannot build a differentiable copy: Resize with antialias is not supported")
    sc = None if scales is None or scales.numel() == 0 else scales.reshape(-1).tolist()
    sz = None if sizes is None or sizes.numel() == 0 else _ints(sizes)
    return _resize_impl(x, sc, sz, mode=attrs.get("mode", "nearest"),
                        coord=attrs.get("coordinate_transformation_mode", "half_pixel"),
                        nearest=attrs.get("nearest_mode", "round_prefer_floor"), axes=attrs.get("axes"))


def _upsample(x, scales=None, *, attrs):
    sc = scales.reshape(-1).tolist() if scales is not None else attrs["scales"]
    return _resize_impl(x, sc, None, mode=attrs.get("mode", "nearest"), coord="asymmetric", nearest="floor")


LSTM_ACTIVATIONS = ("Sigmoid", "Tanh", "Tanh")


def lstm_refusal(attrs: dict, inputs: list) -> str | None:
    """Why an LSTM node is beyond :func:`_lstm` (None: it is not): peepholes, a cell clip, a
    coupled input-forget gate, activations other than ONNX's defaults, batch-major layout."""
    acts = attrs.get("activations")
    if acts is not None and [a.decode() if isinstance(a, bytes) else a for a in acts] != \
            list(LSTM_ACTIVATIONS) * (len(acts) // 3 or 1):
        return f"activations {list(acts)}"
    if attrs.get("clip") is not None:
        return "a cell clip"
    if int(attrs.get("input_forget", 0)):
        return "a coupled input-forget gate"
    if len(inputs) > 7 and inputs[7] is not None:
        return "peepholes"
    if int(attrs.get("layout", 0)):
        return "batch-major layout (which onnxruntime does not run either)"
    return None


def _lstm(x, w, r, b=None, seq_lens=None, h0=None, c0=None, *, attrs, n_out=1):
    """LSTM as ONNX defines it (gates in the order i, o, f, c; forward, reverse or
    bidirectional), step by step in torch.  Sequence lengths shorter than the input are
    refused at run time."""
    seq, batch = x.shape[0], x.shape[1]
    if seq_lens is not None and bool((seq_lens != seq).any()):
        raise UserError("LSTM with sequence lengths shorter than its input is not supported here")
    hidden = int(attrs["hidden_size"])
    direction = attrs.get("direction", "forward")
    direction = direction.decode() if isinstance(direction, bytes) else direction
    ys, hs, cs = [], [], []
    for d in range(w.shape[0]):
        bias = (b[d, :4 * hidden] + b[d, 4 * hidden:]) if b is not None else 0.0
        xw = x @ w[d].T + bias                                   # seq x batch x 4·hidden
        h = h0[d] if h0 is not None else x.new_zeros(batch, hidden)
        c = c0[d] if c0 is not None else x.new_zeros(batch, hidden)
        reverse = direction == "reverse" or (direction == "bidirectional" and d == 1)
        out = [None] * seq
        for t in (range(seq - 1, -1, -1) if reverse else range(seq)):
            i, o, f, g = (xw[t] + h @ r[d].T).chunk(4, dim=-1)
            c = torch.sigmoid(f) * c + torch.sigmoid(i) * torch.tanh(g)
            h = torch.sigmoid(o) * torch.tanh(c)
            out[t] = h
        ys.append(torch.stack(out))
        hs.append(h)
        cs.append(c)
    return (torch.stack(ys, 1), torch.stack(hs), torch.stack(cs))[:n_out]   # y: seq x dirs x batch x hidden
