"""ONNX function bodies of the ``ai.datafree`` ops, made only of standard ONNX ops.

A model written by the dynamic pass carries these FunctionProtos in its
``functions``, so it runs on any stock onnxruntime (or any ONNX runtime that
inlines model-local functions) without this package.

Per-sample bit-widths inside one batch work everywhere:

* ``DynQuant`` gathers each sample's scale / zero point from the tables with the
  sample's bit-width as index, and computes each sample's integer grid from it.
* ``DynQConv`` / ``DynQGemm`` cannot give each sample its own weights in one Conv,
  so the body is unrolled over the model's candidate bit-widths: the layer runs
  once per candidate on the whole batch and a ``Where`` mask keeps, for each
  sample, the result at its own bit-width.  That costs (number of candidates) ×
  the layer; the kernels in :mod:`datafree.ops.kernels` group the batch instead.
  The body is therefore built for a given candidate set (one per model).
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

from .domain import DOMAIN

_CONV_ATTRS = ("strides", "pads", "dilations", "group")
_ATTR_TYPES = {"strides": onnx.AttributeProto.INTS, "pads": onnx.AttributeProto.INTS,
               "dilations": onnx.AttributeProto.INTS, "group": onnx.AttributeProto.INT,
               "signed": onnx.AttributeProto.INT}


class _Body:
    """A tiny builder for a function body: fresh names, constants, nodes."""

    def __init__(self, prefix: str):
        self.nodes: list[onnx.NodeProto] = []
        self._n = 0
        self._prefix = prefix

    def _name(self, hint: str) -> str:
        self._n += 1
        return f"{self._prefix}_{hint}_{self._n}"

    def const(self, value, dtype=np.float32, hint: str = "c") -> str:
        out = self._name(hint)
        self.nodes.append(helper.make_node("Constant", [], [out],
                                           value=numpy_helper.from_array(np.asarray(value, dtype=dtype))))
        return out

    def op(self, op_type: str, inputs: Sequence[str], n_out: int = 1, out: Sequence[str] | None = None,
           **attrs) -> str | list[str]:
        outs = list(out) if out is not None else [self._name(op_type.lower()) for _ in range(n_out)]
        self.nodes.append(helper.make_node(op_type, list(inputs), outs, **attrs))
        return outs[0] if len(outs) == 1 else outs

    def attr_const(self, name: str) -> str:
        """A Constant holding the calling node's integer attribute ``name``."""
        out = self._name(name)
        node = helper.make_node("Constant", [], [out])
        ref = onnx.AttributeProto()
        ref.name, ref.ref_attr_name, ref.type = "value_int", name, onnx.AttributeProto.INT
        node.attribute.append(ref)
        self.nodes.append(node)
        return out

    def op_ref(self, op_type: str, inputs: Sequence[str], refs: Sequence[str], out: str | None = None) -> str:
        """A node whose attributes are the calling node's attributes of the same names."""
        o = out or self._name(op_type.lower())
        node = helper.make_node(op_type, list(inputs), [o])
        for name in refs:
            a = onnx.AttributeProto()
            a.name = name
            a.ref_attr_name = name
            a.type = _ATTR_TYPES[name]
            node.attribute.append(a)
        self.nodes.append(node)
        return o


def _function(name: str, inputs, outputs, body: _Body, opset: int, attributes=()) -> onnx.FunctionProto:
    # Formal names get the op's prefix: inliners (onnx's, onnxruntime's) mix a formal
    # name up with a graph value of the same name (a graph output called "bits").
    rename = {n: f"{body._prefix}__{n}" for n in (*inputs, *outputs)}
    for node in body.nodes:
        node.input[:] = [rename.get(i, i) for i in node.input]
        node.output[:] = [rename.get(o, o) for o in node.output]
    return helper.make_function(DOMAIN, name, [rename[i] for i in inputs], [rename[o] for o in outputs],
                                body.nodes, [helper.make_opsetid("", opset)], attributes=list(attributes))


def bit_select(opset: int) -> onnx.FunctionProto:
    """BitSelect(features, W1, b1, W2, b2, bits_table) -> (config int64 [N], bits [N, G])."""
    f = _Body("bs")
    flat = f.op("Reshape", ["features", f.const([0, 0, -1], np.int64)])
    if opset >= 18:
        pooled = f.op("ReduceMean", [flat, f.const([2], np.int64)], keepdims=0)
    else:
        pooled = f.op("ReduceMean", [flat], axes=[2], keepdims=0)
    hidden = f.op("Relu", [f.op("Add", [f.op("MatMul", [pooled, "W1"]), "b1"])])
    logits = f.op("Add", [f.op("MatMul", [hidden, "W2"]), "b2"])
    f.op("ArgMax", [logits], out=["config"], axis=1, keepdims=0)
    f.op("Gather", ["bits_table", "config"], out=["bits"], axis=0)
    return _function("BitSelect", ["features", "W1", "b1", "W2", "b2", "bits_table"], ["config", "bits"], f, opset)


def _per_sample(f: _Body, v: str) -> str:
    """[N] -> [N, 1], to broadcast against a tensor flattened to [N, -1]."""
    return f.op("Unsqueeze", [v, f.const([1], np.int64)])


def dyn_quant(opset: int) -> onnx.FunctionProto:
    """DynQuant(x, bits [N], scale [B], zero_point [B]; signed) -> y."""
    f = _Body("dq")
    idx = f.op("Cast", ["bits"], to=TensorProto.INT64)
    s = _per_sample(f, f.op("Gather", ["scale", idx], axis=0))
    z = _per_sample(f, f.op("Gather", ["zero_point", idx], axis=0))
    one, two = f.const(1.0), f.const(2.0)
    levels = f.op("Pow", [two, "bits"])                       # 2^b
    half = f.op("Div", [levels, two])                         # 2^(b-1)
    sig = f.op("Cast", [f.attr_const("signed")], to=TensorProto.BOOL)
    zero = f.op("Sub", [half, half])
    qmin = _per_sample(f, f.op("Where", [sig, f.op("Neg", [half]), zero]))
    qmax = _per_sample(f, f.op("Where", [sig, f.op("Sub", [half, one]), f.op("Sub", [levels, one])]))
    x2 = f.op("Flatten", ["x"], axis=1)          # [N, -1] that also holds for N = 0
    q = f.op("Add", [f.op("Round", [f.op("Div", [x2, s])]), z])
    q = f.op("Max", [f.op("Min", [q, qmax]), qmin])
    y2 = f.op("Mul", [f.op("Sub", [q, z]), s])
    f.op("Reshape", [y2, f.op("Shape", ["x"])], out=["y"])
    return _function("DynQuant", ["x", "bits", "scale", "zero_point"], ["y"], f, opset, ["signed"])


def _derived_weight(f: _Body, bits: int) -> str:
    """Weights at ``bits``, requantised from w_int (any rank; output channels first)."""
    if not hasattr(f, "_w"):
        wf = f.op("Reshape", [f.op("Cast", ["w_int"], to=TensorProto.FLOAT), f.const([0, -1], np.int64)])
        f._w = f.op("Mul", [wf, _per_sample(f, "w_scale")])
        f._w_shape = f.op("Shape", ["w_int"])
    s = _per_sample(f, f.op("Gather", ["scale_table", f.const(bits, np.int64)], axis=0))
    qmax = float(2 ** (bits - 1) - 1)
    q = f.op("Clip", [f.op("Round", [f.op("Div", [f._w, s])]), f.const(-qmax), f.const(qmax)])
    return f.op("Reshape", [f.op("Mul", [q, s]), f._w_shape])


def _select(f: _Body, results: list[tuple[int, str]], out: str) -> None:
    """For each sample, the result computed at its own bit-width."""
    first = results[0][1]
    shape = f.op("Shape", [first])
    acc = f.op("Flatten", [first], axis=1)
    for bits, y in results[1:]:
        mask = _per_sample(f, f.op("Equal", ["bits", f.const(float(bits))]))
        acc = f.op("Where", [mask, f.op("Flatten", [y], axis=1), acc])
    f.op("Reshape", [acc, shape], out=[out])


def dyn_qconv(opset: int, candidates: Sequence[int]) -> onnx.FunctionProto:
    """DynQConv(x, bits [N], w_int, w_scale [O], scale_table [B, O], bias [O]; Conv attrs) -> y."""
    f = _Body("dc")
    results = [(b, f.op_ref("Conv", ["x", _derived_weight(f, b), "bias"], _CONV_ATTRS))
               for b in sorted(candidates)]
    _select(f, results, "y")
    return _function("DynQConv", ["x", "bits", "w_int", "w_scale", "scale_table", "bias"], ["y"], f, opset,
                     _CONV_ATTRS)


def dyn_qgemm(opset: int, candidates: Sequence[int]) -> onnx.FunctionProto:
    """DynQGemm(x [N, K], bits [N], w_int [O, K], w_scale [O], scale_table [B, O], bias [O]) -> y [N, O]."""
    f = _Body("dg")
    results = [(b, f.op("Gemm", ["x", _derived_weight(f, b), "bias"], transB=1)) for b in sorted(candidates)]
    _select(f, results, "y")
    return _function("DynQGemm", ["x", "bits", "w_int", "w_scale", "scale_table", "bias"], ["y"], f, opset)


def all_functions(opset: int, candidates: Sequence[int]) -> list[onnx.FunctionProto]:
    """Every function body, for a model at default-domain ``opset`` with these candidate bit-widths."""
    return [bit_select(opset), dyn_quant(opset), dyn_qconv(opset, candidates), dyn_qgemm(opset, candidates)]


def attach(model: onnx.ModelProto, candidates: Sequence[int]) -> onnx.ModelProto:
    """Replace ``model``'s ai.datafree function bodies with ones for ``candidates``; returns it."""
    opset = next(o.version for o in model.opset_import if o.domain in ("", "ai.onnx"))
    keep = [fn for fn in model.functions if fn.domain != DOMAIN]
    del model.functions[:]
    model.functions.extend(keep + all_functions(opset, candidates))
    return model
