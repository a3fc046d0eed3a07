"""The opset, prune and fold passes: opset 21 where INT4 needs it, channels chosen and removed with
compensation in the next layers, BatchNormalization folded."""

from __future__ import annotations

import onnx_ir as ir

from .. import graph as G
from .. import ingest
from ..compress import Context
from ..passes import fold
from ..passes.planning import alignment_note, plan_pruning, prune_group
from ..recipe import Recipe


def upgrade_opset(ctx: Context) -> None:
    """INT4 tensors and 4-bit activations need opset 21 (after generation, so the image
    cache is keyed by the user's model)."""
    if _needs_opset21(ctx.recipe, ctx.analysis.layers) and ingest.opset_of(ctx.model) < 21:
        ctx.model = _upgrade(ctx.model, 21)
        ctx.analysis = G.analyse(ctx.model)


def _needs_opset21(recipe: Recipe, layers: list[G.Layer]) -> bool:
    for layer in layers:
        eff = recipe.for_layer(layer.name, layer.kind)
        if eff.skip:
            continue
        if eff.abits is not None and eff.abits <= 4:
            return True
        if recipe.int4 and eff.wbits is not None and eff.wbits <= 4:
            return True
    return False


def _upgrade(model: ir.Model, target: int) -> ir.Model:
    proto = ingest.upgrade_opset(ir.serde.serialize_model(model), target)
    return ingest.normalize(ir.serde.deserialize_model(proto))


def prune(ctx: Context) -> None:
    """The float reference kept, then channels chosen (by output error on the images where
    there are some) and removed with compensation in the next layers."""
    recipe, analysis, summary = ctx.recipe, ctx.analysis, ctx.summary
    if ctx.synthetic is not None or (recipe.abits is not None and recipe.max_activation_loss is not None):
        ctx.reference = ingest.to_ir(ctx.model)           # the float model, before any change
    output_stats = None
    if ctx.synthetic is not None and recipe.criterion in ("auto", "output") and \
            any(recipe.for_layer(g.name).prune for g in analysis.prunable):
        from ..passes.fit import consumer_statistics

        output_stats = consumer_statistics(ctx.model, analysis.prunable, ctx.fit_images, analysis.layers)
    elif recipe.criterion == "output":
        summary.notes.append("criterion 'output' needs synthetic images: l1 used instead")
    ctx.plans = plan_pruning(analysis, recipe, output_stats, ctx.positions,
                             progress=lambda i, n: ctx.progress("order channels", i, n))
    for i, plan in enumerate(ctx.plans):
        ctx.progress("prune", i, len(ctx.plans))
        prune_group(plan, recipe, ctx.moments, summary)
    ctx.progress("prune", len(ctx.plans), len(ctx.plans))
    summary.notes.extend(alignment_note(ctx.plans))


def fold_bn(ctx: Context) -> None:
    """BatchNormalization folded into the layers, in the model and in its float reference."""
    for layer in ctx.analysis.layers:
        fold.fold_batchnorm(layer)
    refresh_shapes(ctx.model)
    if ctx.reference is not None:
        for layer in G.analyse(ctx.reference).layers:
            fold.fold_batchnorm(layer)


def refresh_shapes(model: ir.Model) -> None:
    """Drop stale intermediate shapes (channels changed) and infer them again."""
    for node in model.graph:
        for v in node.outputs:
            if not v.is_graph_output():
                v.shape = None
    ingest.infer_shapes(model)
