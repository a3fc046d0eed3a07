"""compress(): the library entry point behind ``datafree compress`` and the export pipeline.

    from datafree.toolchain.compress import compress
    from datafree.toolchain.recipe import Recipe
    result = compress("model.onnx", Recipe(prune=0.3, wbits=4, abits=8))
    result.model      # onnx_ir.Model, ready for exporters.writer.save
    result.summary    # per-layer table, totals, skipped layers with reasons

It runs the passes of :mod:`.stages` in order over one :class:`Context`, timing each:

    load → latency → synthetic → opset → prune → fold → quantize → activation floor → write → measure
    load → latency → synthetic → opset → prune → fold → dynamic → measure          (recipe.dynamic)
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field

import numpy as np
import onnx_ir as ir

from . import graph as G
from . import heap
from .passes.planning import plan_pruning  # noqa: F401  (compress.plan_pruning)
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
    device: str = ""                                           # where torch ran (generation, fitting)

    def to_dict(self) -> dict:
        import dataclasses

        return {"layers": [dataclasses.asdict(r) for r in self.rows], "skipped": self.skipped,
                "totals": self.totals, "timings": self.timings, "notes": self.notes,
                "headline": self.headline, "inputs": self.inputs, "speed": self.speed, "device": self.device,
                **({"dynamic": self.dynamic} if self.dynamic else {})}


@dataclass
class CompressResult:
    model: ir.Model
    summary: Summary
    recipe: Recipe


# ------------------------------------------------------------------ helpers


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
    started: float = field(default_factory=time.perf_counter)   # when compress() began (the time budget)


def compress(source, recipe: Recipe | None = None, *, progress: ProgressFn = silent,
             images: np.ndarray | None = None, input_shape: tuple[int, ...] | None = None,
             measure: bool = True, device: str = "auto") -> CompressResult:
    """Compress ``source`` (path, ModelProto or ir.Model; never modified) as ``recipe`` says.

    ``images``: fit on these (N x input shape, preprocessed) instead of generating
    synthetic images: for measuring the synthetic path against real data, which the
    compressor itself never needs.  ``recipe.synthetic`` must then be > 0.
    ``input_shape``: the input size synthetic images get where the model's is symbolic.
    ``measure``: time the float and the compressed model in a plain onnxruntime session
    (a few seconds; the ratios go into the summary).  ``device``: where torch generates
    images and fits (:func:`.device.resolve`: ``auto`` takes CUDA when there is one);
    the same results up to float rounding, and the summary says where it ran.
    Where no synthetic images can be made (symbolic size and no ``input_shape``, no BN
    statistics and no class output), the closed form is used and the summary says why.
    """
    from . import device as dev
    from . import stages

    recipe = recipe or Recipe()
    where = dev.resolve(device)
    ctx = Context(recipe=recipe, progress=progress, caller_images=images, measure=measure,
                  input_shape=input_shape if input_shape is not None else
                  (tuple(recipe.input_shape) if recipe.input_shape is not None else None))
    ctx.summary.device = dev.describe(where)
    t_start = time.perf_counter()
    with heap.reused(), dev.using(where):
        stages.load.load(ctx, source)
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


# ------------------------------------------------------------------ pruning


# --------------------------------------------------- closed-form quantization


