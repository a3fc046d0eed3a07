"""The dynamic pass: dynamic precision, after refitting what pruning changed (in float)."""

from __future__ import annotations

from ..compress import Context, LayerRow
from ..passes.planning import kept_channels, pruned_regions
from .quantize import macs_after


def dynamic(ctx: Context) -> None:
    """Dynamic precision: refit what pruning changed (in float), then the selector pass."""
    from ..passes.dynamic import apply_dynamic

    if ctx.synthetic is not None and ctx.plans:
        from ..passes.fit import fit_sequential

        fit_sequential(ctx.model, ctx.reference, ctx.analysis.layers, ctx.fit_images,
                       ctx.recipe.replace(wbits=None, abits=None, layers={}), progress=ctx.progress,
                       kept=kept_channels(ctx.plans), regions=pruned_regions(ctx.plans), joint_steps=ctx.joint_steps)
    before = ctx.before
    for layer in ctx.analysis.layers:
        ctx.summary.rows.append(LayerRow(
            name=layer.name, op=before[layer.name][3], kind=before[layer.name][4],
            channels_before=before[layer.name][0], channels_after=layer.out_channels, wbits=None, abits=None,
            macs_before=before[layer.name][1],
            macs_after=macs_after(layer, before[layer.name][1], before, ctx.positions),
            params_before=before[layer.name][2], params_after=layer.params(), note="dynamic"))
    ctx.model, ctx.summary.dynamic = apply_dynamic(ctx.model, ctx.recipe.dynamic, synthetic=ctx.synthetic,
                                                   progress=ctx.progress, seed=ctx.recipe.seed,
                                                   augment=ctx.recipe.augment, positions=ctx.positions)
