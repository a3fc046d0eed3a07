"""The synthetic pass: synthetic images (or the caller's) when anything is fitted on them, how many
for the model's cost, and the fitting set made of them."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from .. import graph as G
from ..compress import Context
from ..errors import CannotSynthesise, UserError
from ..recipe import Recipe


def synthesise(ctx: Context) -> None:
    """Synthetic images (or the caller's), when anything is fitted on them; the fitting set
    (mirrored and shifted copies, thinned to what memory holds)."""
    recipe, summary, spec = ctx.recipe, ctx.summary, ctx.spec
    wants_fit = recipe.synthetic > 0 and needs_images(recipe, ctx.analysis.layers)
    ranges_only = wants_fit and ranges_only_recipe(recipe, ctx.analysis.layers)
    work = fitting_work(recipe, ctx.macs_before, _largest_prune(recipe, ctx.analysis.layers), refits=not ranges_only)
    n_synthetic, gen_steps, ctx.joint_steps, budget_note = work.images, work.gen_steps, work.joint_steps, work.note
    if ranges_only:      # nothing refitted: the fit sets ranges on RANGE_IMAGES images, so only those are made
        from ..passes.fit import RANGE_IMAGES

        n_synthetic = min(n_synthetic, RANGE_IMAGES)
    if wants_fit and recipe.time_budget is not None:
        n_synthetic, gen_steps, ctx.joint_steps, budget_note = _within_budget(ctx, n_synthetic)
    if n_synthetic > 0 and not wants_fit and ctx.caller_images is None:
        summary.headline.append("weights of 8 bits and more only: rounded to nearest, no synthetic images needed "
                                "(fitting them on synthetic images lost more on real photos than rounding does)")
    if wants_fit and ctx.caller_images is not None:
        from ..synth import SyntheticSet

        images = ctx.caller_images
        ctx.synthetic = SyntheticSet(images=np.ascontiguousarray(images, dtype=np.float32),
                                     targets=np.zeros((len(images), 0), np.float32), source="caller",
                                     seed=recipe.seed)
    elif wants_fit:
        from ..synth import generate

        try:
            ctx.synthetic = generate(ctx.model, n_synthetic, steps=gen_steps, seed=recipe.seed,
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
                            + (", for activation ranges only (nothing refitted)" if ranges_only else
                               ", fitted with mirrored and shifted copies" if augmentable(synthetic.images, recipe)
                               else ""))
    fit_images = synthetic.images if ranges_only else fitting_set(synthetic.images, recipe)
    from ..passes.fit import fitting_budget

    fitted = fitting_budget(ctx.model, ctx.analysis.layers, fit_images)
    if len(fitted) < len(fit_images):
        summary.notes.append(f"fitting on {len(fitted)} of {len(fit_images)} images: the largest layer "
                             "input over all of them would not fit in memory")
        fit_images = fitted
    if budget_note and synthetic.source != "caller":
        summary.notes.append(budget_note)
    ctx.fit_images = fit_images


def _largest_prune(recipe: Recipe, layers: list[G.Layer]) -> float:
    """The largest prune ratio any layer gets (per-layer overrides included; the recipe's
    ratio where there are no layers)."""
    return max((recipe.for_layer(layer.name, layer.kind).prune or 0.0 for layer in layers), default=recipe.prune)


def _within_budget(ctx: Context, n_synthetic: int) -> tuple[int, int, int, str | None]:
    """Images, generator steps and joint steps scaled to fit ``recipe.time_budget``
    (:mod:`..budget`), from this model's measured cost per image pass."""
    import time

    from .. import budget

    recipe = ctx.recipe
    shape = ctx.spec.shape if ctx.spec is not None else ctx.input_shape
    generates = ctx.caller_images is None and _optimises_images(ctx)
    prunes = _largest_prune(recipe, ctx.analysis.layers) > 0
    asked = budget.Work(n_synthetic, recipe.synthetic_steps, recipe.joint_steps)
    try:
        t = budget.seconds_per_image(ctx.model, tuple(shape))
    except Exception as exc:  # noqa: BLE001  the cost cannot be measured: the recipe's settings, said so
        return (n_synthetic, recipe.synthetic_steps, recipe.joint_steps,
                f"time budget not applied: the model's cost could not be measured ({type(exc).__name__})")
    spent = time.perf_counter() - ctx.started
    chosen = budget.plan(asked, recipe.time_budget, t, generates=generates, prunes=prunes, spent=spent)
    if chosen.note is not None:
        ctx.summary.headline.append(chosen.note)
    work = chosen.work
    # the recipe written into the model holds what was done, so that it reproduces the model
    ctx.recipe = recipe.replace(synthetic=work.images, synthetic_steps=work.gen_steps, joint_steps=work.joint_steps,
                                time_budget=None, fit_budget="full")
    return work.images, work.gen_steps, work.joint_steps, None


def _optimises_images(ctx: Context) -> bool:
    """Whether images are made by optimisation (BN statistics or class scores: each
    generator step a forward and backward pass), not procedural photographs, by the
    generator's own routing rule (a classifier assumed: it only decides between
    optimising routes)."""
    from ..synth_model import RouteRefused, _route

    has_bn = any(node.op_type == "BatchNormalization" for node in ctx.model.graph)
    image = ctx.spec is not None and ctx.spec.convention is not None
    try:
        return _route(ctx.recipe.synthetic_route, has_bn, True, image) != "natural"
    except (RouteRefused, CannotSynthesise):   # generate() says why; the budget prices the optimising route
        return True


ROUTES = {
    "bn-statistics": "optimised to match the model's BatchNormalization statistics and its classes",
    "output-only": "optimised toward the model's classes under image priors (no BatchNormalization statistics)",
    "natural": "procedural photographs in the input's range (no BatchNormalization statistics to match)",
}


def _refits(recipe: Recipe, layers: list[G.Layer], *, ranges: bool) -> bool:
    """Whether a layer the recipe compresses is pruned, has weights below
    ``fit.ROUND_BITS`` (both refitted on the images), or, with ``ranges``, has
    quantized activations (ranges set on them)."""
    from ..passes.fit import ROUND_BITS
    from ..quant import kernel_bits

    for layer in layers:
        eff = recipe.for_layer(layer.name, layer.kind)
        if eff.skip:
            continue
        bits = kernel_bits(eff.wbits, eff.abits, recipe.reduce_range, layer.kind)
        if eff.prune or (bits is not None and bits < ROUND_BITS) or (ranges and eff.abits is not None):
            return True
    return False


def ranges_only_recipe(recipe: Recipe, layers: list[G.Layer]) -> bool:
    """Whether the images would only set activation ranges: no pruning, no dynamic
    precision, no weights below ``fit.ROUND_BITS`` (those are refitted on the images)."""
    return recipe.dynamic is None and not _refits(recipe, layers, ranges=False)


def needs_images(recipe: Recipe, layers: list[G.Layer]) -> bool:
    """Whether anything is fitted on synthetic images: pruning, activation ranges, dynamic
    precision or weights below ``fit.ROUND_BITS`` (8-bit weights alone are rounded to nearest)."""
    return recipe.dynamic is not None or _refits(recipe, layers, ranges=True)


# The per-image cost up to which the recipe's synthetic images and joint steps are used
# as given: a little above a CIFAR ResNet-56 (126 M MACs).
REFERENCE_MACS = 150e6


MIN_IMAGES, MIN_JOINT_STEPS = 32, 50

# What fitting work buys depends on how much is pruned (benchmarks/fit_work.py on the trained
# ResNet-20 at W4A8): pruned by 30 % or less, 128 images made in 40 generator steps and 100
# joint steps scored as the recipe's 256, 80 and 300 do, in a fraction of the time; pruned
# by 40 % and more, the full work bought points.  Between 30 and 40 % the work grows linearly.
LIGHT_PRUNE, FULL_PRUNE = 0.3, 0.4
LIGHT_WORK = (128, 40, 100)          # images, generator steps, joint steps


@dataclass(frozen=True)
class FitWork:
    images: int
    gen_steps: int
    joint_steps: int
    note: str | None = None


def fitting_work(recipe: Recipe, macs: int | None, prune: float | None = None, refits: bool = True) -> FitWork:
    """Synthetic images, generator steps and joint steps for a model of ``macs`` per image
    pruned by at most ``prune`` (None: the recipe's ratio), and a note when they were cut.
    ``refits``: weights are fitted on the images (not only activation ranges set).
    With ``fit_budget = "auto"`` (and no ``time_budget``, which replaces this: see
    :func:`_within_budget`):

    * where channels are pruned, by the ratio: ``LIGHT_WORK`` up to ``LIGHT_PRUNE``, the
      recipe's own from ``FULL_PRUNE`` on, in proportion between (never more than the
      recipe asks; unpruned refits and dynamic precision keep the recipe's: unpruned, the
      light work scored 0.2 points under the full one over three seeds, within their scatter
      but not clearly nothing);
    * by the model's cost: a model k times costlier per image than ``REFERENCE_MACS``
      gets at most 1/k of the recipe's images and joint steps (never fewer than 32 and 50):
      a ResNet-18 at 224 x 224 (1.8 G MACs) with 256 images took over 25 minutes just to
      make them."""
    asked = FitWork(recipe.synthetic, recipe.synthetic_steps, recipe.joint_steps)
    if recipe.fit_budget != "auto" or recipe.time_budget is not None or asked.images == 0:
        return asked
    prune = recipe.prune if prune is None else prune
    n, gen, joint = asked.images, asked.gen_steps, asked.joint_steps
    why = []
    if refits and recipe.dynamic is None and 0 < prune < FULL_PRUNE:
        t = max(0.0, prune - LIGHT_PRUNE) / (FULL_PRUNE - LIGHT_PRUNE)
        n, gen, joint = (min(hi, round(lo + t * (hi - lo))) for lo, hi in zip(LIGHT_WORK, (n, gen, joint)))
        why.append(f"pruned by {prune:.0%}, between the work that bought nothing more at {LIGHT_PRUNE:.0%} and "
                   f"the full work at {FULL_PRUNE:.0%}" if t > 0 else
                   f"pruned by {prune:.0%}: more work bought no accuracy at {LIGHT_PRUNE:.0%} or less")
    k = macs / REFERENCE_MACS if macs else 0.0
    caps = (max(MIN_IMAGES, round(asked.images / k)), max(MIN_JOINT_STEPS, round(asked.joint_steps / k))) \
        if k > 1 else (n, joint)          # a cap of its own, on the recipe's ask
    if caps[0] < n or caps[1] < joint:
        n, joint = min(n, caps[0]), min(joint, caps[1])
        why.append(f"the model costs {macs / 1e9:.2f} G MACs per image, {k:.1f}x the reference")
    if (n, gen, joint) == (asked.images, asked.gen_steps, asked.joint_steps):
        return asked
    return FitWork(n, gen, joint, (f"fitted on {n} synthetic images ({gen} generator steps) with {joint} joint "
                                   f"steps instead of {asked.images}, {asked.gen_steps} and {asked.joint_steps}: "
                                   f"{'; '.join(why)} (benchmarks/fit_work.py; --fit-budget full for those)"))


def augmentable(images: np.ndarray, recipe: Recipe) -> bool:
    return recipe.augment and images.ndim == 4


def fitting_set(images: np.ndarray, recipe: Recipe) -> np.ndarray:
    """The synthetic images, with (when the recipe asks) mirrored and shifted copies
    (:func:`synth.augmented`, seeded by the recipe)."""
    if not augmentable(images, recipe):
        return images
    from .. import synth

    return synth.augmented(images, recipe.seed)
