"""The load pass: the model (never the caller's object), the input assumed, the layers found, and what
the summary counts against (MACs, parameters and bytes as loaded)."""

from __future__ import annotations

import onnx_ir as ir

from .. import graph as G
from .. import ingest, inputs
from ..compress import Context, weight_bytes
from ..errors import NotCompressible, UserError
from ..recipe import Recipe
from .measure import MEASURE_BYTES


def load(ctx: Context, source) -> None:
    """The model (never the caller's object), the input assumed (recorded in the recipe),
    the layers found, and what the summary counts against: MACs, params and bytes as loaded."""
    ctx.progress("load", 0, 1)
    model = ingest.load(source)
    if ingest.is_quantized(model):
        raise UserError("model is already quantized (it has QuantizeLinear/DequantizeLinear or integer ops): "
                        "compress its float export instead")
    half = [v.name for v in [*model.graph.inputs, *model.graph.outputs]
            if v.dtype in (ir.DataType.FLOAT16, ir.DataType.BFLOAT16)]
    if half:
        raise UserError(f"model computes in 16-bit floats (input/output {half[0]!r}): compress its float32 export")
    spec = input_spec(model, ctx.input_shape, ctx.recipe)
    if spec is not None:   # the choice is part of the recipe: the recipe in the metadata reproduces it
        ctx.recipe = ctx.recipe.replace(input_shape=list(spec.shape),
                                        input_range=spec.convention.name if spec.convention is not None else None)
    analysis = G.analyse(model)
    if not analysis.layers:
        raise NotCompressible("nothing to compress: no Conv/ConvTranspose/Gemm/MatMul with constant weights"
                              + (f" ({'; '.join(f'{k}: {v}' for k, v in analysis.skipped.items())})"
                                 if analysis.skipped else ""))
    ctx.progress("load", 1, 1)
    ctx.model, ctx.spec, ctx.analysis = model, spec, analysis
    if (ctx.measure or ctx.recipe.latency is not None) and spec is not None and weight_bytes(model) <= MEASURE_BYTES:
        ctx.float_bytes = ir.to_proto(model).SerializeToString()    # the float model, as the measure pass times it
    ctx.positions = positions_at(model, spec, analysis)
    ctx.before = {l.name: (l.out_channels, l.macs(ctx.positions), l.params(), l.op, l.kind) for l in analysis.layers}
    ctx.macs_before = sum(m for _, m, *_ in ctx.before.values() if m is not None)
    ctx.bytes_before = weight_bytes(model)
    ctx.moments = {l.name: l.preact_moments() for l in analysis.layers}
    summary = ctx.summary
    summary.skipped = {g.name: g.reason for g in analysis.groups if g.reason} | analysis.skipped
    if spec is not None:
        summary.headline.append(spec.summary_line())
        summary.inputs = inputs.describe(spec)
    summary.notes.extend(uncompressed_constants(model, analysis, ctx.bytes_before))
    summary.notes.extend(f"recipe layer pattern {pat!r} matches no layer (the names are in the table)"
                         for pat in ctx.recipe.unmatched_patterns([l.name for l in analysis.layers]))


def input_spec(model: ir.Model, input_shape, recipe: Recipe):
    """The input size and range assumed (:mod:`.inputs`); None for inputs that are not one
    float tensor of known rank (token ids, several inputs: they are probed as before)."""
    single = len(model.graph.inputs) == 1 and model.graph.inputs[0].dtype in (None, ir.DataType.FLOAT)
    if not single:
        if input_shape is not None:    # still checked: a shape that cannot fit is an error
            from ..synth import sample_shape

            sample_shape(model, input_shape)
        return None
    try:
        return inputs.resolve(model, input_shape, recipe.input_range, recipe.seed)
    except UserError:
        if input_shape is not None or recipe.input_range is not None:
            raise
        return None


def positions_at(model: ir.Model, spec, analysis: G.Analysis) -> dict[str, int]:
    """Output positions per sample of the layers whose shapes are symbolic, at the input size
    assumed (a copy with that size fixed, shapes inferred): MACs are counted at it."""
    if spec is None or all(l.spatial_out() is not None for l in analysis.layers):
        return {}
    proto = ir.serde.serialize_model(model)
    dims = proto.graph.input[0].type.tensor_type.shape.dim
    for d, n in zip(list(dims)[1:], spec.shape):
        d.Clear()
        d.dim_value = int(n)
    try:
        static = ingest.normalize(ir.serde.deserialize_model(proto))
    except Exception:    # counting MACs is never worth failing over: they stay unknown
        return {}
    return {l.name: s for l in G.analyse(static).layers if (s := l.spatial_out()) is not None}


def uncompressed_constants(model: ir.Model, analysis: G.Analysis, total: int, share: float = 0.01) -> list[str]:
    """A note naming the large float constants no layer reads as weights (embedding tables,
    positional encodings, ...): they stay float, and together hold ``share`` or more of the bytes."""
    layer_inputs = {id(v) for l in analysis.layers for v in l.node.inputs[1:] if v is not None} | \
                   {id(v) for l in analysis.layers if l.bn is not None for v in l.bn.inputs[1:]}
    left = [(v.name, v.const_value.nbytes, [u.node.op_type for u in v.uses()])
            for v in model.graph.initializers.values()
            if v.const_value is not None and id(v) not in layer_inputs and v.dtype in (ir.DataType.FLOAT, ir.DataType.DOUBLE)
            and v.const_value.size >= 1024]
    size = sum(b for _, b, _ in left)
    if not left or size < share * max(total, 1):
        return []
    left.sort(key=lambda t: -t[1])
    shown = ", ".join(f"{n!r} ({'/'.join(sorted(set(ops))) or 'unused'}, {b / 1024:.0f} KiB)" for n, b, ops in left[:3])
    return [f"float constants no layer reads as weights stay float ({size / 1024:.0f} KiB, "
            f"{100 * size / max(total, 1):.0f} % of the weights): {shown}" + (", ..." if len(left) > 3 else "")]
