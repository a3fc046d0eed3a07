"""The latency pass: the prune ratio chosen so the compressed model takes at most
``recipe.latency`` of the float model's time where it is compressed.

Contract: given a recipe with ``latency`` set (and no ``prune``), return the same recipe
with ``prune`` set to the smallest ratio, to ``STEP``, whose model runs in at most that
fraction of the float model's time at batch 1 and at the large batch (the larger of the
two ratios counts), measured in plain onnxruntime sessions (:mod:`..passes.speed`); the
recipe written into the model has that ratio and no latency, so it reproduces the model.

Why a search over whole models: onnxruntime's time is not proportional to MACs (channel
blocks, integer kernels, layout changes between layers), so the ratio that meets a time
target can only be measured.  Each candidate is compressed in closed form (no images:
time does not depend on fitted values, and the floor under activations, which does
change time, runs as it would), then timed.  Times on a shared machine scatter by some
percent: a target within that of a candidate's time may land either side.

How: ratio 0 first (quantization alone may be enough), then the largest ratio
``MAX_RATIO`` (if even that is too slow the target is refused), then bisection to
``STEP`` between the two.
"""

from __future__ import annotations

import onnx_ir as ir

from ..compress import Context
from ..errors import UserError

MAX_RATIO = 0.8
STEP = 0.05


def choose_prune(ctx: Context) -> None:
    """Set ``ctx.recipe.prune`` from ``ctx.recipe.latency`` (module docstring)."""
    target = ctx.recipe.latency
    if target is None:
        return
    if ctx.float_bytes is None:
        raise UserError("latency needs the model timed here: its input must be one float tensor of known size "
                        "(or give prune instead)")
    cache: dict[float, float] = {}

    def ratio_at(prune: float) -> float:
        if prune not in cache:
            cache[prune] = _time_ratio(ctx, prune)
            ctx.progress("latency", len(cache), 7)
        return cache[prune]

    if ratio_at(0.0) <= target:
        chosen = 0.0
    elif ratio_at(MAX_RATIO) > target:
        raise UserError(f"latency {target:g} cannot be reached here: pruned {MAX_RATIO:.0%} the model still takes "
                        f"{ratio_at(MAX_RATIO):.2f} of the float model's time")
    else:
        lo, hi = 0.0, MAX_RATIO                  # lo too slow, hi fast enough
        while hi - lo > STEP + 1e-9:
            mid = round(round((lo + hi) / 2 / STEP) * STEP, 4)
            if mid in (lo, hi):
                break
            if ratio_at(mid) <= target:
                hi = mid
            else:
                lo = mid
        chosen = hi
    ctx.recipe = ctx.recipe.replace(prune=chosen, latency=None)
    tried = ", ".join(f"{p:.2f}: {r:.2f}" for p, r in sorted(cache.items()))
    ctx.summary.headline.append(f"latency target {target:g} of the float model's time: prune ratio {chosen:.2f} "
                                f"chosen (time measured here per ratio tried, closed form: {tried})")
    ctx.summary.inputs["latency"] = {"target": target, "prune": chosen,
                                     "measured": {f"{p:.2f}": round(r, 4) for p, r in sorted(cache.items())}}


def _time_ratio(ctx: Context, prune: float) -> float:
    """The larger of the batch-1 and large-batch time ratios of the model compressed in
    closed form at ``prune`` (everything else as the recipe says)."""
    from ..compress import compress

    recipe = ctx.recipe.replace(prune=prune, latency=None, synthetic=0)
    model = ir.serde.deserialize_model(_proto(ctx.float_bytes))
    result = compress(model, recipe, input_shape=tuple(ctx.spec.shape) if ctx.spec is not None else None)
    if not result.summary.speed:
        raise UserError("latency: the compressed model could not be timed here ("
                        + "; ".join(n for n in result.summary.notes if n.startswith("speed not measured")) + ")")
    return max(b["ratio"] for b in result.summary.speed["batches"].values())


def _proto(data: bytes):
    import onnx

    return onnx.load_from_string(data)
