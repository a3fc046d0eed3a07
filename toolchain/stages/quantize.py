"""The quantize, activation floor and write passes: weights and activation ranges (fitted on the
images, else the closed form), the activations that cost too much kept float, Q/DQ written."""

from __future__ import annotations

import json

import numpy as np
import onnx_ir as ir

from .. import graph as G
from ..compress import Context, LayerRow, Summary
from ..errors import UserError
from ..passes import qdq
from ..passes.closed_form import activation_ranges_closed_form, quantize_closed_form
from ..passes.planning import kept_channels, pruned_regions
from ..passes.hard_gates import REFUSED_FLOAT_INPUT, IntegerHardGatesPass
from ..passes.shortcut import ShortcutAsConvPass
from ..progress import ProgressFn
from ..recipe import LAYERS_KEY, Recipe
from .prune import refresh_shapes


def quantize(ctx: Context) -> None:
    """Weights and activation ranges: fitted layer by layer on the images, else the closed form."""
    recipe, analysis = ctx.recipe, ctx.analysis
    if ctx.synthetic is not None:
        from ..passes.fit import fit_sequential

        ctx.weights, ctx.acts = fit_sequential(ctx.model, ctx.reference, analysis.layers, ctx.fit_images, recipe,
                                               progress=ctx.progress, kept=kept_channels(ctx.plans),
                                               regions=pruned_regions(ctx.plans), joint_steps=ctx.joint_steps,
                                               notes=ctx.summary.notes)
    else:
        ctx.weights = quantize_closed_form(analysis.layers, recipe, ctx.moments, ctx.progress, analysis.prunable)
        ctx.acts = activation_ranges_closed_form(ctx.model, analysis.layers, recipe, ctx.moments,
                                                 probe_images(ctx.spec, recipe))


def activation_floor(ctx: Context) -> None:
    """Activations whose quantization costs too much stay float (passes/floor.py)."""
    ctx.acts = _activation_floor(ctx.model, ctx.reference, ctx.analysis.layers, ctx.acts, ctx.spec,
                                 ctx.synthetic, ctx.recipe, ctx.summary, ctx.progress)


def _activation_floor(model: ir.Model, reference, layers: list[G.Layer], acts: dict, spec, synthetic,
                      recipe: Recipe, summary: Summary, progress: ProgressFn) -> dict:
    """:func:`passes.floor.activation_floor` on held-out procedural photographs (images the
    fit never saw; the synthetic images themselves for inputs that are not images)."""
    if not acts or recipe.max_activation_loss is None or reference is None:
        return acts
    from .. import natural

    images = probe_images(spec, recipe.replace(seed=recipe.seed + 1), n=16, soft_share=natural.SOFT_SHARE)
    if images is None and synthetic is not None and synthetic.images.ndim >= 2:
        images = synthetic.images[:16]
    if images is None:
        return acts
    from ..passes.floor import activation_floor

    try:
        res = activation_floor(model, reference, layers, acts, images, loss_db=recipe.max_activation_loss,
                               progress=progress)
    except UserError as exc:   # the model cannot be run in torch here: ranges kept as they are
        summary.headline.append(f"activation floor not applied: {exc}; every activation range kept as fitted")
        return acts
    if res.note():
        summary.headline.append(res.note())
    summary.inputs["activation_sqnr_db"] = {"weights_only": round(res.weights_db, 2),
                                            "all_quantized": round(res.before_db, 2),
                                            "kept": round(res.after_db, 2), "target": round(res.target_db, 2)}
    return res.acts


def probe_images(spec, recipe: Recipe, n: int = 32, soft_share: float = 0.0) -> np.ndarray | None:
    """Procedural photographs in the input's range, for image inputs (None otherwise);
    ``soft_share`` of them soft (:mod:`.natural`)."""
    if spec is None or spec.convention is None:
        return None
    from .. import natural

    return spec.convention.apply(natural.images(n, spec.shape, recipe.seed, soft_share=soft_share))


def write(ctx: Context) -> None:
    """Q/DQ written, shortcuts as selection convs, HardSigmoid / HardSwish on integer kernels, the
    per-layer rows and bits in the metadata."""
    model, recipe, summary, weights, acts = ctx.model, ctx.recipe, ctx.summary, ctx.weights, ctx.acts
    pointed = [l for l in ctx.analysis.layers if recipe.integer_kernels and l.act and
               any(v.name in acts for v in qdq.kernel_points(l))]
    if pointed:
        kinds = sorted({l.act_type for l in pointed})
        summary.notes.append(f"{len(pointed)} layers before {', '.join(kinds)} also quantize their output (8 bits) "
                             "so that onnxruntime runs them on integer kernels (--no-integer-kernels keeps them float: "
                             "one rounding fewer, slower)")
    reduced = [l for l in ctx.analysis.layers if weights.get(l.name) is not None and
               weights[l.name].bits < (recipe.for_layer(l.name, l.kind).wbits or 0)]
    if reduced:
        summary.notes.append(f"8-bit weights of {len(reduced)} layers whose inputs are quantized keep to +-63, "
                             "fitted there: x86 CPUs without VNNI (AVX2) saturate larger u8 x s8 pair sums in "
                             "onnxruntime (its depthwise kernel does not: those keep +-127; --no-reduce-range for "
                             "ARM or VNNI targets only; --abits 7 keeps +-127 instead, its inputs in 0..127 cannot "
                             "saturate: better where weights matter more, e.g. a text recogniser)")
    qdq.emit(model, ctx.analysis.layers, weights, acts, int4=recipe.int4)
    ShortcutAsConvPass()(model)
    if recipe.integer_kernels and acts:
        _hard_gates(model, summary)
    refresh_shapes(model)
    per_layer = {}
    for layer in ctx.analysis.layers:
        eff = recipe.for_layer(layer.name, layer.kind)
        wq = weights.get(layer.name)
        in_name = layer_input_name(layer)
        aq = acts.get(in_name) if in_name else None
        wbits = None if wq is None else max(wq.bits, eff.wbits or 0)    # 8 where kept to +-63 (reduce_range)
        per_layer[layer.name] = {"wbits": wbits, "abits": aq.bits if aq else None,
                                 "channels": layer.out_channels}
        ch0, m0, p0, op, kind = ctx.before[layer.name]
        summary.rows.append(LayerRow(
            name=layer.name, op=op, kind=kind, channels_before=ch0, channels_after=layer.out_channels,
            wbits=wbits, abits=aq.bits if aq else None,
            macs_before=m0, macs_after=macs_after(layer, m0, ctx.before, ctx.positions), params_before=p0,
            params_after=params_after(layer, wq), note="skipped by recipe" if eff.skip else ""))
    raised = [l for l in ctx.analysis.layers if weights.get(l.name) is not None and recipe.wbits is not None
              and l.kind == "depthwise" and weights[l.name].bits > recipe.wbits]
    if raised:
        summary.notes.append(f"{len(raised)} depthwise layers keep {recipe.depthwise_wbits}-bit weights: their "
                             "small filters lose the most at fewer bits and hold few of the model's weights "
                             "(depthwise_wbits in a recipe, --depthwise-wbits, to change it)")
    model.metadata_props[LAYERS_KEY] = json.dumps(per_layer, sort_keys=True)


def _hard_gates(model: ir.Model, summary: Summary) -> None:
    """HardSigmoid / HardSwish between quantized tensors as integer Add and Mul (passes/hard_gates.py)."""
    gates = IntegerHardGatesPass()
    gates(model)
    if gates.rewritten:
        summary.notes.append(f"{len(gates.rewritten)} HardSigmoid / HardSwish run as onnxruntime's integer Add and "
                             "Mul (it has no integer kernel for them; --no-integer-kernels keeps them float)")
    left: dict[str, list[str]] = {}
    for name, why in gates.refused.items():
        if why != REFUSED_FLOAT_INPUT:           # activations left float there: nothing to say
            left.setdefault(why, []).append(name)
    for why, nodes in left.items():
        summary.notes.append(f"{len(nodes)} HardSigmoid / HardSwish stay float ({', '.join(nodes[:3])}"
                             f"{', ...' if len(nodes) > 3 else ''}): {why}")


def layer_input_name(layer: G.Layer) -> str | None:
    x = layer.node.inputs[0]
    p = x.producer()
    if p is not None and p.op_type == "DequantizeLinear":
        q = p.inputs[0].producer()
        if q is not None and q.op_type == "Clip":          # an activation narrower than 8 bits
            q = q.inputs[0].producer()
        x = q.inputs[0]
    return x.name


def macs_after(layer: G.Layer, macs_before: int | None, before, positions: dict[str, int]) -> int | None:
    m = layer.macs(positions)
    if m is not None:
        return m
    if macs_before is None:
        return None
    ch0 = before[layer.name][0]
    return int(macs_before * layer.out_channels / ch0)  # shapes unknown: scale by kept channels


def params_after(layer: G.Layer, wq) -> int:
    if wq is not None:
        n = int(wq.q.size)
        b = layer.node.inputs[2] if len(layer.node.inputs) > 2 else None
        return n + (0 if b is None else int(np.prod(b.shape.dims)) if b.shape is not None else 0)
    return layer.params()
