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

import time
from dataclasses import dataclass, field

import numpy as np
import onnx_ir as ir

from . import graph as G
from . import ingest, inputs
from .errors import UserError
from .passes.planning import _alignment_note, _kept_channels, _regions, plan_pruning, prune_group  # noqa: F401
from .progress import ProgressFn, silent
from .recipe import METADATA_KEY, Recipe

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
    speed: dict = field(default_factory=dict)                  # measured time vs the float model, per batch

    def to_dict(self) -> dict:
        import dataclasses

        return {"layers": [dataclasses.asdict(r) for r in self.rows], "skipped": self.skipped,
                "totals": self.totals, "timings": self.timings, "notes": self.notes,
                "headline": self.headline, "inputs": self.inputs, "speed": self.speed,
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


# ------------------------------------------------------------------ pipeline
@dataclass
class Context:
    """What the passes share: the recipe and the model as it is changed, what was learnt
    about it, the images made for it, and the summary being written."""

    recipe: Recipe
    progress: ProgressFn
    caller_images: np.ndarray | None
    input_shape: tuple[int, ...] | None
    model: ir.Model | None = None
    spec: object = None                      # inputs.InputSpec: the input size and range assumed
    analysis: G.Analysis | None = None
    summary: Summary = field(default_factory=Summary)
    before: dict = field(default_factory=dict)      # layer -> (channels, MACs, params, op, kind) as loaded
    positions: dict = field(default_factory=dict)   # layer -> output positions at the assumed size
    moments: dict = field(default_factory=dict)     # layer -> BN pre-activation moments
    macs_before: int = 0
    bytes_before: int = 0
    synthetic: object = None                 # synth.SyntheticSet
    fit_images: np.ndarray | None = None
    joint_steps: int = 0
    reference: ir.Model | None = None        # the float model, BN folded, for fitting and the floor
    plans: list = field(default_factory=list)
    weights: dict = field(default_factory=dict)
    acts: dict = field(default_factory=dict)
    measure: bool = True                     # time float and compressed model (the measure pass)
    float_bytes: bytes | None = None         # the float model as loaded, serialized, for the measure pass


def compress(source, recipe: Recipe | None = None, *, progress: ProgressFn = silent,
             images: np.ndarray | None = None, input_shape: tuple[int, ...] | None = None,
             measure: bool = True) -> CompressResult:
    """Compress ``source`` (path, ModelProto or ir.Model; never modified) as ``recipe`` says.

    ``images``: fit on these (N x input shape, preprocessed) instead of generating
    synthetic images: for measuring the synthetic path against real data, which the
    compressor itself never needs.  ``recipe.synthetic`` must then be > 0.
    ``input_shape``: the input size synthetic images get where the model's is symbolic.
    ``measure``: time the float and the compressed model in a plain onnxruntime session
    (a few seconds; the ratios go into the summary).
    Where no synthetic images can be made (symbolic size and no ``input_shape``, no BN
    statistics and no class output), the closed form is used and the summary says why.
    """
    from . import stages

    recipe = recipe or Recipe()
    ctx = Context(recipe=recipe, progress=progress, caller_images=images, measure=measure,
                  input_shape=input_shape if input_shape is not None else
                  (tuple(recipe.input_shape) if recipe.input_shape is not None else None))
    t_start = time.perf_counter()
    stages.load(ctx, source)
    ctx.summary.timings["load"] = time.perf_counter() - t_start
    for name, run in (stages.DYNAMIC if ctx.recipe.dynamic is not None else stages.STATIC):
        t = time.perf_counter()
        run(ctx)
        ctx.summary.timings[name] = ctx.summary.timings.get(name, 0.0) + time.perf_counter() - t
    return _finish(ctx, t_start)


def _finish(ctx: Context, t_start: float) -> CompressResult:
    """Totals from the summary rows, the recipe and version in the metadata, timings."""
    summary, model = ctx.summary, ctx.model
    summary.totals = {
        "params_before": sum(r.params_before for r in summary.rows),
        "params_after": sum(r.params_after for r in summary.rows),
        "macs_before": ctx.macs_before, "macs_after": sum(r.macs_after or 0 for r in summary.rows),
        "weight_bytes_before": ctx.bytes_before, "weight_bytes_after": weight_bytes(model),
    }
    model.metadata_props[METADATA_KEY] = ctx.recipe.to_json()
    model.metadata_props[VERSION_KEY] = _version()
    summary.timings["total"] = time.perf_counter() - t_start
    summary.timings = {k: round(v, 3) for k, v in summary.timings.items()}
    return CompressResult(model=model, summary=summary, recipe=ctx.recipe)


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
    except UserError as exc:   # the model cannot be run in torch here: ranges kept as they are
        summary.headline.append(f"activation floor not applied: {exc}; every activation range kept as fitted")
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


