"""The synthetic pass: synthetic images (or the caller's) when anything is fitted on them, how many
for the model's cost, and the fitting set made of them."""

from __future__ import annotations

import numpy as np

from .. import graph as G
from ..compress import Context
from ..errors import CannotSynthesise, UserError
from ..recipe import Recipe


def synthesise(ctx: Context) -> None:
    """Synthetic images (or the caller's), when anything is fitted on them; the fitting set
    (mirrored and shifted copies, thinned to what memory holds)."""
    recipe, summary, spec = ctx.recipe, ctx.summary, ctx.spec
    n_synthetic, ctx.joint_steps, budget_note = fitting_work(recipe, ctx.macs_before)
    gen_steps = recipe.synthetic_steps
    wants_fit = n_synthetic > 0 and needs_images(recipe, ctx.analysis.layers)
    ranges_only = wants_fit and ranges_only_recipe(recipe, ctx.analysis.layers)
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


def _within_budget(ctx: Context, n_synthetic: int) -> tuple[int, int, int, str | None]:
    """Images, generator steps and joint steps scaled to fit ``recipe.time_budget``
    (:mod:`..budget`), from this model's measured cost per image pass."""
    import time

    from .. import budget

    recipe = ctx.recipe
    shape = ctx.spec.shape if ctx.spec is not None else ctx.input_shape
    generates = ctx.caller_images is None and _optimises_images(ctx)
    prunes = any(recipe.for_layer(layer.name, layer.kind).prune for layer in ctx.analysis.layers)
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

    for layer in layers:
        eff = recipe.for_layer(layer.name, layer.kind)
        if eff.skip:
            continue
        if eff.prune or (eff.wbits is not None and eff.wbits < ROUND_BITS) or (ranges and eff.abits is not None):
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
# as given: a little above a CIFAR ResNet-56 (126 M MACs, about 4 minutes on 2 cores).
REFERENCE_MACS = 150e6


MIN_IMAGES, MIN_JOINT_STEPS = 32, 50


def fitting_work(recipe: Recipe, macs: int | None) -> tuple[int, int, str | None]:
    """Synthetic images and joint steps for a model of ``macs`` per image, and a note
    when they were cut.  Generation and fitting cost grow with MACs x images x steps: a
    ResNet-18 at 224 x 224 (1.8 G MACs) with 256 images took over 25 minutes just to
    generate them.  With ``fit_budget = "auto"`` a model k times costlier than the
    reference gets 1/k of both (never fewer than 32 images and 50 steps); a
    ``time_budget`` replaces this scaling (:func:`_within_budget`)."""
    n, steps = recipe.synthetic, recipe.joint_steps
    if recipe.fit_budget != "auto" or recipe.time_budget is not None or not macs or macs <= REFERENCE_MACS or n == 0:
        return n, steps, None
    k = macs / REFERENCE_MACS
    n2 = min(n, max(MIN_IMAGES, round(n / k)))
    steps2 = min(steps, max(MIN_JOINT_STEPS, round(steps / k)))
    if (n2, steps2) == (n, steps):
        return n, steps, None
    return n2, steps2, (f"the model costs {macs / 1e9:.2f} G MACs per image, {k:.1f}x the reference: fitted on "
                        f"{n2} synthetic images with {steps2} joint steps instead of {n} and {steps} "
                        "(--fit-budget full for those)")


def augmentable(images: np.ndarray, recipe: Recipe) -> bool:
    return recipe.augment and images.ndim == 4


def fitting_set(images: np.ndarray, recipe: Recipe) -> np.ndarray:
    """The synthetic images, with (when the recipe asks) mirrored and shifted copies
    (:func:`synth.augmented`, seeded by the recipe)."""
    if not augmentable(images, recipe):
        return images
    from .. import synth

    return synth.augmented(images, recipe.seed)
