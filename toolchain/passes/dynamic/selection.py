"""Dynamic precision, choosing: configuration losses, the Pareto set, selector and cascade fitting."""

from __future__ import annotations

import itertools
from dataclasses import dataclass

import numpy as np

from datafree.ops.selector import Selector, calibrate_price

from .plan import HIDDEN, MAX_CONFIGS, MAX_ENUMERATED, PENALTY, SELECTOR_LR, Plan, run_values
from .writing import build_fixed, confidence_features


# ------------------------------------------------------------------ training
def _config_losses(fp_logits: np.ndarray, logits: np.ndarray) -> np.ndarray:
    """CE to the float model's class + KL(FP ‖ config), per image: [n].  An output that
    is not one score per class (a feature map, boxes) gets its error instead: the mean
    squared difference over the float output's mean square."""
    if fp_logits.ndim != 2:
        fp = fp_logits.reshape(len(fp_logits), -1).astype(np.float64)
        err = ((logits.reshape(len(logits), -1) - fp) ** 2).mean(axis=1)
        return err / max(float((fp ** 2).mean()), 1e-12)

    def log_softmax(z):
        z = z - z.max(axis=1, keepdims=True)
        return z - np.log(np.exp(z).sum(axis=1, keepdims=True))

    lp, lq = log_softmax(fp_logits.astype(np.float64)), log_softmax(logits.astype(np.float64))
    ce = -lq[np.arange(len(lq)), fp_logits.argmax(axis=1)]
    kl = (np.exp(lp) * (lp - lq)).sum(axis=1)
    return ce + kl


def simulate(plan: Plan, configs: np.ndarray, images: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(per-config logits [K, n, classes], float logits [n, classes], pooled stem features [n, C])."""
    out_name = plan.base.graph.output[0].name
    fp = run_values(plan.base, images, [out_name])[out_name]
    logits, pooled = [], None
    for cfg in configs:
        model = build_fixed(plan, cfg, extra_outputs=[plan.features] if pooled is None else [])
        names = [out_name] + ([plan.features] if pooled is None else [])
        res = run_values(model, images, names)
        if pooled is None:
            f = res[plan.features]
            pooled = f.reshape(f.shape[0], f.shape[1], -1).mean(axis=2).astype(np.float32)
        logits.append(res[out_name])
    return np.stack(logits), fp, pooled


def enumerate_configs(candidates: tuple[int, ...], n_groups: int) -> np.ndarray:
    combos = list(itertools.product(candidates, repeat=n_groups))
    if len(combos) > MAX_ENUMERATED:
        combos = [(b,) * n_groups for b in candidates]
        for b in candidates:
            for g in range(n_groups):
                for c in candidates:
                    if c != b:
                        cfg = [b] * n_groups
                        cfg[g] = c
                        combos.append(tuple(cfg))
        combos = sorted(set(combos))
    return np.array(combos, np.float32)


def pareto(avg_bits: np.ndarray, loss: np.ndarray, limit: int = MAX_CONFIGS) -> list[int]:
    """Indices on the (bits ↓, loss ↓) front, thinned to ``limit`` keeping both ends."""
    order = np.lexsort((loss, avg_bits))
    front, best = [], np.inf
    for i in order:
        if loss[i] < best - 1e-12:
            front.append(int(i))
            best = loss[i]
    if len(front) > limit:
        keep = np.unique(np.round(np.linspace(0, len(front) - 1, limit)).astype(int))
        front = [front[k] for k in keep]
    return front


def train_selector(pooled: np.ndarray, losses: np.ndarray, cfg_bits: np.ndarray, target: float, *,
                   steps: int, seed: int = 0) -> Selector:
    """Hard Gumbel-softmax (straight-through) on fixed per-config losses [n, K]; on the CPU
    whatever the device of the run (a network of a few thousand weights: launching its
    steps on a GPU would cost more than they do)."""
    import torch

    torch.manual_seed(seed)
    cpu = torch.device("cpu")
    mu, sd = pooled.mean(axis=0), pooled.std(axis=0) + 1e-6
    x = torch.as_tensor(((pooled - mu) / sd).astype(np.float32), device=cpu)
    L = torch.as_tensor(losses.astype(np.float32), device=cpu)
    bits = torch.as_tensor(cfg_bits.astype(np.float32), device=cpu)
    C, K = x.shape[1], L.shape[1]
    net = torch.nn.Sequential(torch.nn.Linear(C, HIDDEN, device=cpu), torch.nn.ReLU(),
                              torch.nn.Linear(HIDDEN, K, device=cpu))
    opt = torch.optim.Adam(net.parameters(), lr=SELECTOR_LR)
    for step in range(max(1, steps)):
        tau = max(0.3, 1.0 - step / max(1, steps))
        onehot = torch.nn.functional.gumbel_softmax(net(x), tau=tau, hard=True)
        task = (onehot * L).sum(dim=1).mean()
        mean_bits = (onehot @ bits).mean()
        loss = task + PENALTY * torch.relu(mean_bits - target)
        opt.zero_grad()
        loss.backward()
        opt.step()
    w1 = net[0].weight.detach().numpy().T.astype(np.float64)
    b1 = net[0].bias.detach().numpy().astype(np.float64)
    # fold the feature standardisation into the first layer
    w1_f = w1 / sd[:, None]
    b1_f = b1 - (mu / sd) @ w1
    return Selector(w1=w1_f.astype(np.float32), b1=b1_f.astype(np.float32),
                    w2=net[2].weight.detach().numpy().T.astype(np.float32),
                    b2=net[2].bias.detach().numpy().astype(np.float32))


@dataclass
class Cascade:
    """The cascade's choice: ``configs[0]`` runs first, choice k > 0 reruns at ``configs[k]``."""

    selector: Selector
    configs: list[int]              # indices into the simulated configurations
    cost_bits: np.ndarray           # [K]: average bits an image costs at each choice (both passes)
    price: float


def _threshold_selector() -> Selector:
    """Rerun when the margin is below a threshold: choice scores (0, −margin), the
    threshold is the price :func:`calibrate_price` folds into the bias."""
    return Selector(w1=np.ones((1, 1), np.float32), b1=np.zeros(1, np.float32),
                    w2=np.array([[0.0, -1.0]], np.float32), b2=np.zeros(2, np.float32))


def fit_cascade(logits: np.ndarray, losses: np.ndarray, avg: np.ndarray, train_idx: np.ndarray,
                probe_idx: np.ndarray, price_idx: np.ndarray, target: float, *, steps: int,
                seed: int = 0) -> Cascade:
    """The pair (first, rerun) of simulated configurations, the first within ``target``
    and the rerun costlier, whose cascade has the lowest loss on all the probes
    (``probe_idx``) with a plain margin threshold priced to the target on
    ``price_idx`` (the confident probes); then the selector for that pair, trained on
    the first pass's margin (choices: keep, or rerun, which costs both passes) and
    priced the same way.  Scoring pairs on all the probes rather than on the confident
    ones alone: four times the images, and the hard ones are those a rerun is for
    (measured on ResNet-20 with two synthetic sets: +0.5 pt on average over the
    confident probes alone, and over searching only the Pareto front)."""
    best = None
    probe_losses = losses[probe_idx]
    rows = np.arange(len(probe_idx))
    for lo in np.flatnonzero(avg <= target + 1e-9):
        feats = confidence_features(logits[lo])
        for hi in np.flatnonzero(avg > avg[lo]):
            cost = np.array([avg[lo], avg[lo] + avg[hi]], np.float64)
            rule = _threshold_selector()
            calibrate_price(rule, feats[price_idx], cost, target)
            rerun = rule.choose(feats[probe_idx])
            loss = float(np.where(rerun > 0, probe_losses[rows, hi], probe_losses[rows, lo]).mean())
            if best is None or loss < best[0] - 1e-9:
                best = (loss, int(lo), int(hi))
    if best is None:          # target at the costliest configuration: nothing to rerun at
        lo = int(np.argmin(np.where(avg <= target + 1e-9, probe_losses.mean(axis=0), np.inf)))
        return Cascade(selector=_threshold_selector(), configs=[lo], cost_bits=np.array([avg[lo]]), price=0.0)
    _, lo, hi = best
    return fit_pair(logits, losses, avg, lo, hi, train_idx, price_idx, target, steps=steps, seed=seed)


def fit_pair(logits: np.ndarray, losses: np.ndarray, avg: np.ndarray, lo: int, hi: int, train_idx: np.ndarray,
             price_idx: np.ndarray, target: float, *, steps: int, seed: int = 0) -> Cascade:
    """The cascade (``lo`` first, ``hi`` rerun) with its selector trained on the first
    pass's margin and priced to ``target`` on ``price_idx``."""
    cost = np.array([avg[lo], avg[lo] + avg[hi]], np.float64)
    feats = confidence_features(logits[lo])
    selector = train_selector(feats[train_idx], losses[train_idx][:, [lo, hi]], cost, target, steps=steps, seed=seed)
    mu = calibrate_price(selector, feats[price_idx], cost, target)
    return Cascade(selector=selector, configs=[lo, hi], cost_bits=cost, price=mu)


