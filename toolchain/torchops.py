"""ONNX operators as torch functions: the table :class:`torchgraph.TorchGraph` interprets with.

Each entry takes the node's inputs as tensors (trailing missing optional inputs dropped,
inner ones None) and its attributes as ``attrs``; ops with several outputs also get
``n_out``.  Semantics follow the ONNX operator specification at the opsets ``ingest``
normalises to; every floating-point result is float32.
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
import onnx_ir as ir
import torch
import torch.nn.functional as F

from . import device as dev
from .errors import UserError
from .torchops_nn import (
    _avgpool,
    _axis,
    _batchnorm,
    _conv,
    _conv_transpose,
    _gemm,
    _groupnorm,
    _instancenorm,
    _ints,
    _layernorm,
    _lstm,
    _maxpool,
    _pad,
    _resize,
    _upsample,
)

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
    return torch.as_tensor(np.array(array, copy=True), device=dev.current()).to(target)


# ------------------------------------------------------------------------- ops


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


def _softmax(x, *, attrs):
    return torch.softmax(x, dim=int(attrs.get("axis", -1)))


def _logsoftmax(x, *, attrs):
    return torch.log_softmax(x, dim=int(attrs.get("axis", -1)))


def _shape(x, *, attrs):
    dims = list(x.shape)
    start, end = attrs.get("start", 0), attrs.get("end")
    return torch.tensor(dims[start:end] if end is not None else dims[start:], dtype=torch.int64, device=x.device)


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
        return torch.tensor(float(attrs["value_float"]), dtype=torch.float32, device=dev.current())
    if "value_floats" in attrs:
        return torch.tensor(list(attrs["value_floats"]), dtype=torch.float32, device=dev.current())
    if "value_int" in attrs:
        return torch.tensor(int(attrs["value_int"]), dtype=torch.int64, device=dev.current())
    if "value_ints" in attrs:
        return torch.tensor(list(attrs["value_ints"]), dtype=torch.int64, device=dev.current())
    raise UserError("cannot build a differentiable copy: Constant without a supported value")


def _expand(x, shape, *, attrs):
    return x.expand(torch.broadcast_shapes(tuple(x.shape), tuple(_ints(shape))))


def _constant_of_shape(shape, *, attrs):
    t = attrs.get("value")
    if t is None:
        return torch.zeros(_ints(shape), dtype=torch.float32, device=shape.device)
    v = _to_torch(t.numpy(), t.dtype).reshape(-1)[0]
    return torch.full(_ints(shape), v.item(), dtype=v.dtype, device=shape.device)


def _where(c, a, b, *, attrs):
    return torch.where(c.bool(), a, b)


def _range(start, limit, delta, *, attrs):
    return torch.arange(start.item(), limit.item(), delta.item(), dtype=start.dtype, device=start.device)


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
    "Size": lambda x, *, attrs: torch.tensor(x.numel(), dtype=torch.int64, device=x.device),
    "Gather": _gather, "Cast": _cast, "Identity": _identity, "Dropout": _dropout,
    "Constant": _constant, "Where": _where, "Expand": _expand, "ConstantOfShape": _constant_of_shape,
    "Equal": lambda a, b, *, attrs: a == b, "Less": lambda a, b, *, attrs: a < b,
    "Greater": lambda a, b, *, attrs: a > b, "LessOrEqual": lambda a, b, *, attrs: a <= b,
    "GreaterOrEqual": lambda a, b, *, attrs: a >= b, "Not": _unary(torch.logical_not),
    "And": lambda a, b, *, attrs: torch.logical_and(a, b), "Or": lambda a, b, *, attrs: torch.logical_or(a, b),
    "Range": _range, "Tile": _tile, "ArgMax": _argmax,
    "QuantizeLinear": _quantize, "DequantizeLinear": _dequantize, "LSTM": _lstm,
}
_NEEDS_N_OUT = {"Split", "Dropout", "LayerNormalization", "LSTM"}


def supported_ops() -> set[str]:
    return set(_OPS)
