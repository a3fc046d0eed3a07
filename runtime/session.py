"""An onnxruntime session that runs any model this toolchain writes.

    from datafree.runtime import InferenceSession
    logits, bits = InferenceSession("dyn.onnx").run(None, {"input": x})

Dynamic-precision models use the ``ai.datafree`` ops.  Three ways to run them:

* ``grouped=True``: the selector runs first, then each configuration's standard-op
  specialisation on its own images (:mod:`datafree.runtime.specialise`);
* ``grouped=False, use_kernels=True``: the onnxruntime-extensions Python kernels
  (:mod:`datafree.ops.kernels`), when that package is installed;
* ``grouped=False, use_kernels=False``: the ONNX function bodies stored in the
  model, exactly as a stock onnxruntime runs the file.

``grouped=None`` (default) takes the fastest for the model: grouped for an upfront
model (its function bodies run every candidate bit-width on every image), the
function bodies for a cascade (both passes are standard QDQ ops that onnxruntime runs
on its integer kernels; only the selector is an ``ai.datafree`` op).

Static models need nothing from this session: the compressor writes W8A8 and W4A8
layers in the form onnxruntime fuses into integer kernels and weight-only layers in
a form it folds into float weights at load, so a plain ``onnxruntime.InferenceSession``
with default options runs them as fast (activations below 8 bits too: they sit in
uint8, clipped to their grid).  The one exception is a model with quantized
activations and no layer onnxruntime can run as an integer kernel (ConvTranspose
layers only): its weights stay behind a DequantizeLinear (a float weight would be
requantized by onnxruntime to 8 bits per tensor, changing the values), and this
session sets ``session.disable_quant_qdq=1`` so onnxruntime folds them at load
(``weights_folded`` says whether it did).

All three give the same predictions; logits agree to float rounding, except that
a rounding difference inside a conv can move an activation across a quantization
step (seen on 1 image in 100).
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
from onnx import numpy_helper

from datafree.ops import domain, kernels
from datafree.ops.errors import UserError

from .model_file import is_selection_weight, load_proto
from .specialise import GroupedRunner

Source = str | os.PathLike | bytes | onnx.ModelProto


def _load(source) -> onnx.ModelProto:
    if isinstance(source, onnx.ModelProto):
        return source
    if isinstance(source, (bytes, bytearray)):
        proto = onnx.ModelProto()
        proto.ParseFromString(bytes(source))
        return proto
    ir = sys.modules.get("onnx_ir")       # an onnx_ir.Model means onnx_ir is loaded: the runtime never imports it
    if ir is not None and isinstance(source, ir.Model):
        return ir.serde.serialize_model(source)
    return load_proto(Path(source))


def folds_weights(proto: onnx.ModelProto) -> bool:
    """Whether onnxruntime runs ``proto`` faster with ``session.disable_quant_qdq=1``: some
    layer's weight is dequantized from an integer initializer on every run, and no layer
    could run as an integer kernel.

    A layer fuses into QLinearConv / QGemm / QLinearMatMul when both its input and its
    weight come from 8-bit DequantizeLinear nodes (INT4 weights cast to INT8
    in front of their DequantizeLinear count as 8-bit).  Shortcut selection convs do not
    count: they copy channels as fast either way.
    """
    inits = {i.name: i for i in proto.graph.initializer}
    producer = {o: n for n in proto.graph.node for o in n.output}
    eight = (onnx.TensorProto.INT8, onnx.TensorProto.UINT8)
    dequantized = False
    for n in proto.graph.node:
        if n.op_type not in ("Conv", "Gemm", "MatMul", "ConvTranspose") or len(n.input) < 2:
            continue
        w = _dequantized_weight(n.input[1], inits, producer)
        if w is None:
            continue
        dequantized = True
        stored, dtype = w
        p = producer.get(n.input[0])
        if dtype in eight and not _selection(stored) and p is not None and p.op_type == "DequantizeLinear" and \
                len(p.input) > 2 and p.input[2] in inits and inits[p.input[2]].data_type in eight:
            return False
    return dequantized


def _dequantized_weight(name: str, inits: dict, producer: dict) -> tuple[onnx.TensorProto, int] | None:
    """(stored integers, the type the DequantizeLinear reads) of a weight computed by a
    DequantizeLinear from an initializer, through a Cast; None otherwise."""
    dq = producer.get(name)
    if dq is None or dq.op_type != "DequantizeLinear" or dq.domain not in ("", "ai.onnx"):
        return None
    if dq.input[0] in inits:
        return inits[dq.input[0]], inits[dq.input[0]].data_type
    cast = producer.get(dq.input[0])
    if cast is not None and cast.op_type == "Cast" and cast.input[0] in inits:
        return inits[cast.input[0]], next(a.i for a in cast.attribute if a.name == "to")
    return None


def _selection(weight: onnx.TensorProto) -> bool:
    """A shortcut written as a conv (it copies channels whatever kernel runs it)."""
    return len(weight.dims) >= 3 and all(d == 1 for d in weight.dims[2:]) and \
        is_selection_weight(numpy_helper.to_array(weight))


def _has_selector(proto: onnx.ModelProto) -> bool:
    return any(n.domain == domain.DOMAIN and n.op_type == "BitSelect" for n in proto.graph.node)


class InferenceSession:
    """``onnxruntime.InferenceSession`` with the ``ai.datafree`` ops available."""

    def __init__(self, source: Source, *, threads: int | None = None, use_kernels: bool = True,
                 providers: list[str] | None = None, grouped: bool | None = None):
        proto = _load(source)
        self.dynamic = domain.uses_domain(proto)
        self.metadata = {p.key: p.value for p in proto.metadata_props}
        self.dynamic_metadata = domain.dynamic_metadata(self.metadata)
        options = ort.SessionOptions()
        options.log_severity_level = 3
        if threads is not None:
            options.intra_op_num_threads = int(threads)
            options.inter_op_num_threads = 1
        providers = providers or ["CPUExecutionProvider"]
        self.weights_folded = not self.dynamic and folds_weights(proto)
        if self.weights_folded:
            options.add_session_config_entry("session.disable_quant_qdq", "1")
        cascade = self.dynamic_metadata.get("mode") == "cascade"
        if grouped is None:                   # the fastest way for this model (see above)
            grouped, use_kernels = (False, False) if cascade else (True, use_kernels)
        self.grouped = bool(self.dynamic and grouped and _has_selector(proto))
        self.uses_kernels = bool(self.dynamic and not self.grouped and use_kernels and kernels.register())
        try:
            if self.grouped:
                self._session = GroupedRunner(proto, options, providers, self.dynamic_metadata)
                return
            if self.uses_kernels:
                options.register_custom_ops_library(kernels.library_path())
                proto = kernels.to_kernel_model(proto)
            self._session = ort.InferenceSession(proto.SerializeToString(), options, providers=providers)
        except Exception as exc:
            raise UserError(f"onnxruntime cannot run this model: {str(exc).splitlines()[0]}") from None

    @property
    def input_names(self) -> list[str]:
        return [i.name for i in self.get_inputs()]

    @property
    def output_names(self) -> list[str]:
        return [o.name for o in self.get_outputs()]

    def get_inputs(self):
        if self.grouped:
            return self._session.input_info
        return self._session.get_inputs()

    def get_outputs(self):
        if self.grouped:
            return self._session.output_info
        return self._session.get_outputs()

    def run(self, output_names: list[str] | None, feeds: dict[str, np.ndarray]) -> list[np.ndarray]:
        return self._session.run(output_names, feeds)
