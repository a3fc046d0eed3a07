"""Rounding bounds: the SDP lower bound and the rounding upper bound bracket the exact optimum."""

from __future__ import annotations

import itertools
from pathlib import Path

import numpy as np
import pytest

from datafree.toolchain import ingest, quant
from datafree.toolchain.report import bounds, cost, probes

ROOT = Path(__file__).resolve().parents[1]
RESNET = ROOT / "examples" / "models" / "resnet20_bn.onnx"


def _instance(seed: int, n: int = 6):
    rng = np.random.default_rng(seed)
    X = np.maximum(rng.standard_normal((200, n)) + 0.5 * rng.standard_normal(n), 0)   # ReLU-like inputs
    G = X.T @ X / len(X)
    w = rng.standard_normal(n) * rng.uniform(0.05, 0.3)
    s = float(quant.weight_scales(w[None, :], 3)[0])
    return G, w, s


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_sdp_lower_bound_and_rounding_upper_bound_bracket_exhaustive_optimum(seed):
    G, w, s = _instance(seed)
    qmax = quant.weight_qmax(3)                       # 3 bits: integers -3..3, 7^6 vectors
    best, q_best = bounds.exhaustive(G, w, s, qmax)
    # the exhaustive search really is exhaustive: no single-coordinate move improves it
    assert bounds.objective(G, w, s, q_best) == pytest.approx(best)
    cb = bounds.channel_bound(G, w, s, 3, seed=seed)
    tol = 1e-7 * cb.reference
    assert cb.lower <= best + tol
    assert cb.upper >= best - tol
    assert cb.rtn >= best - tol
    assert cb.lower <= cb.upper <= cb.rtn


def test_greedy_descent_stays_in_range_and_never_gets_worse():
    G, w, s = _instance(5, n=12)
    qmax = 3
    q0 = bounds.round_to_nearest(w, s, qmax)
    q = bounds.greedy_descent(G, w, s, q0, qmax)
    assert np.all(np.abs(q) <= qmax) and np.all(q == np.round(q))
    assert bounds.objective(G, w, s, q) <= bounds.objective(G, w, s, q0) + 1e-15


def test_pruning_optimum_equals_brute_force_least_squares():
    rng = np.random.default_rng(3)
    X = rng.standard_normal((100, 6)) + rng.standard_normal(6)
    G = X.T @ X / len(X)
    w = rng.standard_normal(6)
    keep = 2
    brute = min(
        float(np.sum((X @ w - X[:, list(S)] @ np.linalg.lstsq(X[:, list(S)], X @ w, rcond=None)[0]) ** 2) / len(X))
        for S in itertools.combinations(range(6), keep))
    r = bounds.prune_bound(G, w, keep)
    assert r["optimal"] == pytest.approx(brute, rel=1e-9)
    assert r["optimal"] <= r["magnitude_refit"] <= r["magnitude"] + 1e-12
    assert bounds.prune_bound(G, np.ones(40), 10) is None        # C(40, 10) supports: not enumerated


def test_rectified_moments_match_sampling():
    mu, sigma = np.array([-0.5, 0.0, 1.5]), np.array([1.0, 2.0, 0.5])
    m1, m2 = bounds.rectified_moments(mu, sigma)
    z = np.maximum(np.random.default_rng(0).standard_normal((400_000, 3)) * sigma + mu, 0)
    assert m1 == pytest.approx(z.mean(0), rel=0.01)
    assert m2 == pytest.approx((z ** 2).mean(0), rel=0.01)


def test_layer_bounds_on_resnet20_stem_and_skip_reasons():
    model = ingest.load(RESNET)
    layers = cost.compute_layers(model)
    stem, second = layers[0], layers[2]          # conv1 (n = 27) and layer1.0/conv2 (n = 144, BN+ReLU input)
    x = np.random.default_rng(0).standard_normal((4, 3, 32, 32)).astype(np.float32)
    done, skipped = bounds.layer_bounds([stem, second], {stem.name: x}, {stem.name: 4, second.name: 4},
                                        budget_s=30, max_channels=2)
    assert [b.layer for b in done] == [stem.name]
    b = done[0]
    assert b.n == 27 and len(b.channels) == 2 and b.gram == "probes"
    assert b.rtn_db <= b.best_db + 1e-9 <= b.limit_db + 1e-6
    assert "144 per output channel > 64" in skipped[second.name]
    # the data-free Gram of a BN+ReLU input is a valid second-moment matrix
    G = bounds.gram_from_moments(second, layers[1])[0]
    assert G.shape == (144, 144) and np.linalg.eigvalsh(G).min() > -1e-9


def test_gram_from_inputs_matches_an_explicit_patch_loop():
    model = ingest.load(RESNET)
    stem = cost.compute_layers(model)[0]
    x = np.random.default_rng(1).standard_normal((2, 3, 32, 32)).astype(np.float32)
    G = bounds.gram_from_inputs(stem, x)[0]
    xp = np.pad(x, ((0, 0), (0, 0), (1, 1), (1, 1))).astype(np.float64)
    patches = np.stack([xp[n, :, i:i + 3, j:j + 3].ravel() for n in range(2) for i in range(32) for j in range(32)])
    assert np.allclose(G, patches.T @ patches / len(patches))
    assert probes.probe_shape(model, 5) == (5, 3, 32, 32)
