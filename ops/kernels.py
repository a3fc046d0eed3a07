"""Python kernels of the ``ai.datafree`` ops for onnxruntime (onnxruntime-extensions).

The kernels group a batch by bit-width and run each group once (the function
bodies run every candidate on the whole batch and mask).  They are registered
with ``@onnx_op``, which places them in onnxruntime-extensions' domain
``ai.onnx.contrib``; a session sees them after
``SessionOptions.register_custom_ops_library(get_library_path())``.

How a session picks the kernels rather than the function bodies: a model file
always has its nodes in ``ai.datafree`` *and* the function bodies, so that a
stock onnxruntime runs it.  onnxruntime would inline those bodies, so
:func:`to_kernel_model` rewrites an in-memory copy before the session is made: the
nodes move to ``ai.onnx.contrib``, the Conv attributes become the string/int
attributes the Python kernels accept, and the now unused function bodies are
dropped.  One file, two ways to run it; nothing on disk changes.

Speed: onnxruntime-extensions hands every output back through a Python list, so
on ResNet-20 (500 images, batches of 100, 2 cores) these kernels took 43 s where
the function bodies took 4.8 s and the grouped runner of
:mod:`datafree.runtime.specialise` 3.2 s.  The runtime therefore uses the grouped
runner for models with a selector and keeps these kernels for single ops and as
the reference that the function bodies are tested against.
"""

from __future__ import annotations

import json

import numpy as np
import onnx

from . import reference as ref
from .domain import DOMAIN, KERNEL_DOMAIN, all_nodes

_INT_LIST_ATTRS = ("strides", "pads", "dilations")


# ----------------------------------------------------------------- the maths
def bit_select(features, w1, b1, w2, b2, bits_table):
    pooled = features.reshape(features.shape[0], features.shape[1], -1).mean(axis=2, dtype=np.float32)
    hidden = np.maximum(pooled @ w1 + b1, 0)
    config = np.argmax(hidden @ w2 + b2, axis=1).astype(np.int64)
    return config, bits_table[config].astype(np.float32)


def dyn_quant(x, bits, scale, zero_point, signed=0):
    return ref.dyn_quant(x, bits, scale, zero_point, bool(signed))


def _conv(x, w, bias, strides, pads, dilations, group):
    """ONNX Conv in numpy: the windows of the padded input (strided, dilated) times
    the weights, one matrix product per group."""
    nd = w.ndim - 2
    strides, dilations = list(strides) or [1] * nd, list(dilations) or [1] * nd
    pads = list(pads) or [0] * (2 * nd)
    x = np.pad(np.asarray(x, np.float32), [(0, 0), (0, 0)] + [(pads[i], pads[nd + i]) for i in range(nd)])
    kernel = w.shape[2:]
    span = [d * (k - 1) + 1 for d, k in zip(dilations, kernel)]
    win = np.lib.stride_tricks.sliding_window_view(x, span, axis=tuple(range(2, 2 + nd)))
    win = win[(slice(None), slice(None)) + tuple(slice(None, None, s) for s in strides)
              + tuple(slice(None, None, d) for d in dilations)]            # [N, C, *out, *kernel]
    n, c, out = x.shape[0], x.shape[1], win.shape[2:2 + nd]
    o, taps = w.shape[0], int(np.prod(kernel))
    cols = win.reshape(n, group, c // group, *out, *kernel)
    cols = cols.transpose(1, 0, *range(3, 3 + nd), 2, *range(3 + nd, 3 + 2 * nd))
    cols = cols.reshape(group, -1, (c // group) * taps)                      # [G, N·out, C/G·kernel]
    wm = w.astype(np.float32).reshape(group, o // group, -1).transpose(0, 2, 1)
    y = (cols @ wm).reshape(group, n, *out, o // group)                      # [G, N, *out, O/G]
    y = np.moveaxis(y, -1, 1).reshape(group * (o // group), n, *out).swapaxes(0, 1)
    return np.ascontiguousarray(y + bias.reshape(1, o, *[1] * nd), dtype=np.float32)


def _levels(bits, scale_table):
    """The bit-widths present in ``bits``; an empty batch still runs once, at the
    highest, so that its (empty) output has the right shape."""
    return np.unique(bits) if len(bits) else [scale_table.shape[0] - 1]


def dyn_qconv(x, bits, w_int, w_scale, scale_table, bias, strides=(), pads=(), dilations=(), group=1):
    parts, order = [], []
    for b in _levels(bits, scale_table):
        idx = np.nonzero(bits == b)[0]
        w = ref.derive_weight(w_int, w_scale, scale_table, int(b))
        parts.append(_conv(x[idx], w, bias.astype(np.float32), strides, pads, dilations, group))
        order.append(idx)
    return _scatter(parts, order, len(bits))


def dyn_qgemm(x, bits, w_int, w_scale, scale_table, bias):
    parts, order = [], []
    for b in _levels(bits, scale_table):
        idx = np.nonzero(bits == b)[0]
        w = ref.derive_weight(w_int, w_scale, scale_table, int(b))
        parts.append(x[idx] @ w.T + bias)
        order.append(idx)
    return _scatter(parts, order, len(bits))


def _scatter(parts, order, n):
    y = np.empty((n,) + parts[0].shape[1:], dtype=np.float32)
    for p, idx in zip(parts, order):
        y[idx] = p
    return y


# ------------------------------------------------------------- registration
_registered = False


def _extensions():
    """onnxruntime-extensions, imported on first use (it is optional, and it imports
    torch where torch is installed); None when it is missing."""
    try:
        import onnxruntime_extensions
    except ImportError:  # the runtime falls back to the function bodies
        return None
    return onnxruntime_extensions


def register() -> bool:
    """Declare the kernels to onnxruntime-extensions (once); False when it is missing."""
    global _registered
    if _registered:
        return True
    ext = _extensions()
    if ext is None:
        return False
    PyCustomOpDef, onnx_op = ext.PyCustomOpDef, ext.onnx_op
    f, i8, i64, s = PyCustomOpDef.dt_float, PyCustomOpDef.dt_int8, PyCustomOpDef.dt_int64, PyCustomOpDef.dt_string
    onnx_op(op_type="BitSelect", inputs=[f] * 6, outputs=[i64, f])(bit_select)
    onnx_op(op_type="DynQuant", inputs=[f] * 4, outputs=[f], attrs={"signed": i64})(dyn_quant)

    def conv_kernel(x, bits, w_int, w_scale, scale_table, bias, strides="[]", pads="[]", dilations="[]", group=1):
        return dyn_qconv(x, bits, w_int, w_scale, scale_table, bias, json.loads(strides), json.loads(pads),
                         json.loads(dilations), int(group))

    onnx_op(op_type="DynQConv", inputs=[f, f, i8, f, f, f], outputs=[f],
            attrs={"strides": s, "pads": s, "dilations": s, "group": i64})(conv_kernel)
    onnx_op(op_type="DynQGemm", inputs=[f, f, i8, f, f, f], outputs=[f])(dyn_qgemm)
    _registered = True
    return True


def library_path() -> str:
    return _extensions().get_library_path()


# ------------------------------------------------------------ model rewrite
def to_kernel_model(model: onnx.ModelProto) -> onnx.ModelProto:
    """A copy of ``model`` whose ai.datafree nodes run on the kernels (see module doc)."""
    out = onnx.ModelProto()
    out.CopyFrom(model)
    for node in all_nodes(out.graph):
        if node.domain != DOMAIN:
            continue
        node.domain = KERNEL_DOMAIN
        if node.op_type == "DynQConv":
            given = {a.name: onnx.helper.get_attribute_value(a) for a in node.attribute}
            del node.attribute[:]
            for name in _INT_LIST_ATTRS:
                node.attribute.append(onnx.helper.make_attribute(name, json.dumps(list(given.get(name, [])))))
            node.attribute.append(onnx.helper.make_attribute("group", int(given.get("group", 1))))
        elif node.op_type == "DynQuant" and not any(a.name == "signed" for a in node.attribute):
            node.attribute.append(onnx.helper.make_attribute("signed", 0))
    keep = [fn for fn in out.functions if fn.domain != DOMAIN]
    del out.functions[:]
    out.functions.extend(keep)
    opsets = {o.domain for o in out.opset_import}
    if KERNEL_DOMAIN not in opsets:
        out.opset_import.append(onnx.helper.make_opsetid(KERNEL_DOMAIN, 1))
    return out
