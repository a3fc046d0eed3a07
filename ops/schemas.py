"""ONNX schemas of the ``ai.datafree`` ops, so the checker and shape inference accept them.

:func:`register` is idempotent and cheap; everything that builds, checks or runs a
dynamic model calls it first.
"""

from __future__ import annotations

import onnx
from onnx import TensorProto
from onnx.defs import OpSchema

from .domain import DOMAIN, VERSION

_F = OpSchema.FormalParameter
_A = OpSchema.Attribute
_INT = OpSchema.AttrType.INT
_INTS = OpSchema.AttrType.INTS
_FLOAT_T = [("T", ["tensor(float)"], "float activations")]
_registered = False

_WEIGHT_INPUTS = [
    _F("x", "T", "input"),
    _F("bits", "tensor(float)", "bit-width of each sample, [N]"),
    _F("w_int", "tensor(int8)", "weights as integers at the highest candidate precision, output channels first"),
    _F("w_scale", "tensor(float)", "per-output-channel scale of w_int, [O]"),
    _F("scale_table", "tensor(float)", "per-output-channel scale at each bit-width, [B, O] indexed by bits"),
    _F("bias", "tensor(float)", "bias, [O]"),
]


def _schemas() -> list[OpSchema]:
    return [
        OpSchema(
            "BitSelect", DOMAIN, VERSION,
            "Choose a configuration per sample: global-average-pool the features, a two-layer "
            "MLP (ReLU), argmax; bits = bits_table[config].",
            inputs=[_F("features", "T", "early features [N, C, ...]"),
                    _F("W1", "tensor(float)", "[C, H]"), _F("b1", "tensor(float)", "[H]"),
                    _F("W2", "tensor(float)", "[H, K]"), _F("b2", "tensor(float)", "[K]"),
                    _F("bits_table", "tensor(float)", "bit-width of each group in each configuration, [K, G]")],
            outputs=[_F("config", "tensor(int64)", "chosen configuration per sample, [N]"),
                     _F("bits", "tensor(float)", "bit-width per sample and group, [N, G]")],
            type_constraints=_FLOAT_T,
        ),
        OpSchema(
            "DynQuant", DOMAIN, VERSION,
            "Per-sample fake quantization: sample n is quantized on the grid of bits[n] bits with "
            "scale[bits[n]] and zero_point[bits[n]] (tables indexed by bit-width).",
            inputs=[_F("x", "T", "input [N, ...]"), _F("bits", "tensor(float)", "[N]"),
                    _F("scale", "tensor(float)", "[B]"), _F("zero_point", "tensor(float)", "[B]")],
            outputs=[_F("y", "T", "fake-quantized x")],
            type_constraints=_FLOAT_T,
            attributes=[_A("signed", onnx.helper.make_attribute("signed", 0), "1: signed grid [-2^(b-1), 2^(b-1)-1]; 0: unsigned [0, 2^b-1]")],
        ),
        OpSchema(
            "DynQConv", DOMAIN, VERSION,
            "Conv whose weights for sample n are requantised to bits[n] bits from the stored integers: "
            "w_b = clip(round(w_int*w_scale/scale_table[b]), +-(2^(b-1)-1)) * scale_table[b].",
            inputs=_WEIGHT_INPUTS, outputs=[_F("y", "T", "output")], type_constraints=_FLOAT_T,
            attributes=[_A("strides", _INTS, "as Conv", required=False),
                        _A("pads", _INTS, "as Conv", required=False),
                        _A("dilations", _INTS, "as Conv", required=False),
                        _A("group", onnx.helper.make_attribute("group", 1), "as Conv")],
        ),
        OpSchema(
            "DynQGemm", DOMAIN, VERSION,
            "y = x @ w_b^T + bias with w_b requantised to bits[n] bits per sample (see DynQConv).",
            inputs=_WEIGHT_INPUTS, outputs=[_F("y", "T", "output [N, O]")], type_constraints=_FLOAT_T,
        ),
    ]


def _infer_same(ctx) -> None:
    ctx.set_output_type(0, ctx.get_input_type(0))


def _infer_float_rank(ctx) -> None:
    t = onnx.TypeProto()
    t.tensor_type.elem_type = TensorProto.FLOAT
    src = ctx.get_input_type(0)
    if src.tensor_type.HasField("shape"):
        rank = len(src.tensor_type.shape.dim)
        dims = t.tensor_type.shape.dim
        for i in range(rank):
            d = dims.add()
            if i == 0:
                d.CopyFrom(src.tensor_type.shape.dim[0])
    ctx.set_output_type(0, t)


def _infer_bitselect(ctx) -> None:
    src = ctx.get_input_type(0)
    n = src.tensor_type.shape.dim[0] if src.tensor_type.HasField("shape") and src.tensor_type.shape.dim else None
    cfg = onnx.TypeProto()
    cfg.tensor_type.elem_type = TensorProto.INT64
    d = cfg.tensor_type.shape.dim.add()
    if n is not None:
        d.CopyFrom(n)
    bits = onnx.TypeProto()
    bits.tensor_type.elem_type = TensorProto.FLOAT
    d0 = bits.tensor_type.shape.dim.add()
    if n is not None:
        d0.CopyFrom(n)
    table = ctx.get_input_type(5)
    d1 = bits.tensor_type.shape.dim.add()
    if table.tensor_type.HasField("shape") and len(table.tensor_type.shape.dim) == 2:
        d1.CopyFrom(table.tensor_type.shape.dim[1])
    ctx.set_output_type(0, cfg)
    ctx.set_output_type(1, bits)


_INFER = {"BitSelect": _infer_bitselect, "DynQuant": _infer_same,
          "DynQConv": _infer_float_rank, "DynQGemm": _infer_float_rank}


def register() -> None:
    """Register the schemas with onnx (once per process)."""
    global _registered
    if _registered:
        return
    for schema in _schemas():
        try:
            onnx.defs.get_schema(schema.name, VERSION, DOMAIN)
            continue  # already known to this process
        except onnx.defs.SchemaError:
            pass
        try:
            schema.set_type_and_shape_inference_function(_INFER[schema.name])
        except Exception:  # older onnx: no Python inference functions, checker still accepts the op
            pass
        onnx.defs.register_schema(schema)
    _registered = True
