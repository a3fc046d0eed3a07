"""The passes ``compress()`` runs, in order, over one :class:`compress.Context`.

    load → synthetic → opset → prune → fold → quantize → activation floor → write → measure   (STATIC)
    load → synthetic → opset → prune → fold → dynamic → measure                                (DYNAMIC)

Each pass reads what the ones before it left in the context and adds its own; the
runner (``compress.compress``) times each under its name.  What a pass leaves alone
and why goes into the summary: its headline for what matters first (input assumed,
image route, activations kept float), its notes for the rest.
"""

from __future__ import annotations

import json

import numpy as np
import onnx_ir as ir

from . import graph as G
from . import ingest, inputs
from .compress import (ROUTES, Context, LayerRow, _activation_floor, _augmentable, _fitting_set, _input_spec,
                       _layer_input_name, _macs, _macs_after, _needs_images, _needs_opset21, _params_after,
                       _positions, _probe_images, _refresh_shapes, _uncompressed_constants, _upgrade,
                       fitting_work, weight_bytes)
from .errors import CannotSynthesise, NotCompressible, UserError
from .passes import fold, qdq
from .passes.closed_form import activation_ranges_closed_form, quantize_closed_form
from .passes.planning import _alignment_note, _kept_channels, _regions, plan_pruning, prune_group
from .passes.shortcut import ShortcutAsConvPass
from .recipe import LAYERS_KEY


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
    spec = _input_spec(model, ctx.input_shape, ctx.recipe)
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
    if ctx.measure and spec is not None and weight_bytes(model) <= MEASURE_BYTES:
        ctx.float_bytes = ir.to_proto(model).SerializeToString()    # the float model, as the measure pass times it
    ctx.positions = _positions(model, spec, analysis)
    ctx.before = {l.name: (l.out_channels, _macs(l, ctx.positions), l.params(), l.op, l.kind) for l in analysis.layers}
    ctx.macs_before = sum(m for _, m, *_ in ctx.before.values() if m is not None)
    ctx.bytes_before = weight_bytes(model)
    ctx.moments = {l.name: l.preact_moments() for l in analysis.layers}
    summary = ctx.summary
    summary.skipped = {g.name: g.reason for g in analysis.groups if g.reason} | analysis.skipped
    if spec is not None:
        summary.headline.append(spec.summary_line())
        summary.inputs = inputs.describe(spec)
    summary.notes.extend(_uncompressed_constants(model, analysis, ctx.bytes_before))
    summary.notes.extend(f"recipe layer pattern {pat!r} matches no layer (the names are in the table)"
                         for pat in ctx.recipe.unmatched_patterns([l.name for l in analysis.layers]))


def synthesise(ctx: Context) -> None:
    """Synthetic images (or the caller's), when anything is fitted on them; the fitting set
    (mirrored and shifted copies, thinned to what memory holds)."""
    recipe, summary, spec = ctx.recipe, ctx.summary, ctx.spec
    n_synthetic, ctx.joint_steps, budget_note = fitting_work(recipe, ctx.macs_before)
    wants_fit = n_synthetic > 0 and _needs_images(recipe, ctx.analysis.layers)
    if n_synthetic > 0 and not wants_fit and ctx.caller_images is None:
        summary.headline.append("weights of 8 bits and more only: rounded to nearest, no synthetic images needed "
                                "(fitting them on synthetic images lost more on real photos than rounding does)")
    if wants_fit and ctx.caller_images is not None:
        from .synth import SyntheticSet

        images = ctx.caller_images
        ctx.synthetic = SyntheticSet(images=np.ascontiguousarray(images, dtype=np.float32),
                                     targets=np.zeros((len(images), 0), np.float32), source="caller",
                                     seed=recipe.seed)
    elif wants_fit:
        from .synth import generate

        try:
            ctx.synthetic = generate(ctx.model, n_synthetic, steps=recipe.synthetic_steps, seed=recipe.seed,
                                     input_shape=spec.shape if spec is not None else ctx.input_shape,
                                     convention=spec.convention if spec is not None else None,
                                     route=recipe.synthetic_route, progress=ctx.progress)
        except CannotSynthesise as exc:
            if recipe.dynamic is not None:
                raise UserError(f"dynamic precision needs synthetic images: {exc}") from None
            summary.headline.append(f"no synthetic images ({exc}): closed form used")
    synthetic = ctx.synthetic
    if synthetic is None:
        return
    summary.headline.append((f"{len(synthetic.images)} images given by the caller" if synthetic.source == "caller"
                             else f"{n_synthetic} synthetic images: {ROUTES.get(synthetic.source, synthetic.source)}")
                            + (", fitted with mirrored and shifted copies"
                               if _augmentable(synthetic.images, recipe) else ""))
    fit_images = _fitting_set(synthetic.images, recipe)
    from .passes.fit import fitting_budget

    fitted = fitting_budget(ctx.model, ctx.analysis.layers, fit_images)
    if len(fitted) < len(fit_images):
        summary.notes.append(f"fitting on {len(fitted)} of {len(fit_images)} images: the largest layer "
                             "input over all of them would not fit in memory")
        fit_images = fitted
    if budget_note and synthetic.source != "caller":
        summary.notes.append(budget_note)
    ctx.fit_images = fit_images


def upgrade_opset(ctx: Context) -> None:
    """INT4 tensors and 4-bit activations need opset 21 (after generation, so the image
    cache is keyed by the user's model)."""
    if _needs_opset21(ctx.recipe, ctx.analysis.layers) and ingest.opset_of(ctx.model) < 21:
        ctx.model = _upgrade(ctx.model, 21)
        ctx.analysis = G.analyse(ctx.model)


def prune(ctx: Context) -> None:
    """The float reference kept, then channels chosen (by output error on the images where
    there are some) and removed with compensation in the next layers."""
    recipe, analysis, summary = ctx.recipe, ctx.analysis, ctx.summary
    if ctx.synthetic is not None or (recipe.abits is not None and recipe.max_activation_loss is not None):
        ctx.reference = ingest.to_ir(ctx.model)           # the float model, before any change
    output_stats = None
    if ctx.synthetic is not None and recipe.criterion in ("auto", "output") and \
            any(recipe.for_layer(g.name).prune for g in analysis.prunable):
        from .passes.fit import consumer_statistics

        output_stats = consumer_statistics(ctx.model, analysis.prunable, ctx.fit_images, analysis.layers)
    elif recipe.criterion == "output":
        summary.notes.append("criterion 'output' needs synthetic images: l1 used instead")
    ctx.plans = plan_pruning(analysis, recipe, output_stats)
    for i, plan in enumerate(ctx.plans):
        ctx.progress("prune", i, len(ctx.plans))
        prune_group(plan, recipe, ctx.moments, summary)
    ctx.progress("prune", len(ctx.plans), len(ctx.plans))
    summary.notes.extend(_alignment_note(ctx.plans))


def fold_bn(ctx: Context) -> None:
    """BatchNormalization folded into the layers, in the model and in its float reference."""
    for layer in ctx.analysis.layers:
        fold.fold_batchnorm(layer)
    _refresh_shapes(ctx.model)
    if ctx.reference is not None:
        for layer in G.analyse(ctx.reference).layers:
            fold.fold_batchnorm(layer)


def quantize(ctx: Context) -> None:
    """Weights and activation ranges: fitted layer by layer on the images, else the closed form."""
    recipe, analysis = ctx.recipe, ctx.analysis
    if ctx.synthetic is not None:
        from .passes.fit import fit_sequential

        ctx.weights, ctx.acts = fit_sequential(ctx.model, ctx.reference, analysis.layers, ctx.fit_images, recipe,
                                               progress=ctx.progress, kept=_kept_channels(ctx.plans),
                                               regions=_regions(ctx.plans), joint_steps=ctx.joint_steps,
                                               notes=ctx.summary.notes)
    else:
        ctx.weights = quantize_closed_form(analysis.layers, recipe, ctx.moments, ctx.progress, analysis.prunable)
        ctx.acts = activation_ranges_closed_form(ctx.model, analysis.layers, recipe, ctx.moments,
                                                 _probe_images(ctx.spec, recipe))


def activation_floor(ctx: Context) -> None:
    """Activations whose quantization costs too much stay float (passes/floor.py)."""
    ctx.acts = _activation_floor(ctx.model, ctx.reference, ctx.analysis.layers, ctx.acts, ctx.spec,
                                 ctx.synthetic, ctx.recipe, ctx.summary, ctx.progress)


def write(ctx: Context) -> None:
    """Q/DQ written, shortcuts as selection convs, the per-layer rows and bits in the metadata."""
    model, recipe, summary, weights, acts = ctx.model, ctx.recipe, ctx.summary, ctx.weights, ctx.acts
    qdq.emit(model, ctx.analysis.layers, weights, acts, int4=recipe.int4)
    ShortcutAsConvPass()(model)
    _refresh_shapes(model)
    if any(a is not None and a.bits < 8 for a in acts.values()):
        summary.notes.append("activations below 8 bits: onnxruntime's CPU has no integer kernel for them and "
                             "dequantizes those layers' weights on every run unless the session config entry "
                             "session.disable_quant_qdq=1 folds them at load (datafree.runtime sets it when no "
                             "layer runs on integer kernels)")
    per_layer = {}
    for layer in ctx.analysis.layers:
        eff = recipe.for_layer(layer.name, layer.kind)
        wq = weights.get(layer.name)
        in_name = _layer_input_name(layer)
        aq = acts.get(in_name) if in_name else None
        per_layer[layer.name] = {"wbits": wq.bits if wq else None, "abits": aq.bits if aq else None,
                                 "channels": layer.out_channels}
        ch0, m0, p0, op, kind = ctx.before[layer.name]
        summary.rows.append(LayerRow(
            name=layer.name, op=op, kind=kind, channels_before=ch0, channels_after=layer.out_channels,
            wbits=wq.bits if wq else None, abits=aq.bits if aq else None,
            macs_before=m0, macs_after=_macs_after(layer, m0, ctx.before, ctx.positions), params_before=p0,
            params_after=_params_after(layer, wq), note="skipped by recipe" if eff.skip else ""))
    raised = [l for l in ctx.analysis.layers if weights.get(l.name) is not None and recipe.wbits is not None
              and l.kind == "depthwise" and weights[l.name].bits > recipe.wbits]
    if raised:
        summary.notes.append(f"{len(raised)} depthwise layers keep {recipe.depthwise_wbits}-bit weights: their "
                             "small filters lose the most at fewer bits and hold few of the model's weights "
                             "(depthwise_wbits in a recipe, --depthwise-wbits, to change it)")
    model.metadata_props[LAYERS_KEY] = json.dumps(per_layer, sort_keys=True)


def dynamic(ctx: Context) -> None:
    """Dynamic precision: refit what pruning changed (in float), then the selector pass."""
    from .passes.dynamic import apply_dynamic

    if ctx.synthetic is not None and ctx.plans:
        from .passes.fit import fit_sequential

        fit_sequential(ctx.model, ctx.reference, ctx.analysis.layers, ctx.fit_images,
                       ctx.recipe.replace(wbits=None, abits=None, layers={}), progress=ctx.progress,
                       kept=_kept_channels(ctx.plans), regions=_regions(ctx.plans), joint_steps=ctx.joint_steps)
    before = ctx.before
    for layer in ctx.analysis.layers:
        ctx.summary.rows.append(LayerRow(
            name=layer.name, op=before[layer.name][3], kind=before[layer.name][4],
            channels_before=before[layer.name][0], channels_after=layer.out_channels, wbits=None, abits=None,
            macs_before=before[layer.name][1],
            macs_after=_macs_after(layer, before[layer.name][1], before, ctx.positions),
            params_before=before[layer.name][2], params_after=layer.params(), note="dynamic"))
    ctx.model, ctx.summary.dynamic = apply_dynamic(ctx.model, ctx.recipe.dynamic, synthetic=ctx.synthetic,
                                                   progress=ctx.progress, seed=ctx.recipe.seed,
                                                   augment=ctx.recipe.augment)


def measure_speed(ctx: Context) -> None:
    """Float and compressed model timed in a plain onnxruntime session (passes/speed.py):
    the ratios go into the headline and ``summary.speed``; why not, where they cannot be had."""
    if not ctx.measure:
        return
    if ctx.float_bytes is None or len(ctx.model.graph.inputs) != 1:
        reason = ("the model's input is not one float tensor of known size" if ctx.spec is None
                  or len(ctx.model.graph.inputs) != 1 else f"over {MEASURE_BYTES >> 20} MiB of weights")
        ctx.summary.notes.append(f"speed not measured: {reason}")
        return
    from .passes import speed

    ctx.progress("measure", 0, 1)
    value = ctx.model.graph.inputs[0]
    batch = value.shape[0] if value.shape is not None and len(value.shape) else None
    try:
        result = speed.measure(ctx.float_bytes, ir.to_proto(ctx.model).SerializeToString(), ctx.spec.shape,
                               fixed_batch=batch if isinstance(batch, int) else None)
    except Exception as exc:  # noqa: BLE001 -- onnxruntime refusing to time a model is a note, not a failure
        ctx.summary.notes.append(f"speed not measured: onnxruntime could not run the models here "
                                 f"({str(exc).strip().splitlines()[0][:160]})")
    else:
        ctx.summary.speed = result.to_dict()
        ctx.summary.headline.append(result.line())
    ctx.float_bytes = None
    ctx.progress("measure", 1, 1)


MEASURE_BYTES = 1 << 30   # larger models are not timed: two sessions of them would not fit many machines


_COMMON = [("synthetic", synthesise), ("opset", upgrade_opset), ("prune", prune), ("fold", fold_bn)]
STATIC = [*_COMMON, ("quantize", quantize), ("activation floor", activation_floor), ("write", write),
          ("measure", measure_speed)]
DYNAMIC = [*_COMMON, ("dynamic", dynamic), ("measure", measure_speed)]
