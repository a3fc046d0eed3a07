"""A differentiable torch copy of a normalised ONNX graph.

``TorchGraph(model)`` interprets the graph node by node, in the topological order
``ingest.load`` leaves it in, with torch functional ops.  Initializers become
buffers read fresh from the ``ir.Model`` when the module is built (float types as
float32, integer types kept), so a module built after a pass changed weights sees
the change.  Every floating-point value is float32 inside the module.

Why our own interpreter rather than onnx2torch: it has to run the graphs ingest
produces (dynamo exports with Pad-19, opset 21 Q/DQ with int4) and expose every
intermediate value by its ONNX name, with hooks, so a generator can read BN inputs
and a calibrator can inject activation fake-quant at any value.

QuantizeLinear rounds with a straight-through estimator (the gradient passes the
rounding unchanged, and is cut outside the integer range), so gradients also flow
through compressed Q/DQ models.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass

import numpy as np
import onnx_ir as ir
import torch
import torch.nn.functional as F

from .errors import UserError

Hook = Callable[[torch.Tensor], torch.Tensor]
Tensor = torch.Tensor

_INT_RANGES = {
    ir.DataType.INT8: (-128, 127), ir.DataType.UINT8: (0, 255),
    ir.DataType.INT4: (-8, 7), ir.DataType.UINT4: (0, 15),
    ir.DataType.INT16: (-32768, 32767), ir.DataType.UINT16: (0, 65535),
    ir.DataType.INT32: (-2 ** 31, 2 ** 31 - 1),
}
_FLOATS = {ir.DataType.FLOAT, ir.DataType.FLOAT16, ir.DataType.BFLOAT16, ir.DataType.DOUBLE}


def _torch_dtype(dt: ir.DataType) -> torch.dtype:
    if dt in _FLOATS:
        return torch.float32
    return {
        ir.DataType.INT64: torch.int64, ir.DataType.INT32: torch.int32, ir.DataType.INT16: torch.int16,
        ir.DataType.INT8: torch.int8, ir.DataType.UINT8: torch.uint8, ir.DataType.BOOL: torch.bool,
        ir.DataType.INT4: torch.int8, ir.DataType.UINT4: torch.uint8, ir.DataType.UINT16: torch.int32,
        ir.DataType.UINT32: torch.int64, ir.DataType.UINT64: torch.int64,
    }.get(dt, torch.float32)


def _to_torch(array: np.ndarray, dt: ir.DataType | None = None) -> Tensor:
    if dt is None:
        dt = ir.DataType.from_numpy(array.dtype)
    target = _torch_dtype(dt)
    if dt in _FLOATS:
        array = np.asarray(array, dtype=np.float32)
    elif dt in (ir.DataType.INT4, ir.DataType.UINT4, ir.DataType.UINT16, ir.DataType.UINT32, ir.DataType.UINT64):
        array = np.asarray(array).astype(np.int64)
    return torch.from_numpy(np.array(array, copy=True)).to(target)


def _ints(t: Tensor | None) -> list[int] | None:
    return None if t is None else [int(v) for v in t.reshape(-1).tolist()]


@dataclass
class _Step:
    op: str
    name: str
    fn: Callable
    inputs: list[str | None]
    outputs: list[str]
    attrs: dict


# ------------------------------------------------------------------------- helpers
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


def _axis(a: int, rank: int) -> int:
    return a + rank if a < 0 else a


# ------------------------------------------------------------------------- ops
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


def _clip(x, lo=None, hi=None, *, attrs):
    lo = attrs.get("min") if lo is None else lo
    hi = attrs.get("max") if hi is None else hi
    if lo is not None and hi is not None:
        return torch.clamp(x, lo, hi)
    if lo is not None:
        return torch.clamp(x, min=lo)
    if hi is not None:
        return torch.clamp(x, max=hi)
    return x


def _prelu(x, slope, *, attrs):
    return torch.where(x < 0, x * slope, x)


def _gelu(x, *, attrs):
    approx = attrs.get("approximate", "none")
    return F.gelu(x, approximate="tanh" if approx == "tanh" else "none")


def _div(a, b, *, attrs):
    if not a.is_floating_point() and not b.is_floating_point():
        return torch.div(a, b, rounding_mode="trunc")
    return a / b


def _variadic(op):
    def fn(*xs, attrs):
        y = xs[0]
        for x in xs[1:]:
            y = op(y, x)
        return y
    return fn


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


def _reduce_axes(x, axes_in, attrs):
    axes = _ints(axes_in) if axes_in is not None else attrs.get("axes")
    if axes is None or len(axes) == 0:
        if attrs.get("noop_with_empty_axes", 0):
            return None
        return list(range(x.dim()))
    return [_axis(a, x.dim()) for a in axes]


def _reducer(kind):
    def fn(x, axes_in=None, *, attrs):
        axes = _reduce_axes(x, axes_in, attrs)
        if axes is None:
            return x
        keep = bool(attrs.get("keepdims", 1))
        if kind == "mean":
            return x.mean(dim=axes, keepdim=keep)
        if kind == "sum":
            return x.sum(dim=axes, keepdim=keep)
        if kind == "max":
            return x.amax(dim=axes, keepdim=keep)
        if kind == "min":
            return x.amin(dim=axes, keepdim=keep)
        if kind == "prod":
            for a in sorted(axes, reverse=True):
                x = x.prod(dim=a, keepdim=keep)
            return x
        if kind == "l2":
            return torch.sqrt((x * x).sum(dim=axes, keepdim=keep))
        raise AssertionError(kind)
    return fn


def _flatten(x, *, attrs):
    axis = _axis(int(attrs.get("axis", 1)), x.dim())
    return x.reshape(int(np.prod(x.shape[:axis])), -1)


def _reshape(x, shape, *, attrs):
    shape = _ints(shape)
    if not attrs.get("allowzero", 0):
        shape = [x.shape[i] if s == 0 else s for i, s in enumerate(shape)]
    return x.reshape(shape)


def _transpose(x, *, attrs):
    perm = attrs.get("perm")
    return x.permute(*(perm if perm is not None else reversed(range(x.dim()))))


def _squeeze(x, axes=None, *, attrs):
    axes = _ints(axes) if axes is not None else attrs.get("axes")
    if axes is None:
        return x.squeeze()
    axes = sorted((_axis(a, x.dim()) for a in axes), reverse=True)
    for a in axes:
        x = x.squeeze(a)
    return x


def _unsqueeze(x, axes=None, *, attrs):
    axes = _ints(axes) if axes is not None else attrs.get("axes")
    rank = x.dim() + len(axes)
    for a in sorted(_axis(a, rank) for a in axes):
        x = x.unsqueeze(a)
    return x


def _concat(*xs, attrs):
    return torch.cat([x for x in xs if x is not None], dim=int(attrs["axis"]))


def _split(x, split=None, *, attrs, n_out):
    axis = _axis(int(attrs.get("axis", 0)), x.dim())
    sizes = _ints(split) if split is not None else attrs.get("split")
    if sizes is None:
        parts = int(attrs.get("num_outputs", n_out))
        dim = x.shape[axis]
        chunk = -(-dim // parts)
        sizes = [min(chunk, dim - i * chunk) for i in range(parts)]
    return tuple(torch.split(x, list(sizes), dim=axis))


def _slice(x, starts, ends, axes=None, steps=None, *, attrs):
    starts, ends = _ints(starts), _ints(ends)
    axes = _ints(axes) if axes is not None else list(range(len(starts)))
    steps = _ints(steps) if steps is not None else [1] * len(starts)
    index: list = [slice(None)] * x.dim()
    flips = []
    for s, e, a, st in zip(starts, ends, axes, steps):
        a = _axis(a, x.dim())
        dim = x.shape[a]
        s = s + dim if s < 0 else s
        e = e + dim if e < 0 else e
        if st > 0:
            index[a] = slice(min(max(s, 0), dim), min(max(e, 0), dim), st)
        else:
            s, e = min(max(s, 0), dim - 1), min(max(e, -1), dim - 1)
            flips.append((a, torch.arange(s, e, st, device=x.device)))
    y = x[tuple(index)]
    for a, idx in flips:
        y = y.index_select(a, idx)
    return y


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


def _softmax(x, *, attrs):
    return torch.softmax(x, dim=int(attrs.get("axis", -1)))


def _logsoftmax(x, *, attrs):
    return torch.log_softmax(x, dim=int(attrs.get("axis", -1)))


def _shape(x, *, attrs):
    dims = list(x.shape)
    start, end = attrs.get("start", 0), attrs.get("end")
    return torch.tensor(dims[start:end] if end is not None else dims[start:], dtype=torch.int64)


def _gather(x, idx, *, attrs):
    axis = _axis(int(attrs.get("axis", 0)), x.dim())
    idx = idx.long()
    idx = torch.where(idx < 0, idx + x.shape[axis], idx)
    out = x.index_select(axis, idx.reshape(-1))
    return out.reshape((*x.shape[:axis], *idx.shape, *x.shape[axis + 1:]))  # () for a scalar index


def _cast(x, *, attrs):
    return x.to(_torch_dtype(ir.DataType(int(attrs["to"]))))


def _identity(x, *rest, attrs):
    return x


def _dropout(x, *rest, attrs, n_out):
    if n_out > 1:
        return x, torch.ones_like(x, dtype=torch.bool)
    return x


def _constant(*, attrs):
    for key in ("value", "sparse_value"):
        if key in attrs:
            t = attrs[key]
            return _to_torch(t.numpy(), t.dtype)
    if "value_float" in attrs:
        return torch.tensor(float(attrs["value_float"]), dtype=torch.float32)
    if "value_floats" in attrs:
        return torch.tensor(list(attrs["value_floats"]), dtype=torch.float32)
    if "value_int" in attrs:
        return torch.tensor(int(attrs["value_int"]), dtype=torch.int64)
    if "value_ints" in attrs:
        return torch.tensor(list(attrs["value_ints"]), dtype=torch.int64)
    raise UserError("cannot build a differentiable copy: Constant without a supported value")


def _expand(x, shape, *, attrs):
    return x.expand(torch.broadcast_shapes(tuple(x.shape), tuple(_ints(shape))))


def _constant_of_shape(shape, *, attrs):
    t = attrs.get("value")
    if t is None:
        return torch.zeros(_ints(shape), dtype=torch.float32)
    v = _to_torch(t.numpy(), t.dtype).reshape(-1)[0]
    return torch.full(_ints(shape), v.item(), dtype=v.dtype)


def _where(c, a, b, *, attrs):
    return torch.where(c.bool(), a, b)


def _range(start, limit, delta, *, attrs):
    return torch.arange(start.item(), limit.item(), delta.item(), dtype=start.dtype)


def _tile(x, reps, *, attrs):
    return x.repeat(*_ints(reps))


def _argmax(x, *, attrs):
    axis, keep = int(attrs.get("axis", 0)), bool(attrs.get("keepdims", 1))
    if attrs.get("select_last_index", 0):
        flipped = x.flip(axis)
        return x.shape[axis] - 1 - flipped.argmax(dim=axis, keepdim=keep)
    return x.argmax(dim=axis, keepdim=keep)


def _qparam_shape(scale: Tensor, x: Tensor, axis: int, block: int) -> Tensor:
    if scale.dim() == 0 or scale.numel() == 1 and x.dim() != scale.dim():
        return scale.reshape(())
    axis = _axis(axis, x.dim())
    if block:
        return scale.repeat_interleave(block, dim=axis).narrow(axis, 0, x.shape[axis])
    shape = [1] * x.dim()
    shape[axis] = -1
    return scale.reshape(shape)


def _zp_range(zp_dtype: ir.DataType | None, attrs: dict) -> tuple[int, int]:
    if attrs.get("output_dtype"):
        zp_dtype = ir.DataType(int(attrs["output_dtype"]))
    return _INT_RANGES.get(zp_dtype or ir.DataType.UINT8, (0, 255))


def _quantize(x, scale, zp=None, *, attrs, zp_dtype=None):
    """Integer-valued float32 output; rounding with a straight-through gradient."""
    axis, block = int(attrs.get("axis", 1)), int(attrs.get("block_size", 0))
    s = _qparam_shape(scale.float(), x, axis, block)
    z = 0.0 if zp is None else _qparam_shape(zp.float(), x, axis, block)
    qmin, qmax = _zp_range(zp_dtype, attrs)
    v = x / s
    v = v + (torch.round(v) - v).detach()
    return torch.clamp(v + z, qmin, qmax)


def _dequantize(q, scale, zp=None, *, attrs):
    axis, block = int(attrs.get("axis", 1)), int(attrs.get("block_size", 0))
    s = _qparam_shape(scale.float(), q, axis, block)
    q = q.float()
    if zp is not None:
        q = q - _qparam_shape(zp.float(), q, axis, block)
    return q * s


def _unary(fn):
    return lambda x, *, attrs: fn(x)


_OPS: dict[str, Callable] = {
    "Conv": _conv, "ConvTranspose": _conv_transpose, "Gemm": _gemm,
    "MatMul": lambda a, b, *, attrs: torch.matmul(a, b),
    "BatchNormalization": _batchnorm, "LayerNormalization": _layernorm, "GroupNormalization": _groupnorm,
    "InstanceNormalization": _instancenorm,
    "Relu": _unary(F.relu), "Clip": _clip,
    "LeakyRelu": lambda x, *, attrs: F.leaky_relu(x, float(attrs.get("alpha", 0.01))),
    "Sigmoid": _unary(torch.sigmoid),
    "HardSigmoid": lambda x, *, attrs: torch.clamp(
        x * float(attrs.get("alpha", 0.2)) + float(attrs.get("beta", 0.5)), 0.0, 1.0),
    "HardSwish": _unary(F.hardswish), "Tanh": _unary(torch.tanh),
    "Elu": lambda x, *, attrs: F.elu(x, float(attrs.get("alpha", 1.0))),
    "Selu": lambda x, *, attrs: float(attrs.get("gamma", 1.05070102214813232421875)) * torch.where(
        x > 0, x, float(attrs.get("alpha", 1.67326319217681884765625)) * (torch.exp(x) - 1)),
    "Celu": lambda x, *, attrs: F.celu(x, float(attrs.get("alpha", 1.0))),
    "ThresholdedRelu": lambda x, *, attrs: torch.where(x > float(attrs.get("alpha", 1.0)), x, torch.zeros_like(x)),
    "Softplus": _unary(F.softplus), "Softsign": _unary(F.softsign),
    "Gelu": _gelu, "Mish": _unary(F.mish), "PRelu": _prelu, "Erf": _unary(torch.erf),
    "Add": lambda a, b, *, attrs: a + b, "Sub": lambda a, b, *, attrs: a - b,
    "Mul": lambda a, b, *, attrs: a * b, "Div": _div,
    "Pow": lambda a, b, *, attrs: torch.pow(a, b),
    "Max": _variadic(torch.maximum), "Min": _variadic(torch.minimum), "Sum": _variadic(torch.add),
    "Neg": _unary(torch.neg), "Abs": _unary(torch.abs), "Exp": _unary(torch.exp),
    "Log": _unary(torch.log), "Sqrt": _unary(torch.sqrt), "Reciprocal": _unary(torch.reciprocal),
    "Floor": _unary(torch.floor), "Ceil": _unary(torch.ceil), "Sign": _unary(torch.sign),
    "MaxPool": _maxpool, "AveragePool": _avgpool,
    "GlobalAveragePool": lambda x, *, attrs: x.mean(dim=tuple(range(2, x.dim())), keepdim=True),
    "GlobalMaxPool": lambda x, *, attrs: x.amax(dim=tuple(range(2, x.dim())), keepdim=True),
    "ReduceMean": _reducer("mean"), "ReduceSum": _reducer("sum"), "ReduceMax": _reducer("max"),
    "ReduceMin": _reducer("min"), "ReduceProd": _reducer("prod"), "ReduceL2": _reducer("l2"),
    "Flatten": _flatten, "Reshape": _reshape, "Transpose": _transpose,
    "Squeeze": _squeeze, "Unsqueeze": _unsqueeze, "Concat": _concat, "Split": _split,
    "Slice": _slice, "Pad": _pad, "Resize": _resize, "Upsample": _upsample,
    "Softmax": _softmax, "LogSoftmax": _logsoftmax, "Shape": _shape,
    "Size": lambda x, *, attrs: torch.tensor(x.numel(), dtype=torch.int64),
    "Gather": _gather, "Cast": _cast, "Identity": _identity, "Dropout": _dropout,
    "Constant": _constant, "Where": _where, "Expand": _expand, "ConstantOfShape": _constant_of_shape,
    "Equal": lambda a, b, *, attrs: a == b, "Less": lambda a, b, *, attrs: a < b,
    "Greater": lambda a, b, *, attrs: a > b, "LessOrEqual": lambda a, b, *, attrs: a <= b,
    "GreaterOrEqual": lambda a, b, *, attrs: a >= b, "Not": _unary(torch.logical_not),
    "And": lambda a, b, *, attrs: torch.logical_and(a, b), "Or": lambda a, b, *, attrs: torch.logical_or(a, b),
    "Range": _range, "Tile": _tile, "ArgMax": _argmax,
    "QuantizeLinear": _quantize, "DequantizeLinear": _dequantize,
}
_NEEDS_N_OUT = {"Split", "Dropout", "LayerNormalization"}


def supported_ops() -> set[str]:
    return set(_OPS)


class TorchGraph(torch.nn.Module):
    """Interpret ``model``'s graph with torch ops; see the module docstring."""

    def __init__(self, model: ir.Model, hooks: Mapping[str, Hook] | None = None):
        super().__init__()
        graph = model.graph
        self.input_names = [v.name for v in graph.inputs]
        self.output_names = [v.name for v in graph.outputs]
        self._out_dtypes = {v.name: v.dtype for v in graph.outputs}
        self.hooks: dict[str, Hook] = dict(hooks or {})
        self._const: dict[str, str] = {}
        for i, (name, value) in enumerate(graph.initializers.items()):
            if value.const_value is None:
                continue
            tensor = value.const_value
            buf = f"c{i}"
            self.register_buffer(buf, _to_torch(tensor.numpy(), tensor.dtype), persistent=False)
            self._const[name] = buf
        self._steps: list[_Step] = []
        for node in graph:
            self._steps.append(self._compile(node))
        self._last_use = self._last_uses()

    def _compile(self, node: ir.Node) -> _Step:
        if node.domain not in ("", "ai.onnx") or node.op_type not in _OPS:
            domain = node.domain or "ai.onnx"
            raise UserError(f"cannot build a differentiable copy: op {domain}::{node.op_type} "
                            f"({node.name}) is not supported")
        attrs = {k: a.value for k, a in node.attributes.items()}
        fn = _OPS[node.op_type]
        if node.op_type in _NEEDS_N_OUT:
            base, n_out = fn, len(node.outputs)
            fn = lambda *xs, attrs, _f=base, _n=n_out: _f(*xs, attrs=attrs, n_out=_n)  # noqa: E731
        elif node.op_type == "QuantizeLinear":
            zp = node.inputs[2] if len(node.inputs) > 2 else None
            dt = node.outputs[0].dtype or (zp.dtype if zp is not None else None)
            fn = lambda *xs, attrs, _dt=dt: _quantize(*xs, attrs=attrs, zp_dtype=_dt)  # noqa: E731
        # trailing missing optional inputs are dropped; inner ones stay None
        inputs = [v.name if v is not None else None for v in node.inputs]
        while inputs and inputs[-1] is None:
            inputs.pop()
        outputs = [v.name for v in node.outputs]
        return _Step(node.op_type, node.name, fn, inputs, outputs, attrs)

    def _last_uses(self) -> dict[str, int]:
        last: dict[str, int] = {}
        for i, step in enumerate(self._steps):
            for name in step.inputs:
                if name is not None:
                    last[name] = i
        return last

    # ----------------------------------------------------------------- running
    def bn_nodes(self) -> list[tuple[str, str, Tensor, Tensor]]:
        """(node name, input value name, running mean, running var) of every BatchNormalization
        whose statistics are constants."""
        out = []
        for step in self._steps:
            if step.op == "BatchNormalization" and all(n in self._const for n in step.inputs[3:5]):
                mean, var = (self._value(step.inputs[i], {}) for i in (3, 4))
                out.append((step.name, step.inputs[0], mean, var))
        return out

    def constant(self, name: str) -> Tensor:
        """The buffer holding initializer ``name``."""
        return getattr(self, self._const[name])

    def _value(self, name: str | None, env: dict[str, Tensor]) -> Tensor | None:
        if name is None or name == "":
            return None
        if name in env:
            return env[name]
        buf = self._const.get(name)
        if buf is None:
            raise KeyError(f"value {name!r} is not computed yet")
        return getattr(self, buf)

    def forward(self, *inputs: Tensor):
        result = self.run(dict(zip(self.input_names, inputs)))
        outs = tuple(result[n] for n in self.output_names)
        return outs[0] if len(outs) == 1 else outs

    def run(self, inputs: Mapping[str, Tensor] | Tensor | np.ndarray, capture: Iterable[str] = (),
            stop_after: set[str] | None = None, hooks: Mapping[str, Hook] | None = None) -> dict[str, Tensor]:
        """Captured values (and graph outputs reached) by ONNX value name.

        ``stop_after``: stop as soon as all these values are computed (graph outputs
        then need not be in the result).  ``hooks`` add to (and override) ``self.hooks``.
        """
        if not isinstance(inputs, Mapping):
            inputs = {self.input_names[0]: inputs}
        all_hooks = {**self.hooks, **(hooks or {})}
        keep = set(capture) | set(self.output_names)
        pending = set(stop_after) if stop_after else None
        env: dict[str, Tensor] = {}
        for name, x in inputs.items():
            if name not in self.input_names:
                raise UserError(f"model has no input named {name!r} (inputs: {', '.join(self.input_names)})")
            x = torch.as_tensor(x)
            if x.is_floating_point() and x.dtype != torch.float32:
                x = x.float()
            hook = all_hooks.get(name)
            env[name] = hook(x) if hook is not None else x
            if pending is not None:
                pending.discard(name)
        result = {n: env[n] for n in keep if n in env}
        if pending is not None and not pending:
            return result
        for i, step in enumerate(self._steps):
            args = [self._value(n, env) for n in step.inputs]
            out = step.fn(*args, attrs=step.attrs)
            outs = out if isinstance(out, tuple) else (out,)
            for name, value in zip(step.outputs, outs):
                if not name:
                    continue
                hook = all_hooks.get(name)
                if hook is not None:
                    value = hook(value)
                env[name] = value
                if name in keep:
                    result[name] = self._output_cast(name, value)
                if pending is not None:
                    pending.discard(name)
            if pending is not None and not pending:
                break
            for name in step.inputs:  # free what no later node reads
                if name is not None and self._last_use.get(name) == i and name not in keep:
                    env.pop(name, None)
        return result

    def region(self, feeds: Iterable[str], targets: Iterable[str]) -> list[int]:
        """Indices of the steps computing ``targets`` from the values ``feeds`` (and constants)."""
        fed, wanted = set(feeds), set(targets)
        producer = {o: i for i, s in enumerate(self._steps) for o in s.outputs if o}
        needed, stack = set(), [n for n in wanted if n not in fed]
        while stack:
            name = stack.pop()
            if name in fed or name in self._const:
                continue
            if name not in producer:
                raise KeyError(f"value {name!r} cannot be computed from {sorted(fed)}")
            i = producer[name]
            if i in needed:
                continue
            needed.add(i)
            stack += [n for n in self._steps[i].inputs if n]
        return sorted(needed)

    def run_region(self, feeds: Mapping[str, Tensor], targets: Iterable[str],
                   steps: list[int] | None = None, hooks: Mapping[str, Hook] | None = None) -> dict[str, Tensor]:
        """``targets`` computed from ``feeds``: any values by name, initializers included
        (a fed initializer overrides the stored one, e.g. with a trainable tensor)."""
        targets = list(targets)
        steps = self.region(feeds, targets) if steps is None else steps
        all_hooks = {**self.hooks, **(hooks or {})}
        env = dict(feeds)
        for i in steps:
            step = self._steps[i]
            out = step.fn(*[self._value(n, env) for n in step.inputs], attrs=step.attrs)
            for name, value in zip(step.outputs, out if isinstance(out, tuple) else (out,)):
                if name:
                    hook = all_hooks.get(name)
                    env[name] = hook(value) if hook is not None else value
        return {n: env[n] for n in targets}

    def _output_cast(self, name: str, value: Tensor) -> Tensor:
        dt = self._out_dtypes.get(name)
        if dt in _INT_RANGES and value.is_floating_point():  # QuantizeLinear output
            return value.to(_torch_dtype(dt))
        return value
