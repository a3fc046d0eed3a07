"""compress(): the library entry point behind ``datafree compress`` and the export pipeline.

    from datafree.toolchain.compress import compress
    from datafree.toolchain.recipe import Recipe
    result = compress("model.onnx", Recipe(prune=0.3, wbits=4, abits=8))
    result.model      # onnx_ir.Model, ready for exporters.writer.save
    result.summary    # per-layer table, totals, skipped layers with reasons

The steps, each a small pass over matched layers (``passes/``):
ingest → analyse → [synthetic images] → prune (+ compensation) → fold BN →
quantize weights (+ corrections) → activation ranges → QDQ → metadata.
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass, field

import numpy as np
import onnx_ir as ir

from . import graph as G
from . import ingest, inputs
from .errors import CannotSynthesise, NotCompressible, UserError
from .passes import fold, qdq
from .passes.closed_form import activation_ranges_closed_form, quantize_closed_form
from .passes.planning import _alignment_note, _kept_channels, _regions, plan_pruning, prune_group  # noqa: F401
from .passes.shortcut import ShortcutAsConvPass
from .progress import ProgressFn, silent
from .recipe import LAYERS_KEY, METADATA_KEY, Recipe

VERSION_KEY = "datafree.version"


@dataclass
class LayerRow:
    name: str
    op: str
    kind: str
    channels_before: int
    channels_after: int
    wbits: int | None
    abits: int | None
    macs_before: int | None
    macs_after: int | None
    params_before: int
    params_after: int
    note: str = ""


@dataclass
class Summary:
    rows: list[LayerRow] = field(default_factory=list)
    skipped: dict[str, str] = field(default_factory=dict)      # layer -> why it was not pruned
    totals: dict[str, float] = field(default_factory=dict)     # params/macs/bytes before and after
    timings: dict[str, float] = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)
    dynamic: dict = field(default_factory=dict)                # selector statistics (dynamic precision)
    headline: list[str] = field(default_factory=list)          # what matters first: input assumed, image route
    inputs: dict = field(default_factory=dict)                 # the input size and range assumed, and why

    def to_dict(self) -> dict:
        import dataclasses

        return {"layers": [dataclasses.asdict(r) for r in self.rows], "skipped": self.skipped,
                "totals": self.totals, "timings": self.timings, "notes": self.notes,
                "headline": self.headline, "inputs": self.inputs,
                **({"dynamic": self.dynamic} if self.dynamic else {})}


@dataclass
class CompressResult:
    model: ir.Model
    summary: Summary
    recipe: Recipe


# ------------------------------------------------------------------ helpers
ROUTES = {
    "bn-statistics": "optimised to match the model's BatchNormalization statistics and its classes",
    "output-only": "optimised toward the model's classes under image priors (no BatchNormalization statistics)",
    "natural": "procedural photographs in the input's range (no BatchNormalization statistics to match)",
}


def _input_spec(model: ir.Model, input_shape, recipe: Recipe):
    """The input size and range assumed (:mod:`.inputs`); None for inputs that are not one
    float tensor of known rank (token ids, several inputs: they are probed as before)."""
    single = len(model.graph.inputs) == 1 and model.graph.inputs[0].dtype in (None, ir.DataType.FLOAT)
    if not single:
        if input_shape is not None:    # still checked: a shape that cannot fit is an error
            from .synth import sample_shape

            sample_shape(model, input_shape)
        return None
    try:
        return inputs.resolve(model, input_shape, recipe.input_range, recipe.seed)
    except UserError:
        if input_shape is not None or recipe.input_range is not None:
            raise
        return None


def _needs_images(recipe: Recipe, layers: list[G.Layer]) -> bool:
    """Whether anything is fitted on synthetic images: pruning, activation ranges, dynamic
    precision or weights below ``fit.ROUND_BITS`` (8-bit weights alone are rounded to nearest)."""
    from .passes.fit import ROUND_BITS

    if recipe.dynamic is not None:
        return True
    for layer in layers:
        eff = recipe.for_layer(layer.name, layer.kind)
        if eff.skip:
            continue
        if eff.prune or eff.abits is not None or (eff.wbits is not None and eff.wbits < ROUND_BITS):
            return True
    return False


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


def weight_bytes(model: ir.Model) -> int:
    return sum(v.const_value.nbytes for v in model.graph.initializers.values() if v.const_value is not None)


# --------------------------------------------------------------------- main
def compress(source, recipe: Recipe | None = None, *, progress: ProgressFn = silent,
             images: np.ndarray | None = None, input_shape: tuple[int, ...] | None = None) -> CompressResult:
    """Compress ``source`` (path, ModelProto or ir.Model; never modified) as ``recipe`` says.

    ``images``: fit on these (N x input shape, preprocessed) instead of generating
    synthetic images: for measuring the synthetic path against real data, which the
    compressor itself never needs.  ``recipe.synthetic`` must then be > 0.
    ``input_shape``: the input size synthetic images get where the model's is symbolic.
    Where no synthetic images can be made (symbolic size and no ``input_shape``, no BN
    statistics and no class output), the closed form is used and the summary says why.
    """
    recipe = recipe or Recipe()
    t_start = time.perf_counter()
    timings: dict[str, float] = {}
    progress("load", 0, 1)
    model = ingest.load(source)
    if ingest.is_quantized(model):
        raise UserError("model is already quantized (it has QuantizeLinear/DequantizeLinear or integer ops): "
                        "compress its float export instead")
    half = [v.name for v in [*model.graph.inputs, *model.graph.outputs]
            if v.dtype in (ir.DataType.FLOAT16, ir.DataType.BFLOAT16)]
    if half:
        raise UserError(f"model computes in 16-bit floats (input/output {half[0]!r}): compress its float32 export")
    if input_shape is None and recipe.input_shape is not None:
        input_shape = tuple(recipe.input_shape)
    spec = _input_spec(model, input_shape, recipe)
    if spec is not None:   # the choice is part of the recipe: the recipe in the metadata reproduces it
        recipe = recipe.replace(input_shape=list(spec.shape),
                                input_range=spec.convention.name if spec.convention is not None else None)
    analysis = G.analyse(model)
    if not analysis.layers:
        raise NotCompressible("nothing to compress: no Conv/ConvTranspose/Gemm/MatMul with constant weights"
                              + (f" ({'; '.join(f'{k}: {v}' for k, v in analysis.skipped.items())})"
                                 if analysis.skipped else ""))
    timings["load"] = time.perf_counter() - t_start
    progress("load", 1, 1)

    positions = _positions(model, spec, analysis)
    before = {l.name: (l.out_channels, _macs(l, positions), l.params(), l.op, l.kind) for l in analysis.layers}
    macs_before = sum(m for _, m, *_ in before.values() if m is not None)
    bytes_before = weight_bytes(model)
    moments = {l.name: l.preact_moments() for l in analysis.layers}
    summary = Summary(skipped={g.name: g.reason for g in analysis.groups if g.reason} | analysis.skipped)
    if spec is not None:
        summary.headline.append(spec.summary_line())
        summary.inputs = inputs.describe(spec)
    summary.notes.extend(_uncompressed_constants(model, analysis, bytes_before))
    summary.notes.extend(f"recipe layer pattern {pat!r} matches no layer (the names are in the table)"
                         for pat in recipe.unmatched_patterns([l.name for l in analysis.layers]))

    # ---------------------------------------------------------- synthetic images
    t = time.perf_counter()
    synthetic = fit_images = None
    n_synthetic, joint_steps, budget_note = fitting_work(recipe, macs_before)
    wants_fit = n_synthetic > 0 and _needs_images(recipe, analysis.layers)
    if n_synthetic > 0 and not wants_fit and images is None:
        summary.headline.append("weights of 8 bits and more only: rounded to nearest, no synthetic images needed "
                                "(fitting them on synthetic images lost more on real photos than rounding does)")
    if wants_fit and images is not None:
        from .synth import SyntheticSet

        synthetic = SyntheticSet(images=np.ascontiguousarray(images, dtype=np.float32),
                                 targets=np.zeros((len(images), 0), np.float32), source="caller",
                                 seed=recipe.seed)
    elif wants_fit:
        from .synth import generate

        try:
            synthetic = generate(model, n_synthetic, steps=recipe.synthetic_steps, seed=recipe.seed,
                                 input_shape=spec.shape if spec is not None else input_shape,
                                 convention=spec.convention if spec is not None else None,
                                 route=recipe.synthetic_route, progress=progress)
        except CannotSynthesise as exc:
            if recipe.dynamic is not None:
                raise UserError(f"dynamic precision needs synthetic images: {exc}") from None
            summary.headline.append(f"no synthetic images ({exc}): closed form used")
    if synthetic is not None:
        summary.headline.append((f"{len(synthetic.images)} images given by the caller" if synthetic.source == "caller"
                                 else f"{n_synthetic} synthetic images: {ROUTES.get(synthetic.source, synthetic.source)}")
                                + (", fitted with mirrored and shifted copies" if _augmentable(synthetic.images, recipe) else ""))
        fit_images = _fitting_set(synthetic.images, recipe)
        from .passes.fit import fitting_budget

        fitted = fitting_budget(model, analysis.layers, fit_images)
        if len(fitted) < len(fit_images):
            summary.notes.append(f"fitting on {len(fitted)} of {len(fit_images)} images: the largest layer "
                                 "input over all of them would not fit in memory")
            fit_images = fitted
        if budget_note and synthetic.source != "caller":
            summary.notes.append(budget_note)
    timings["synthetic"] = time.perf_counter() - t
    # INT4 tensors need opset 21 (after generation, so its cache key is the user's model)
    if _needs_opset21(recipe, analysis.layers) and ingest.opset_of(model) < 21:
        model = _upgrade(model, 21)
        analysis = G.analyse(model)

    # -------------------------------------------------------------------- prune
    t = time.perf_counter()
    reference = None
    if synthetic is not None or (recipe.abits is not None and recipe.max_activation_loss is not None):
        reference = ingest.to_ir(model)           # the float model, before any change
    output_stats = None
    if synthetic is not None and recipe.criterion in ("auto", "output") and \
            any(recipe.for_layer(g.name).prune for g in analysis.prunable):
        from .passes.fit import consumer_statistics

        output_stats = consumer_statistics(model, analysis.prunable, fit_images, analysis.layers)
    elif recipe.criterion == "output":
        summary.notes.append("criterion 'output' needs synthetic images: l1 used instead")
    plans = plan_pruning(analysis, recipe, output_stats)
    for i, plan in enumerate(plans):
        progress("prune", i, len(plans))
        prune_group(plan, recipe, moments, summary)
    progress("prune", len(plans), len(plans))
    summary.notes.extend(_alignment_note(plans))
    timings["prune"] = time.perf_counter() - t

    # ------------------------------------------------ fold BN, quantize, ranges
    t = time.perf_counter()
    for layer in analysis.layers:
        fold.fold_batchnorm(layer)
    _refresh_shapes(model)
    if reference is not None:
        ref_analysis = G.analyse(reference)
        for layer in ref_analysis.layers:
            fold.fold_batchnorm(layer)
    weights, acts = {}, {}
    if recipe.dynamic is not None:
        return _finish_dynamic(model, reference, analysis, synthetic, fit_images, recipe, plans, before,
                               macs_before, bytes_before, summary, timings, t_start, progress, joint_steps,
                               positions)
    if synthetic is not None:
        from .passes.fit import fit_sequential

        weights, acts = fit_sequential(model, reference, analysis.layers, fit_images, recipe,
                                       progress=progress, kept=_kept_channels(plans), regions=_regions(plans),
                                       joint_steps=joint_steps, notes=summary.notes)
    else:
        weights = quantize_closed_form(analysis.layers, recipe, moments, progress, analysis.prunable)
        acts = activation_ranges_closed_form(model, analysis.layers, recipe, moments, _probe_images(spec, recipe))
    timings["quantize"] = time.perf_counter() - t
    t = time.perf_counter()
    acts = _activation_floor(model, reference, analysis.layers, acts, spec, synthetic, recipe, summary, progress)
    timings["activation floor"] = time.perf_counter() - t

    # -------------------------------------------------------------------- write
    qdq.emit(model, analysis.layers, weights, acts, int4=recipe.int4)
    ShortcutAsConvPass()(model)
    _refresh_shapes(model)
    if any(a is not None and a.bits < 8 for a in acts.values()):
        summary.notes.append("activations below 8 bits: onnxruntime's CPU has no integer kernel for them and "
                             "dequantizes those layers' weights on every run unless the session config entry "
                             "session.disable_quant_qdq=1 folds them at load (datafree.runtime sets it when no "
                             "layer runs on integer kernels)")
    per_layer = {}
    for layer in analysis.layers:
        eff = recipe.for_layer(layer.name, layer.kind)
        wq = weights.get(layer.name)
        in_name = _layer_input_name(layer)
        aq = acts.get(in_name) if in_name else None
        per_layer[layer.name] = {"wbits": wq.bits if wq else None, "abits": aq.bits if aq else None,
                                 "channels": layer.out_channels}
        ch0, m0, p0, op, kind = before[layer.name]
        summary.rows.append(LayerRow(
            name=layer.name, op=op, kind=kind, channels_before=ch0, channels_after=layer.out_channels,
            wbits=wq.bits if wq else None, abits=aq.bits if aq else None,
            macs_before=m0, macs_after=_macs_after(layer, m0, before, positions), params_before=p0,
            params_after=_params_after(layer, wq), note="skipped by recipe" if eff.skip else ""))
    raised = [l for l in analysis.layers if weights.get(l.name) is not None and recipe.wbits is not None
              and l.kind == "depthwise" and weights[l.name].bits > recipe.wbits]
    if raised:
        summary.notes.append(f"{len(raised)} depthwise layers keep {recipe.depthwise_wbits}-bit weights: their "
                             "small filters lose the most at fewer bits and hold few of the model's weights "
                             "(depthwise_wbits in a recipe, --depthwise-wbits, to change it)")
    model.metadata_props[LAYERS_KEY] = json.dumps(per_layer, sort_keys=True)
    return _finish(model, recipe, summary, macs_before, bytes_before, timings, t_start)


def _finish(model: ir.Model, recipe: Recipe, summary: Summary, macs_before, bytes_before, timings,
            t_start: float) -> CompressResult:
    """Totals from the summary rows, the recipe and version in the metadata, timings."""
    summary.totals = {
        "params_before": sum(r.params_before for r in summary.rows),
        "params_after": sum(r.params_after for r in summary.rows),
        "macs_before": macs_before, "macs_after": sum(r.macs_after or 0 for r in summary.rows),
        "weight_bytes_before": bytes_before, "weight_bytes_after": weight_bytes(model),
    }
    model.metadata_props[METADATA_KEY] = recipe.to_json()
    model.metadata_props[VERSION_KEY] = _version()
    timings["total"] = time.perf_counter() - t_start
    summary.timings = {k: round(v, 3) for k, v in timings.items()}
    return CompressResult(model=model, summary=summary, recipe=recipe)


def _finish_dynamic(model, reference, analysis, synthetic, fit_images, recipe: Recipe, plans, before, macs_before,
                    bytes_before, summary: Summary, timings, t_start, progress, joint_steps: int,
                    positions: dict[str, int]) -> CompressResult:
    """Dynamic precision: refit what pruning changed (in float), then the selector pass."""
    from .passes.dynamic import apply_dynamic

    t = time.perf_counter()
    if synthetic is not None and plans:
        from .passes.fit import fit_sequential

        fit_sequential(model, reference, analysis.layers, fit_images,
                       recipe.replace(wbits=None, abits=None, layers={}), progress=progress,
                       kept=_kept_channels(plans), regions=_regions(plans), joint_steps=joint_steps)
    for layer in analysis.layers:
        summary.rows.append(LayerRow(
            name=layer.name, op=before[layer.name][3], kind=before[layer.name][4],
            channels_before=before[layer.name][0], channels_after=layer.out_channels, wbits=None, abits=None,
            macs_before=before[layer.name][1],
            macs_after=_macs_after(layer, before[layer.name][1], before, positions),
            params_before=before[layer.name][2], params_after=layer.params(), note="dynamic"))
    model, summary.dynamic = apply_dynamic(model, recipe.dynamic, synthetic=synthetic, progress=progress,
                                           seed=recipe.seed, augment=recipe.augment)
    timings["dynamic"] = time.perf_counter() - t
    return _finish(model, recipe, summary, macs_before, bytes_before, timings, t_start)


def _version() -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("datafree")
    except PackageNotFoundError:
        return "0"


def _layer_input_name(layer: G.Layer) -> str | None:
    x = layer.node.inputs[0]
    p = x.producer()
    if p is not None and p.op_type == "DequantizeLinear":
        x = p.inputs[0].producer().inputs[0]
    return x.name


def _positions(model: ir.Model, spec, analysis: G.Analysis) -> dict[str, int]:
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


def _macs(layer: G.Layer, positions: dict[str, int]) -> int | None:
    """Multiply-accumulates per sample; at the assumed input size where shapes are symbolic."""
    m = layer.macs()
    if m is None and layer.name in positions:
        m = int(positions[layer.name] * layer.w_oc().size)
    return m


def _macs_after(layer: G.Layer, macs_before: int | None, before, positions: dict[str, int]) -> int | None:
    m = _macs(layer, positions)
    if m is not None:
        return m
    if macs_before is None:
        return None
    ch0 = before[layer.name][0]
    return int(macs_before * layer.out_channels / ch0)  # shapes unknown: scale by kept channels


def _params_after(layer: G.Layer, wq) -> int:
    if wq is not None:
        n = int(wq.q.size)
        b = layer.node.inputs[2] if len(layer.node.inputs) > 2 else None
        return n + (0 if b is None else int(np.prod(b.shape.dims)) if b.shape is not None else 0)
    return layer.params()


def _refresh_shapes(model: ir.Model) -> None:
    """Drop stale intermediate shapes (channels changed) and infer them again."""
    for node in model.graph:
        for v in node.outputs:
            if not v.is_graph_output():
                v.shape = None
    ingest.infer_shapes(model)


def _uncompressed_constants(model: ir.Model, analysis: G.Analysis, total: int, share: float = 0.01) -> list[str]:
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


# ------------------------------------------------------------ fitting work
# The per-image cost up to which the recipe's synthetic images and joint steps are used
# as given: a little above a CIFAR ResNet-56 (126 M MACs, about 4 minutes on 2 cores).
REFERENCE_MACS = 150e6
MIN_IMAGES, MIN_JOINT_STEPS = 32, 50


def fitting_work(recipe: Recipe, macs: int | None) -> tuple[int, int, str | None]:
    """Synthetic images and joint steps for a model of ``macs`` per image, and a note
    when they were cut.  Generation and fitting cost grow with MACs x images x steps: a
    ResNet-18 at 224 x 224 (1.8 G MACs) with 256 images took over 25 minutes just to
    generate them.  With ``fit_budget = "auto"`` a model k times costlier than the
    reference gets 1/k of both (never fewer than 32 images and 50 steps)."""
    n, steps = recipe.synthetic, recipe.joint_steps
    if recipe.fit_budget != "auto" or not macs or macs <= REFERENCE_MACS or n == 0:
        return n, steps, None
    k = macs / REFERENCE_MACS
    n2 = min(n, max(MIN_IMAGES, round(n / k)))
    steps2 = min(steps, max(MIN_JOINT_STEPS, round(steps / k)))
    if (n2, steps2) == (n, steps):
        return n, steps, None
    return n2, steps2, (f"the model costs {macs / 1e9:.2f} G MACs per image, {k:.1f}x the reference: fitted on "
                        f"{n2} synthetic images with {steps2} joint steps instead of {n} and {steps} "
                        "(--fit-budget full for those)")


# ------------------------------------------------------------------ pruning


def _augmentable(images: np.ndarray, recipe: Recipe) -> bool:
    return recipe.augment and images.ndim == 4


def _fitting_set(images: np.ndarray, recipe: Recipe) -> np.ndarray:
    """The synthetic images, with (when the recipe asks) mirrored and shifted copies
    (:func:`synth.augmented`, seeded by the recipe)."""
    if not _augmentable(images, recipe):
        return images
    from . import synth

    return synth.augmented(images, recipe.seed)


# --------------------------------------------------- closed-form quantization


def _activation_floor(model: ir.Model, reference, layers: list[G.Layer], acts: dict, spec, synthetic,
                      recipe: Recipe, summary: Summary, progress: ProgressFn) -> dict:
    """:func:`passes.floor.activation_floor` on held-out procedural photographs (images the
    fit never saw; the synthetic images themselves for inputs that are not images)."""
    if not acts or recipe.max_activation_loss is None or reference is None:
        return acts
    from . import natural

    images = _probe_images(spec, recipe.replace(seed=recipe.seed + 1), n=16, soft_share=natural.SOFT_SHARE)
    if images is None and synthetic is not None and synthetic.images.ndim >= 2:
        images = synthetic.images[:16]
    if images is None:
        return acts
    from .passes.floor import activation_floor

    try:
        res = activation_floor(model, reference, layers, acts, images, loss_db=recipe.max_activation_loss,
                               progress=progress)
    except UserError:          # the model cannot be run in torch here: ranges kept as they are
        return acts
    if res.note():
        summary.headline.append(res.note())
    summary.inputs["activation_sqnr_db"] = {"weights_only": round(res.weights_db, 2),
                                            "all_quantized": round(res.before_db, 2),
                                            "kept": round(res.after_db, 2), "target": round(res.target_db, 2)}
    return res.acts


def _probe_images(spec, recipe: Recipe, n: int = 32, soft_share: float = 0.0) -> np.ndarray | None:
    """Procedural photographs in the input's range, for image inputs (None otherwise);
    ``soft_share`` of them soft (:mod:`.natural`)."""
    if spec is None or spec.convention is None:
        return None
    from . import natural

    return spec.convention.apply(natural.images(n, spec.shape, recipe.seed, soft_share=soft_share))


