"""The files the toolchain writes, as the runtime and the compressor both read them.

:func:`load_proto` reads a model and its external data with one-line errors for bad
files; :func:`is_selection_weight` recognises the shortcut convs the compressor
writes (they copy channels: nothing to compress, nothing to speed up).
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import onnx
from google.protobuf.message import DecodeError

from datafree.ops.errors import UserError


def load_proto(path: str | os.PathLike) -> onnx.ModelProto:
    """Read a model file (and its external data) with one-line errors for bad files."""
    path = Path(path)
    if not path.exists():
        raise UserError(f"{path}: no such file")
    if path.is_dir():
        raise UserError(f"{path}: is a directory, not an ONNX file")
    try:
        proto = onnx.load(str(path), load_external_data=False)
    except (DecodeError, RuntimeWarning, ValueError, onnx.onnx_cpp2py_export.checker.ValidationError) as exc:
        raise UserError(f"{path}: not a valid ONNX model (truncated or corrupt protobuf: {exc})") from None
    except Exception as exc:  # protobuf raises a variety of errors on garbage
        raise UserError(f"{path}: not a valid ONNX model ({type(exc).__name__}: {exc})") from None
    if not proto.graph.node or not proto.opset_import:
        raise UserError(f"{path}: not a valid ONNX model (no graph nodes or no opset import)")
    missing = sorted({
        e.value for t in _all_tensors(proto) if t.data_location == onnx.TensorProto.EXTERNAL
        for e in t.external_data if e.key == "location" and not (path.parent / e.value).exists()
    })
    if missing:
        raise UserError(f"{path}: external data file missing: {', '.join(missing)}")
    try:
        onnx.load_external_data_for_model(proto, str(path.parent))
    except Exception as exc:
        raise UserError(f"{path}: external data could not be read ({exc})") from None
    return proto


def _all_tensors(proto: onnx.ModelProto):
    yield from proto.graph.initializer
    for node in proto.graph.node:
        for attr in node.attribute:
            if attr.type == onnx.AttributeProto.TENSOR:
                yield attr.t


def is_selection_weight(w: np.ndarray | None) -> bool:
    """A 1x1 conv weight that is a 0/1 matrix with at most one 1 per row and column."""
    if w is None or w.ndim < 3 or any(d != 1 for d in w.shape[2:]):
        return False
    m = w.reshape(w.shape[0], w.shape[1])
    return bool(np.all((m == 0) | (m == 1)) and np.all(m.sum(0) <= 1) and np.all(m.sum(1) <= 1))
