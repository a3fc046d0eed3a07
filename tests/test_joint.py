"""Pruned groups fitted jointly with their consumers, and pruning allocated across layers."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

import zoo
from datafree.toolchain import graph as G
from datafree.toolchain.compress import compress, plan_pruning
from datafree.toolchain.stages.synthetic import fitting_set
from datafree.toolchain.errors import UserError
from datafree.toolchain.ingest import load
from datafree.toolchain.passes import fit, fold, prune
from datafree.toolchain.recipe import Recipe
from datafree.toolchain.torchgraph import TorchGraph

MODELS = Path(__file__).resolve().parents[1] / "examples" / "models"


def _block(model):
    """Input and output (after the residual Add and ReLU) of the first residual block."""
    a = G.analyse(model)
    conv1 = a.layers[1]
    end = fit._region_end(a.layers[2].node.outputs[0], TorchGraph(model), conv1.node.inputs[0].name,
                          {id(l.node) for l in a.layers})
    return a, conv1.node.inputs[0].name, end


def test_run_region_matches_the_full_graph_and_takes_weight_overrides():
    model = load(MODELS / "resnet20_folded.onnx")
    a, start, end = _block(model)
    assert end != a.layers[2].node.outputs[0].name          # followed through Add and Relu
    tg = TorchGraph(model).eval()
    x = torch.randn(3, 3, 32, 32)
    with torch.no_grad():
        full = tg.run(x, capture=[start, end])
        part = tg.run_region({start: full[start]}, [end])
        torch.testing.assert_close(part[end], full[end], rtol=0, atol=1e-5)
        # a fed initializer replaces the stored one, for this call only
        w = a.layers[1].weight.name
        halved = tg.run_region({start: full[start], w: 0.5 * tg.constant(w)}, [end])[end]
        assert not torch.allclose(halved, full[end])
        G.set_const(a.layers[1].weight, 0.5 * a.layers[1].w_oc())
        torch.testing.assert_close(TorchGraph(model).run(x, capture=[end])[end], halved, rtol=0, atol=1e-5)
    with pytest.raises(KeyError):
        tg.region([end], [start])                            # upstream values cannot be computed


def _pruned_pair(tmp_path):
    """A Conv-BN-ReLU-Conv model, its first conv pruned by half in closed form, its float
    original, and images."""
    _, path = zoo.build("conv_bn_relu_conv", tmp_path)
    reference = load(path)
    for layer in G.analyse(reference).layers:
        fold.fold_batchnorm(layer)
    second = G.analyse(reference).layers[1].name                  # its channels stay
    model = compress(path, Recipe(prune=0.5, wbits=None, synthetic=0, layers={second: {"prune": 0.0}})).model
    x = torch.from_numpy(zoo.images(96, seed=3))
    return model, reference, x


def _region_args(model, reference, x):
    layers = G.analyse(model).layers
    target = layers[1].node.outputs[0].name
    with torch.no_grad():
        y = TorchGraph(reference).run(x, capture=[target])[target]
    return layers[:2], model.graph.inputs[0].name, {target: y}


def test_joint_fit_lowers_the_region_error_deterministically(tmp_path):
    model, reference, x = _pruned_pair(tmp_path)
    layers, start, targets = _region_args(model, reference, x)
    before, after = fit.fit_region(model, x, start, layers, targets, 150, seed=0)
    assert after < 0.7 * before, (before, after)
    again, _, _ = _pruned_pair(tmp_path)
    layers2, _, targets2 = _region_args(again, reference, x)
    fit.fit_region(again, x, start, layers2, targets2, 150, seed=0)
    for l1, l2 in zip(layers, layers2):
        np.testing.assert_array_equal(l1.w_oc(), l2.w_oc())  # recipes reproduce models byte for byte


def test_joint_fit_never_raises_the_error(tmp_path):
    model, reference, x = _pruned_pair(tmp_path)
    layers, start, targets = _region_args(model, reference, x)
    w0 = [l.w_oc().copy() for l in layers]
    before, after = fit.fit_region(model, x, start, layers, targets, 20, lr=50.0)   # diverges
    assert after == before
    for layer, w in zip(layers, w0):
        np.testing.assert_array_equal(layer.w_oc(), w)


@pytest.fixture(scope="module")
def resnet_groups():
    model = load(MODELS / "resnet20_bn.onnx")
    return model, G.analyse(model)


def test_global_allocation_spends_the_uniform_budget_where_cheapest(resnet_groups):
    _, a = resnet_groups
    groups = a.prunable
    curves = {g.name: np.linspace(1.0, 2.0, g.channels) for g in groups}
    cheap = groups[4]
    curves[cheap.name] = curves[cheap.name] * 1e-3
    keep = prune.global_allocation(groups, curves, 0.3)
    per = {g.name: prune.channel_macs(g) for g in groups}
    budget = sum((g.channels - prune.n_keep(g.channels, 0.3)) * per[g.name] for g in groups)
    saved = sum((g.channels - keep[g.name]) * per[g.name] for g in groups)
    assert budget <= saved < budget + max(per.values())
    assert keep[cheap.name] == cheap.channels - int(0.9 * cheap.channels)   # up to the cap
    aligned = prune.global_allocation(groups, curves, 0.3, multiple=8)
    assert all(k % 8 == 0 for k in aligned.values())
    assert sum((g.channels - aligned[g.name]) * per[g.name] for g in groups) >= budget
    # equal costs per channel: MACs decide, so the 32x32 stage loses more than the 8x8 one
    flat = prune.global_allocation(groups, {g.name: np.ones(g.channels) for g in groups}, 0.3)
    first, last = groups[0], groups[-1]
    assert (first.channels - flat[first.name]) / first.channels > (last.channels - flat[last.name]) / last.channels


def test_global_allocation_weighs_channels_by_their_macs_where_sizes_are_symbolic(resnet_groups):
    """With height and width symbolic, channels are weighed at the input size assumed, as
    they are where the size is fixed: the same channels go (not only those of the few
    layers whose size the graph fixes, e.g. after a global pool)."""
    from types import SimpleNamespace

    import onnx

    from datafree.toolchain.stages.load import positions_at

    model, a = resnet_groups
    proto = onnx.load(MODELS / "resnet20_bn.onnx")
    for d in list(proto.graph.input[0].type.tensor_type.shape.dim)[2:]:
        d.Clear()
        d.dim_param = "size"
    del proto.graph.value_info[:]
    sym = load(proto)
    sa = G.analyse(sym)
    assert sum(l.spatial_out() is None for l in sa.layers) > 10
    positions = positions_at(sym, SimpleNamespace(shape=(3, 32, 32)), sa)
    flat = lambda groups: {g.name: np.ones(g.channels) for g in groups}  # noqa: E731
    static = prune.global_allocation(a.prunable, flat(a.prunable), 0.3)
    assert prune.global_allocation(sa.prunable, flat(sa.prunable), 0.3, positions=positions) == static
    assert {g.name: prune.channel_macs(g, positions) for g in sa.prunable} == \
        {g.name: prune.channel_macs(g) for g in a.prunable}


def test_removal_costs_are_relative_to_the_energy_given():
    rng = np.random.default_rng(0)
    x = rng.standard_normal((400, 12))
    H = x.T @ x
    W = rng.standard_normal((12, 4))
    order, costs = prune.removal_order([(H, W, 3)], 4, 3)
    order2, costs2 = prune.removal_order([(H, W, 3)], 4, 3, energy=10.0 * float(np.trace(W.T @ H @ W)))
    np.testing.assert_array_equal(order, order2)
    np.testing.assert_allclose(costs2, costs / 10.0)
    np.testing.assert_array_equal(prune.select_by_output([(H, W, 3)], 4, 2), np.sort(order[:2]))


def _refit_cost(H: np.ndarray, W: np.ndarray, removed: np.ndarray) -> float:
    """Output error of removing ``removed`` (block 1) with the rest refitted optimally."""
    Hinv = np.linalg.inv(H)
    S = np.asarray(removed)
    return float(np.trace(W[S].T @ np.linalg.solve(Hinv[np.ix_(S, S)], W[S])))


def test_wide_groups_are_ordered_in_chunks_at_nearly_the_greedy_cost():
    """Beyond ``max_updates`` channels, channels go in equal chunks (one H⁻¹ update each);
    up to it, one at a time, exactly as before."""
    rng = np.random.default_rng(1)
    x = rng.standard_normal((2000, 48)) @ rng.standard_normal((48, 48)) * 0.3 + rng.standard_normal((2000, 48))
    H, W = x.T @ x, rng.standard_normal((48, 16))
    exact, exact_costs = prune.removal_order([(H, W, 1)], 48, 40, max_updates=40)
    same, same_costs = prune.removal_order([(H, W, 1)], 48, 40)           # 40 <= MAX_UPDATES
    np.testing.assert_array_equal(same, exact)
    np.testing.assert_array_equal(same_costs, exact_costs)
    chunked, costs = prune.removal_order([(H, W, 1)], 48, 40, max_updates=8)
    assert len(set(chunked)) == 40 and len(costs) == 40
    for n in (10, 20, 30, 40):
        assert _refit_cost(H, W, chunked[:n]) <= 1.1 * _refit_cost(H, W, exact[:n])


def test_channel_statistics_are_the_same_captured_group_by_group_or_together(resnet_groups):
    from datafree.toolchain.passes.regions import consumer_statistics

    model, a = resnet_groups
    images = zoo.images(8)
    together = consumer_statistics(model, a.prunable, images, a.layers)
    apart = consumer_statistics(model, a.prunable, images, a.layers, capture_bytes=1)
    assert together.keys() == apart.keys() and len(together) >= 5
    for name, st in together.items():
        assert st.energy == apart[name].energy
        for (H1, W1, b1), (H2, W2, b2) in zip(st.consumers, apart[name].consumers):
            np.testing.assert_array_equal(H1, H2)
            assert b1 == b2


def test_auto_scope_allocates_globally_only_with_output_statistics(resnet_groups):
    model, a = resnet_groups
    recipe = Recipe(prune=0.3, channel_multiple=1)
    uniform = plan_pruning(a, recipe)
    assert {len(p.keep) for p in uniform} == {12, 23, 45}     # 16, 32, 64 channels less floor(30 %)
    stats = fit.consumer_statistics(model, a.prunable, zoo.images(8, (3, 32, 32)), a.layers)
    assert set(stats) == {g.name for g in a.prunable} and all(s.energy > 0 for s in stats.values())
    planned = plan_pruning(a, recipe, stats)
    per = {p.group.name: prune.channel_macs(p.group) for p in planned}
    macs = lambda plans: sum(len(p.pruned) * per[p.group.name] for p in plans)  # noqa: E731
    assert macs(planned) >= macs(uniform)
    assert len({len(p.keep) for p in planned}) > 3
    assert plan_pruning(a, recipe.replace(prune_scope="layer"), stats)[0].keep.size == 12


def test_augmentation_mirrors_and_shifts_image_sets_only():
    x = zoo.images(4, (3, 20, 20))
    got = fitting_set(x, Recipe())
    assert got.shape == (16, 3, 20, 20)
    np.testing.assert_array_equal(got[:4], x)
    np.testing.assert_array_equal(got[4:8], x[..., ::-1])
    both = got[:8]
    for shifted, src in zip(got[8:], both):                  # each a shift of its source by <= 2 px
        assert any(np.array_equal(shifted[:, 2:-2, 2:-2], np.roll(src, (dy, dx), axis=(1, 2))[:, 2:-2, 2:-2])
                   for dy in range(-2, 3) for dx in range(-2, 3))
    np.testing.assert_array_equal(fitting_set(x, Recipe()), got)   # seeded
    assert fitting_set(x, Recipe(augment=False)) is x
    tokens = np.zeros((4, 16), np.float32)
    assert fitting_set(tokens, Recipe()) is tokens


def test_joint_steps_must_be_non_negative():
    with pytest.raises(UserError, match="joint_steps"):
        Recipe(joint_steps=-1)


def test_joint_fit_runs_through_depthwise_groups(tmp_path):
    module, path = zoo.build("mobilenet_like", tmp_path)
    small = {"synthetic": 16, "synthetic_steps": 2, "joint_steps": 10}
    result = compress(path, Recipe(prune=0.5, wbits=8, abits=8, **small))
    x = zoo.images(4)
    import onnxruntime as ort
    import onnx_ir as ir

    sess = ort.InferenceSession(ir.serde.serialize_model(result.model).SerializeToString(),
                                providers=["CPUExecutionProvider"])
    out = sess.run(None, {sess.get_inputs()[0].name: x})[0]
    assert np.isfinite(out).all()
    assert result.summary.totals["macs_after"] < result.summary.totals["macs_before"]


def test_fitting_set_is_thinned_to_the_memory_budget(resnet_groups):
    model, a = resnet_groups
    x = zoo.images(10, (3, 32, 32))
    assert fit.fitting_budget(model, a.layers, x) is x
    per_image = 4 * 16 * 32 * 32                            # the largest layer input: 16 x 32 x 32
    small = fit.fitting_budget(model, a.layers, x, budget=4 * per_image)
    assert len(small) == 4
    np.testing.assert_array_equal(small[0], x[0])
    np.testing.assert_array_equal(small[-1], x[-1])
