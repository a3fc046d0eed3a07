"""Dynamic precision (DynaDFQ, methods.md §2): each input image gets its own bit-widths.

    model, stats = apply_dynamic(load("m.onnx"), DynamicConfig(bits=(4, 6, 8), target_bits=5))
    logits, bits = InferenceSession(model).run(None, {"input": x})     # bits: [N, G]

Two modes choose the bits.

``mode="cascade"`` (default, :func:`build_cascade`): every image runs the whole
network at a low configuration ``configs[0]``; ``BitSelect`` reads that first pass's
*margin* (largest logit minus the second) and either keeps its result or reruns the
image at ``configs[1]``: the rows to rerun are gathered, run through the second pass
(inside an ``If``, so that no graph ever sees an empty batch) and scattered back into
the logits; an image that is rerun costs both passes.  Both passes are QDQ in the
form onnxruntime fuses into its integer kernels, their weights derived from the same
stored integers by constant subgraphs it folds at load (:mod:`.integer`).  Models whose output is not one score per class (or that have
more than one output) get the upfront selector, with a note.  The pair of configurations and the selector
are fitted on synthetic images (:func:`fit_cascade`).  Each pass runs at one
configuration, so each gets its own biases (:func:`correct_biases`: the mean shift
that rounding and clipping cause at that configuration taken out, layer by layer; a
few floats per layer) and the selector is refitted on the corrected first pass;
measured on ResNet-20 (dev top-1, mean of three synthetic sets) 4/4/4 gains 0.9 pt
(79.6 -> 80.5 %), 4/4/6 1.4 (80.0 -> 81.5), 6/4/4, 6/6/6 and 8/8/8 -0.1 to +0.3.  The price per bit is set on
the probes generated for confident targets (``CONFIDENT_TARGET``), because images
made for spread targets are far less sure than real ones and a threshold set on
them reruns too few real images.  Measured on ResNet-20 (benchmarks/dynamic_bench.py)
the first pass's margin tells images that need more bits from the others; the
stem's pooled output does not.

``mode="upfront"``: the selector reads the stem's pooled output and every image runs
once, at the configuration it picked.  What the pass writes (BN folded first; the
layers' weights and activations are fake-quantized as a device would run them):

* The first layer (the *stem*) runs at the highest candidate precision for every
  image: its output is what the selector looks at, so it must exist before the
  choice.  Weights are stored dequantized, its input is fake-quantized with
  standard ops.
* Every other Conv / Gemm belongs to one of G *groups* (``groups="stage"``: one per
  spatial resolution, the Gemm joins the last; ``groups="3"``: three groups of about
  equal MACs along the depth).  Its input goes through ``DynQuant`` and the layer
  becomes ``DynQConv`` / ``DynQGemm`` (``datafree.ops``), both at the bit-width of
  its group for that image.
* ``BitSelect`` reads the global-average-pooled stem output, runs a tiny MLP
  (C → 16 → K, ReLU) and picks one of K candidate *configurations* (a bit-width
  per group).  The model's second output ``bits`` is float [N, G]: the bit-width of
  each group for each image.  The MAC-weighted mean over groups ("average bits",
  the quantity ``target_bits`` constrains; the stem is not counted) uses the group
  MACs stored in the model's ``datafree.dynamic`` metadata.

Candidate configurations: every combination of the candidate bit-widths over the
groups (at most 64) is simulated on the synthetic images; the ones on the Pareto
front of (average bits, loss against the float model) are kept, at most
``MAX_CONFIGS``, from the cheapest to the one with the lowest loss.

Data (no real image).  A quarter of the synthetic images is held out as probes;
each part gains mirrored and shifted copies of its own images (``augment``), which
calibrates the activation ranges and trains the selector on four times the images
without generating more.

Training.  The configurations are fixed, so the selector only
needs, for each synthetic image, the loss of every configuration:
``CE(logits_k, argmax FP) + KL(FP ‖ logits_k)``, computed once by running the
fixed-precision model of each configuration in onnxruntime.  The selector is
trained in torch with hard Gumbel-softmax (straight-through):
``Σ_k onehot_k·loss_k + λ·max(0, mean bits − target)``.  Because the network
itself is not trained, no differentiable copy of it is needed and every
candidate is simulated exactly as it will run.  Finally a price per bit μ
(positive or negative) is subtracted from the selector's logits (folded into its
last bias; the chosen bit-width per image only drops as μ grows) and set by
bisection so the mean bits on the held-out probe images is at most
``target_bits`` and as close to it as the probe set allows.

Weights are stored once, as int8 at the highest candidate precision; lower
bit-widths are requantised from those integers at run time (see ``datafree.ops``).
The integers are chosen so that each requantised bit-width is a fitted (GPTQ)
rounding on the synthetic images' layer inputs, from the lowest bit-width up
(:func:`fit.nested_gptq`): one stored set, as many bytes as rounding to nearest,
and the 27 stage configurations of ResNet-20 gain 1.0 pt on average (all-4-bit
2.4, 77.2 -> 79.6 %).  Depthwise and other grouped convolutions are rounded to nearest.
"""

from __future__ import annotations

import dataclasses
import time
from dataclasses import dataclass

import numpy as np
import onnx
import onnx_ir as ir

from datafree.ops import domain
from datafree.ops.selector import Selector, calibrate_price

from ...errors import UserError
from ...progress import ProgressFn, silent
from ...recipe import DynamicConfig, Recipe
from .plan import (BITS_OUTPUT, CONFIDENT_TARGET, METADATA_KEY, PROBE_FRACTION, STAGE, Plan, run_values,  # noqa: F401
                   config_key, make_plan)
from .selection import (_config_losses, enumerate_configs, fit_cascade, fit_pair, pareto, simulate,  # noqa: F401
                        train_selector)
from .cascade import build_cascade  # noqa: F401
from .writing import build_dynamic, build_fixed, confidence_features, correct_biases  # noqa: F401


# ------------------------------------------------------------------- the pass
def _synthetic_images(model: ir.Model, synthetic, progress: ProgressFn) -> tuple[np.ndarray, np.ndarray | None]:
    if synthetic is None:
        from ...synth import generate

        defaults = Recipe()             # the set `compress --dynamic` makes, so both share the cache
        synthetic = generate(model, defaults.synthetic, steps=defaults.synthetic_steps, seed=0, progress=progress)
    images = np.asarray(getattr(synthetic, "images", synthetic), dtype=np.float32)
    if len(images) < 8:
        raise UserError(f"dynamic precision needs at least 8 synthetic images, got {len(images)}")
    return images, getattr(synthetic, "targets", None)


@dataclass
class DynamicResult:
    """Everything :func:`fit_dynamic` made: the model and what it was made from."""

    model: onnx.ModelProto
    plan: Plan
    selector: Selector
    stats: dict
    probe: np.ndarray                   # indices of the probes target_bits holds on
    images: np.ndarray                  # the synthetic images
    all_probes: np.ndarray | None = None   # every held-out image (a cascade's probe is its confident part)
    config_probe_loss: np.ndarray | None = None   # mean loss on all_probes of each enumerate_configs configuration
    train: np.ndarray | None = None     # indices of the images the plan (and any bias correction) was fitted on


def split_images(images: np.ndarray, seed: int, augment: bool) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(images, train indices, probe indices): a quarter of the synthetic images held
    out as probes; with ``augment`` each part gains its own mirrored and shifted copies
    (:func:`synth.augmented`), so no copy of a probe image is trained on."""
    train_src, probe_src = _held_out(len(images), seed)
    probe, train = images[probe_src], images[train_src]
    if augment:
        from ...synth import augmented

        train, probe = augmented(train, seed), augmented(probe, seed + 1)
    both = np.ascontiguousarray(np.concatenate([train, probe]))
    return both, np.arange(len(train)), np.arange(len(train), len(both))


def _held_out(n_images: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """(training, probe) source images of :func:`split_images`: a seeded quarter held out."""
    order = np.random.default_rng(seed).permutation(n_images)
    n_probe = max(4, int(round(n_images * PROBE_FRACTION)))
    return np.sort(order[n_probe:]), np.sort(order[:n_probe])


def _confident_probes(targets: np.ndarray | None, n_images: int, probe_idx: np.ndarray, seed: int) -> np.ndarray:
    """The probes made for a target at least ``CONFIDENT_TARGET`` sure (all probes when
    the images came without class targets or fewer than 8 are that sure), in the order
    and with the copies of :func:`split_images`."""
    if targets is None or len(targets) != n_images or np.asarray(targets).ndim != 2 or not np.asarray(targets).shape[1]:
        return probe_idx                 # e.g. natural images for a BN-folded model: [n, 0] targets
    _, probe_src = _held_out(n_images, seed)
    sure = np.asarray(targets).max(axis=1)[probe_src] >= CONFIDENT_TARGET
    sure = np.tile(sure, len(probe_idx) // len(probe_src))
    return probe_idx[sure] if sure.sum() >= 8 else probe_idx


def _upfront_instead(plan: Plan, config: DynamicConfig, all_cfgs: np.ndarray, images: np.ndarray):
    """The upfront mode for a model whose output is not one score per class, its
    configurations simulated again as its layers run them (fake-quantized)."""
    note = ("cascade needs one output of scores per class (it reruns on the margin between the two top "
            "scores): the selector reads the stem instead (upfront mode)")
    plan.integer = False
    return dataclasses.replace(config, mode="upfront"), note, simulate(plan, all_cfgs, images)


def fit_dynamic(model: ir.Model, config: DynamicConfig, *, synthetic=None, progress: ProgressFn = silent,
                seed: int = 0, augment: bool = True, positions: dict[str, int] | None = None) -> DynamicResult:
    """Plan, simulate, train and write the dynamic model (see :func:`apply_dynamic`)."""
    t0 = time.perf_counter()
    images, targets = _synthetic_images(model, synthetic, progress)
    t_synth = time.perf_counter() - t0
    n_images = len(images)
    images, train_idx, probe_idx = split_images(images, seed, augment)
    all_probes = probe_idx
    progress(STAGE, 0, 4)

    plan = make_plan(model, config, images[train_idx], positions)
    progress(STAGE, 1, 4)
    all_cfgs = enumerate_configs(plan.candidates, len(plan.groups))
    logits, fp, pooled = simulate(plan, all_cfgs, images)
    avg = plan.avg_bits(all_cfgs)
    note = None
    if config.mode == "cascade" and not (len(plan.base.graph.output) == 1 and fp.ndim == 2 and fp.shape[1] >= 2):
        config, note, (logits, fp, pooled) = _upfront_instead(plan, config, all_cfgs, images)
    losses = np.stack([_config_losses(fp, lg) for lg in logits], axis=1)        # [n, K_all]
    if config.mode == "cascade":        # target_bits holds on these (see fit_cascade)
        probe_idx = _confident_probes(targets, n_images, probe_idx, seed)
    keep = pareto(avg, losses[train_idx].mean(axis=0))
    plan.configs = all_cfgs[keep]
    cfg_bits = avg[keep]
    front = {"configs": [domain.config_label(c) for c in all_cfgs[keep]],
             "avg_bits": [round(float(b), 4) for b in cfg_bits],
             "bops": [int(b) for b in plan.bops(all_cfgs[keep])],
             "probe_loss": [round(float(v), 4) for v in losses[all_probes][:, keep].mean(axis=0)]}
    progress(STAGE, 2, 4)

    t_train, t_correct = time.perf_counter(), 0.0
    if config.mode == "cascade":
        cascade = fit_cascade(logits, losses, avg, train_idx, all_probes, probe_idx, config.target_bits,
                              steps=config.steps, seed=seed)
        if config.bias_correction:
            # each pass runs at one configuration: give it its own biases, then refit the
            # selector on the corrected first pass's margins (the threshold moves with them)
            t_correct = time.perf_counter()
            pair = list(cascade.configs)
            for k in pair:
                correct_biases(plan, all_cfgs[k], images[train_idx])
            corrected, _, _ = simulate(plan, all_cfgs[pair], images)
            t_correct = time.perf_counter() - t_correct
            for k, lg in zip(pair, corrected):
                logits[k], losses[:, k] = lg, _config_losses(fp, lg)
            if len(pair) == 2:
                cascade = fit_pair(logits, losses, avg, pair[0], pair[1], train_idx, probe_idx, config.target_bits,
                                   steps=config.steps, seed=seed)
        selector, mu, keep, cfg_bits = cascade.selector, cascade.price, cascade.configs, cascade.cost_bits
        plan.configs = all_cfgs[keep]
        features = confidence_features(logits[keep[0]])
    else:
        selector = train_selector(pooled[train_idx], losses[train_idx][:, keep], cfg_bits, config.target_bits,
                                  steps=config.steps, seed=seed)
        mu = calibrate_price(selector, pooled[probe_idx], cfg_bits, config.target_bits)
        features = pooled
    t_train = time.perf_counter() - t_train - t_correct
    progress(STAGE, 3, 4)

    proto = build_cascade(plan, selector) if config.mode == "cascade" else build_dynamic(plan, selector)
    choice = selector.choose(features[probe_idx])
    stats = _stats(plan, selector, choice, cfg_bits, losses[probe_idx][:, keep], fp[probe_idx],
                   logits[keep][:, probe_idx], mu, config)
    stats["front"] = front
    if config.mode == "cascade" and len(probe_idx) < len(all_probes):
        # the target is priced on the confident probes; the hard ones (spread targets) are rerun far more
        # often: what real inputs cost lies in between, nearer the confident end on ResNet-20 (see README)
        stats["expected_bits_all_probes"] = float(cfg_bits[selector.choose(features[all_probes])].mean())
        stats["all_probe_images"] = int(len(all_probes))
    if note:
        stats["note"] = note
    stats["seconds"] = {"synthetic": round(t_synth, 2), "selector_training": round(t_train, 2),
                        "bias_correction": round(t_correct, 2),
                        "total": round(time.perf_counter() - t0, 2)}
    progress(STAGE, 4, 4)
    return DynamicResult(model=proto, plan=plan, selector=selector, stats=stats, probe=probe_idx, images=images,
                         all_probes=all_probes, config_probe_loss=losses[all_probes].mean(axis=0), train=train_idx)


def apply_dynamic(model: ir.Model, config: DynamicConfig, *, synthetic=None,
                  progress: ProgressFn = silent, seed: int = 0, augment: bool = True,
                  positions: dict[str, int] | None = None) -> tuple[ir.Model, dict]:
    """The dynamic-precision model of ``model`` (not modified) and its statistics.

    ``synthetic``: a ``SyntheticSet`` (or an image array, NCHW float32 in the
    model's input space) to calibrate and train on; generated when None.  A quarter
    of it is held out as the probe set on which ``target_bits`` is met; with
    ``augment`` both parts gain mirrored and shifted copies.  Statistics:
    candidate configurations with their average bits / BOPs / probe loss, the
    histogram of chosen configurations and the expected average bits and BOPs on
    the probes, the selector's parameters / MACs / BOPs (and % of the model's).  ``positions``:
    output positions per layer at the input size assumed, where shapes are symbolic.
    """
    result = fit_dynamic(model, config, synthetic=synthetic, progress=progress, seed=seed, augment=augment,
                         positions=positions)
    return ir.serde.deserialize_model(result.model), result.stats


def selector_cost(plan: Plan, selector: Selector, spatial: int) -> dict:
    c, h = selector.w1.shape
    k = selector.w2.shape[1]
    macs = c * h + h * k
    return {"params": selector.params, "macs": int(macs), "pool_adds": int(c * spatial),
            "bops": int((macs + c * spatial) * 32 * 32)}


def _stats(plan: Plan, selector: Selector, choice: np.ndarray, cfg_bits: np.ndarray, probe_losses: np.ndarray,
           fp: np.ndarray, cfg_logits: np.ndarray, mu: float, config: DynamicConfig) -> dict:
    cascade = config.mode == "cascade"
    # the upfront selector pools the stem's output: its positions (at the size assumed)
    spatial = plan.stem.macs // plan.stem.w_int.size if plan.stem.macs and not cascade else 1
    cost = selector_cost(plan, selector, spatial)
    bops = plan.bops(plan.configs)
    first = plan.configs[0] if cascade else None
    labels = [domain.config_label(c, first) for c in plan.configs]
    extra = {}
    if cascade:          # choice k > 0 runs the network twice: at configs[0], then at configs[k]
        bops = np.concatenate([bops[:1], bops[0] + bops[1:]])
        extra = {"mode": "cascade", "rerun_fraction": float(np.mean(choice > 0)),
                 "first": domain.config_label(plan.configs[0]),
                 "rerun": domain.config_label(plan.configs[-1]) if len(plan.configs) > 1 else None}
    hist = {lab: int((choice == k).sum()) for k, lab in enumerate(labels)}
    agree = np.mean(cfg_logits[choice, np.arange(len(choice))].argmax(axis=1) == fp.argmax(axis=1))
    expected_bops = float(bops[choice].mean())
    return {
        "candidates": list(plan.candidates),
        "groups": plan.groups,
        "group_macs": plan.group_macs.astype(int).tolist(),
        "configs": labels,
        "config_avg_bits": [round(float(b), 4) for b in cfg_bits],
        "config_bops": [int(b) for b in bops],
        "config_probe_loss": [round(float(v), 4) for v in probe_losses.mean(axis=0)],
        "target_bits": float(config.target_bits),
        "probe_images": int(len(choice)),
        "histogram": hist,
        "expected_bits": float(cfg_bits[choice].mean()),
        "expected_bops": expected_bops,
        "probe_agreement_with_float": float(agree),
        "price_per_bit": float(mu),
        "selector": {**cost, "bops_pct_of_model": 100.0 * cost["bops"] / expected_bops},
        **extra,
    }

