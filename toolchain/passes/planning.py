"""Pruning plans: which channels of which group go (ratio per layer or global allocation,
then the criterion), and removing them with UDFC compensation and bias correction."""

from __future__ import annotations

import numpy as np

from .. import graph as G
from ..recipe import Recipe
from ..stats import output_mean
from . import prune


def plan_pruning(analysis: G.Analysis, recipe: Recipe, output_stats: dict | None = None,
                 positions: dict[str, int] | None = None, progress=None) -> list[prune.PrunePlan]:
    """Which channels of which group go: ratio per layer (or global rank), then the criterion.
    ``positions``: output positions per layer at the input size assumed, where shapes are
    symbolic (the global allocation weighs channels by their MACs there).  ``progress(done,
    total)``: called as each group's channels are put in order (the long part on wide models)."""
    groups = [g for g in analysis.prunable if not recipe.for_layer(g.name).skip]
    ratios = {g.name: recipe.for_layer(g.name).prune for g in groups}
    groups = [g for g in groups if ratios[g.name] and ratios[g.name] > 0]
    if not groups:
        return []
    crit = "l1" if recipe.criterion in ("auto", "output") else recipe.criterion
    scores = {g.name: prune.channel_scores(g.producer, crit) for g in groups}
    orders: dict[str, np.ndarray] = {}
    scope = recipe.prune_scope
    if scope == "auto":
        scope = "global" if output_stats else "layer"
    if scope == "global":
        overridden = {g.name for g in groups if recipe.for_layer(g.name).prune != recipe.prune}
        ranked = [g for g in groups if g.name not in overridden]
        curves = {}
        for i, g in enumerate(ranked):
            if progress is not None:
                progress(i, len(ranked))
            if output_stats and g.name in output_stats:
                st = output_stats[g.name]
                orders[g.name], curves[g.name] = prune.removal_order(
                    st.consumers, g.channels, int(0.9 * g.channels), energy=st.energy)
            else:
                curves[g.name] = prune.score_curve(scores[g.name])
        if progress is not None:
            progress(len(ranked), len(ranked))
        keep_n = prune.global_allocation(ranked, curves, recipe.prune, recipe.channel_multiple,
                                         positions=positions)
        for g in groups:
            if g.name in overridden:
                keep_n[g.name] = prune.n_keep(g.channels, ratios[g.name], recipe.channel_multiple)
    else:
        keep_n = {g.name: prune.n_keep(g.channels, ratios[g.name], recipe.channel_multiple) for g in groups}
    plans = []
    for g in groups:
        n_remove = g.channels - keep_n[g.name]
        if n_remove <= 0:
            continue
        if output_stats and g.name in output_stats:
            order = orders.get(g.name)
            if order is None:
                order = prune.removal_order(output_stats[g.name].consumers, g.channels, n_remove)[0]
            pruned = np.sort(order[:n_remove])
            keep = np.setdiff1d(np.arange(g.channels), pruned)
        else:
            keep, pruned = prune.choose(scores[g.name], keep_n[g.name])
        plans.append(prune.PrunePlan(group=g, keep=keep, pruned=pruned))
    return plans


def prune_group(plan: prune.PrunePlan, recipe: Recipe, moments: dict, summary) -> None:
    g = plan.group
    producer = g.producer
    mom = moments.get(producer.name)
    direct = all(c.layer.node.inputs[0] is producer.output for c in g.consumers)
    # the Gaussian model knows the layer's own activation; anything else in between voids it
    mean_before = output_mean(producer, mom) if mom is not None and direct and not g.carried else None
    w_before = {c.layer.name: prune.consumer_in_weight(c) for c in g.consumers}
    if recipe.compensation and not g.carried:
        S = prune.closed_form_coefficients(producer, plan.keep, plan.pruned)
        prune.compensate_consumers(g, plan.keep, plan.pruned, S)
    elif g.carried:
        summary.notes.append(f"{g.name}: {'depthwise layers' if g.depthwise else 'a channel gate'} in between, "
                             "no closed-form compensation")
    if recipe.bias_correction and mean_before is not None:
        # expected input of each consumer before and after: add the difference back to its bias
        for c in g.consumers:
            w0 = w_before[c.layer.name]
            w1 = prune.consumer_in_weight(c)[:, plan.keep]
            e0 = _expected_out(w0, mean_before)
            e1 = _expected_out(w1, mean_before[plan.keep])
            if c.layer.op != "MatMul":
                c.layer.set_bias(c.layer.bias_array() + (e0 - e1).astype(np.float32))
    prune.apply(plan)
    if mom is not None:
        moments[producer.name] = (mom[0][plan.keep], mom[1][plan.keep])


def alignment_note(plans: list[prune.PrunePlan], block: int = 4) -> list[str]:
    """A note when pruning left channel counts off the blocks CPU convolution kernels use
    (``channel_multiple`` set to 1 or an odd value): such layers may run no faster than
    unpruned ones, in float and 8-bit alike."""
    odd = sorted({len(p.keep) for p in plans if len(p.pruned) and len(p.keep) % block})
    if not odd:
        return []
    shown = ", ".join(str(c) for c in odd[:4]) + (", ..." if len(odd) > 4 else "")
    return [f"pruned channel counts ({shown}) are not multiples of {block}: CPU convolution kernels work in "
            f"blocks of channels (16 in onnxruntime on AVX-512, 8 on AVX2) and may run such layers no faster "
            f"than unpruned ones; channel_multiple 'auto' (the default) keeps counts aligned"]


def kept_channels(plans: list[prune.PrunePlan]) -> dict[str, np.ndarray]:
    kept = {}
    for p in plans:
        for layer in [p.group.producer] + p.group.carried:
            kept[layer.name] = p.keep
    return kept


def pruned_regions(plans: list[prune.PrunePlan]) -> dict[str, tuple[list[str], list[str]]]:
    """Per pruned producer: the depthwise and gate layers carried with it and its consumers."""
    return {p.group.producer.name: ([d.name for d in p.group.carried], [c.layer.name for c in p.group.consumers])
            for p in plans if len(p.pruned)}


def _expected_out(w: np.ndarray, mean: np.ndarray) -> np.ndarray:
    """(out, C, ...) weights applied to a per-channel constant input (interior positions)."""
    return w.reshape(w.shape[0], w.shape[1], -1).sum(axis=2) @ mean
