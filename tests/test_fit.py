"""Fitting on synthetic images: least-squares refit, GPTQ rounding, ranges for folded models."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

import zoo
from datafree.toolchain import graph as G
from datafree.toolchain.compress import compress
from datafree.toolchain.ingest import load
from datafree.toolchain.passes import fit
from datafree.toolchain.quant import weight_scales
from datafree.toolchain.recipe import Recipe


def _gemm_layer(tmp_path, n_in=12, n_out=5):
    module = torch.nn.Sequential(torch.nn.Linear(n_in, n_out))
    zoo.randomize(module, seed=2)
    path = zoo.export_model(module, tmp_path, "lin", input_shape=(1, n_in))
    return G.analyse(load(path)).layers[0]


def test_refit_is_exact_when_kept_channels_span_the_pruned_one(tmp_path):
    rng = np.random.default_rng(0)
    x_full = rng.standard_normal((500, 13))
    x_full[:, 12] = 0.5 * x_full[:, 3] - 2.0 * x_full[:, 7]          # channel 12 = combination of kept ones
    w_full = rng.standard_normal((13, 5))
    y = x_full @ w_full + 0.3
    layer = _gemm_layer(tmp_path)                                     # 12 inputs: the kept channels
    got = fit.fit_layer(layer, torch.from_numpy(x_full[:, :12]).float(), torch.from_numpy(y).float(),
                        None, Recipe(synthetic=0), ridge=0.0)
    assert got is None
    pred = x_full[:, :12] @ layer.w_oc().T.astype(np.float64) + layer.bias_array()
    np.testing.assert_allclose(pred, y, rtol=1e-4, atol=1e-4)
    # with the default pull toward the (here random) closed form (λ ≈ 12 % of the feature
    # energy here, which is the same in every direction), within 15 %
    layer = _gemm_layer(tmp_path)
    fit.fit_layer(layer, torch.from_numpy(x_full[:, :12]).float(), torch.from_numpy(y).float(),
                  None, Recipe(synthetic=0))
    pred = x_full[:, :12] @ layer.w_oc().T.astype(np.float64) + layer.bias_array()
    assert np.linalg.norm(pred - y) < 0.15 * np.linalg.norm(y)


def test_refit_never_worse_than_the_closed_form_on_its_data(tmp_path):
    rng = np.random.default_rng(1)
    x = rng.standard_normal((400, 12)).astype(np.float32)
    y = (x @ rng.standard_normal((12, 5)) + rng.standard_normal((400, 5)) * 0.5).astype(np.float32)
    layer = _gemm_layer(tmp_path)
    w0, b0 = layer.w_oc().copy(), layer.bias_array().copy()
    err0 = np.sum((x @ w0.T + b0 - y) ** 2)
    fit.fit_layer(layer, torch.from_numpy(x), torch.from_numpy(y), None, Recipe(synthetic=0))
    err1 = np.sum((x @ layer.w_oc().T + layer.bias_array() - y) ** 2)
    assert err1 <= err0


def test_gptq_beats_round_to_nearest_on_correlated_inputs():
    rng = np.random.default_rng(2)
    mix = rng.standard_normal((32, 32))
    x = rng.standard_normal((2000, 32)) @ mix                         # strongly correlated features
    w = rng.standard_normal((8, 32))
    H = torch.from_numpy(x.T @ x)
    scale = weight_scales(w, 3)
    wq, q = fit.gptq(torch.from_numpy(w), H, 3, torch.from_numpy(scale.astype(np.float64)))
    rtn = np.clip(np.round(w / scale[:, None]), -3, 3) * scale[:, None]
    err_gptq = np.sum((x @ (w - wq.numpy()).T) ** 2)
    err_rtn = np.sum((x @ (w - rtn).T) ** 2)
    assert np.all(np.abs(q.numpy()) <= 3) and np.allclose(q.numpy(), np.round(q.numpy()))
    assert err_gptq < 0.7 * err_rtn


def test_nested_gptq_each_bit_width_derives_its_own_fitted_rounding():
    """The int8 weights requantise (as the dynamic ops do) to the plain GPTQ solution
    at the lowest bit-width, and the output error summed over the bit-widths is well
    below rounding to nearest's, on post-ReLU-like correlated inputs."""
    from datafree.ops.reference import derive_weight

    rng = np.random.default_rng(6)
    x = np.maximum(rng.standard_normal((3000, 48)) + 0.5 * rng.standard_normal((3000, 1)), 0)
    w = rng.standard_normal((16, 48))
    H = torch.from_numpy(x.T @ x)
    table = np.ones((9, 16), np.float32)
    for b in (4, 6, 8):
        table[b] = weight_scales(w, b)
    scales = {b: torch.from_numpy(table[b].astype(np.float64)) for b in (4, 6, 8)}
    q8 = fit.nested_gptq(torch.from_numpy(w), H, scales).numpy().astype(np.int8)
    _, q4 = fit.gptq(torch.from_numpy(w), H, 4, scales[4])
    derived4 = np.round(derive_weight(q8, table[8], table, 4) / table[4][:, None])
    fitted_rows = np.all(derived4 == q4.numpy(), axis=1)
    assert fitted_rows.sum() >= 8
    err = {"nested": 0.0, "nearest": 0.0}
    for b in (4, 6, 8):
        qmax = 2 ** (b - 1) - 1
        nearest = np.clip(np.round(w / table[b][:, None]), -qmax, qmax) * table[b][:, None]
        err["nested"] += np.sum((x @ (w - derive_weight(q8, table[8], table, b)).T) ** 2)
        err["nearest"] += np.sum((x @ (w - nearest).T) ** 2)
    assert err["nested"] < 0.8 * err["nearest"]


def test_nested_gptq_no_row_worse_than_stored_nearest():
    """Per output row, the error summed over the bit-widths, with every bit-width
    derived from the stored int8 as the ops derive it, is never above that of storing
    the int8 rounded to nearest (the guard's alternative), on inputs where some rows
    fall back."""
    from datafree.ops.reference import derive_weight

    rng = np.random.default_rng(11)
    x = rng.standard_normal((400, 24)) * np.geomspace(1, 30, 24)     # badly conditioned: GPTQ can lose
    w = rng.standard_normal((32, 24))
    table = np.ones((9, 32), np.float32)
    for b in (4, 6, 8):
        table[b] = weight_scales(w, b)
    scales = {b: torch.from_numpy(table[b].astype(np.float64)) for b in (4, 6, 8)}
    q8 = fit.nested_gptq(torch.from_numpy(w), torch.from_numpy(x.T @ x), scales).numpy().astype(np.int8)
    near8 = np.clip(np.round(w / table[8][:, None]), -127, 127).astype(np.int8)

    def row_error(q):
        return sum(np.sum((x @ (w - derive_weight(q, table[8], table, b)).T) ** 2, axis=0) for b in (4, 6, 8))

    assert np.all(row_error(q8) <= row_error(near8) * (1 + 1e-6))


def test_gptq_keeps_inside_bounds():
    rng = np.random.default_rng(4)
    x = rng.standard_normal((500, 20))
    w = rng.standard_normal((6, 20))
    scale = weight_scales(w, 8)
    lo = torch.from_numpy(rng.integers(-20, 5, (6, 20)).astype(np.float64))
    hi = lo + torch.from_numpy(rng.integers(0, 4, (6, 20)).astype(np.float64))
    _, q = fit.gptq(torch.from_numpy(w), torch.from_numpy(x.T @ x), 8, torch.from_numpy(scale.astype(np.float64)),
                    bounds=(lo, hi))
    assert torch.all(q >= lo) and torch.all(q <= hi)


@pytest.fixture(scope="module")
def synthetic_small():
    from conftest import SMALL_SYNTHETIC

    return SMALL_SYNTHETIC


def test_folded_model_gets_activation_ranges_from_synthetic_images(resnet20_folded, synthetic_small):
    result = compress(resnet20_folded, Recipe(wbits=8, abits=8, max_activation_loss=None, **synthetic_small))
    layers = json.loads(result.model.metadata_props["datafree.layers"])
    assert all(v["abits"] == 8 for v in layers.values())
    n_q = sum(1 for n in result.model.graph if n.op_type == "QuantizeLinear")
    assert n_q >= 19


def test_synthetic_fit_beats_closed_form_on_pruned_resnet20(resnet20_bn, dev_images, accuracy, synthetic_small):
    x, y = dev_images
    closed = compress(resnet20_bn, Recipe(prune=0.3, wbits=None, synthetic=0))
    fitted = compress(resnet20_bn, Recipe(prune=0.3, wbits=None, **synthetic_small))
    a_closed, a_fit = accuracy(closed.model, x, y), accuracy(fitted.model, x, y)
    assert a_fit > a_closed + 0.05, (a_closed, a_fit)


W4, P3, P35, P5 = (Recipe(wbits=4, abits=8, prune=p) for p in (0.0, 0.3, 0.35, 0.5))


@pytest.mark.parametrize("macs, recipe, expected", [
    (40.6e6, P5, (256, 80, 300)),                        # CIFAR ResNet-20 pruned by half: as given
    (126e6, P5, (256, 80, 300)),                         # CIFAR ResNet-56: as given
    (150e6, P5, (256, 80, 300)),                         # the reference itself
    (300e6, P5, (128, 80, 150)),                         # 2x: in proportion
    (1.82e9, P5, (32, 80, 50)),                          # ResNet-18 at 224: the floors
    (40.6e6, P3, (128, 40, 100)),                        # pruned by 30 %: the light work
    (40.6e6, W4, (256, 80, 300)),                        # refitted, not pruned: as given
    (40.6e6, P35, (192, 60, 200)),                       # in between: in proportion
    (126e6, P3, (128, 40, 100)),
    (300e6, P3, (128, 40, 100)),                         # both caps at 128: the smaller one binds
    (1.82e9, P3, (32, 40, 50)),
    (40.6e6, Recipe(wbits=8, abits=8), (256, 80, 300)),  # ranges only (refits=False below)
    (40.6e6, P3.replace(synthetic=64, synthetic_steps=20, joint_steps=50), (64, 20, 50)),  # never more than asked
    (1.82e9, P5.replace(fit_budget="full"), (256, 80, 300)),
    (1.82e9, P3.replace(fit_budget="full"), (256, 80, 300)),
    (1.82e9, P5.replace(time_budget="5m"), (256, 80, 300)),   # the time budget scales instead (budget.py)
    (1.82e9, P5.replace(synthetic=0), (0, 80, 300)),
    (None, P5, (256, 80, 300)),                          # MACs unknown (symbolic sizes)
])
def test_fitting_work_scales_with_the_model_cost_and_the_prune_ratio(macs, recipe, expected):
    from datafree.toolchain.stages.synthetic import fitting_work

    work = fitting_work(recipe, macs, refits=recipe.wbits < 8 or recipe.prune > 0)
    got = (work.images, work.gen_steps, work.joint_steps)
    assert got == expected
    assert (work.note is None) == (got == (recipe.synthetic, recipe.synthetic_steps, recipe.joint_steps))
    if work.note:
        assert f"{got[0]} synthetic images ({got[1]} generator steps) with {got[2]} joint steps" in work.note
        assert "--fit-budget full" in work.note


def test_fitting_layer_by_layer_from_kept_values_equals_refitting_from_the_input(tmp_path, monkeypatch):
    """The fit keeps the compressed network's values between layers instead of running it
    from the input for each layer: same weights and ranges either way (pruned + W4A8 on a
    model with a Split/Concat neck, an upsample, two outputs and symbolic height/width)."""
    import edge_zoo

    path = edge_zoo.export("yolo_like", tmp_path, opset=17, fold_bn=True)
    recipe = Recipe(prune=0.3, wbits=4, abits=8, synthetic=8, joint_steps=5, augment=False)
    kept = compress(path, recipe, input_shape=(3, 64, 64))
    monkeypatch.setattr(fit, "FRONTIER_BYTES", 0)          # every value from the input again
    monkeypatch.setattr(fit, "REF_CACHE_BYTES", 0)
    again = compress(path, recipe, input_shape=(3, 64, 64))
    a = {v.name: v.const_value.numpy() for v in kept.model.graph.initializers.values() if v.const_value is not None}
    b = {v.name: v.const_value.numpy() for v in again.model.graph.initializers.values() if v.const_value is not None}
    assert a.keys() == b.keys()
    for name in a:
        np.testing.assert_allclose(a[name].astype(np.float64), b[name].astype(np.float64), rtol=1e-4, atol=1e-5,
                                   err_msg=name)


class _BoxesOfBatchOne(torch.nn.Module):
    """A fixed-batch detector's output layout: every image's boxes along one axis, ``[1, N*HW, 4]``."""

    def __init__(self, body):
        super().__init__()
        self.body = body

    def forward(self, x):
        return self.body(x).permute(0, 2, 3, 1).reshape(1, -1, 4)


@pytest.mark.parametrize("batch_in_first_axis", [True, False])
def test_activation_floor_keeps_float_the_tensor_whose_range_wrecks_the_output(batch_in_first_axis, tmp_path):
    """A range that clips most of one tensor costs far more than the 3 dB allowed beyond the
    weights: that tensor (and only it) stays float, the result is back within target, the
    note names it; with every range sound nothing changes.  Also where the output does not
    keep the images apart along its first axis."""

    from datafree.toolchain import ingest
    from datafree.toolchain.passes import floor
    from datafree.toolchain.passes.qdq import ActQuant
    from datafree.toolchain.quant import act_qparams

    module = torch.nn.Sequential(torch.nn.Conv2d(3, 8, 3, padding=1), torch.nn.ReLU(),
                                 torch.nn.Conv2d(8, 8, 3, padding=1), torch.nn.ReLU(),
                                 torch.nn.Conv2d(8, 4, 1))
    zoo.randomize(module, seed=3)
    if not batch_in_first_axis:
        module = _BoxesOfBatchOne(module)
    model = load(zoo.export_model(module, tmp_path, "three", input_shape=(1, 3, 16, 16)))
    reference = ingest.to_ir(model)
    layers = G.analyse(model).layers
    x = np.random.default_rng(0).standard_normal((16, 3, 16, 16)).astype(np.float32)
    ins = [l.node.inputs[0].name for l in layers]
    with torch.no_grad():
        from datafree.toolchain.torchgraph import TorchGraph

        got = TorchGraph(model).run(torch.from_numpy(x), capture=ins)

    def quant(name, shrink=1.0):
        v = got[name]
        return ActQuant(8, *act_qparams(float(v.min()) * shrink, float(v.max()) * shrink, 8))

    sound = {n: quant(n) for n in ins}
    res = floor.activation_floor(model, reference, layers, sound, x)
    assert res.kept_float == [] and res.acts.keys() == sound.keys() and res.note() is None
    broken = dict(sound)
    broken[ins[1]] = quant(ins[1], shrink=0.02)           # clips 98 % of the range away
    res = floor.activation_floor(model, reference, layers, broken, x)
    assert res.kept_float == [ins[1]]
    assert set(res.acts) == {ins[0], ins[2]}
    assert res.before_db < res.target_db <= res.after_db
    assert ins[1] in res.note()


def test_activation_floor_does_not_act_on_outputs_too_weak_to_judge_by(tmp_path):
    """Where the weights alone keep less than TRUSTED_DB of the output on the held-out
    inputs, nothing is dropped and the note says why."""
    from datafree.toolchain import ingest
    from datafree.toolchain.passes import floor
    from datafree.toolchain.passes.qdq import ActQuant

    module = torch.nn.Sequential(torch.nn.Conv2d(3, 4, 3, padding=1))
    zoo.randomize(module, seed=4)
    model = load(zoo.export_model(module, tmp_path, "one", input_shape=(1, 3, 8, 8)))
    reference = ingest.to_ir(model)
    layer = G.analyse(model).layers[0]
    layer.set_w_oc(layer.w_oc() * 0.2)                      # the "weights" lose most of the output
    x = np.random.default_rng(0).standard_normal((8, 3, 8, 8)).astype(np.float32)
    acts = {layer.node.inputs[0].name: ActQuant(8, 0.5, 0, True)}
    res = floor.activation_floor(model, reference, [layer], acts, x)
    assert res.untrusted and res.kept_float == [] and res.acts == acts
    assert "not applied" in res.note()


def test_activation_floor_reads_class_scores_by_their_top_class_and_allows_for_scatter():
    """Softmax outputs and [N, C] score vectors are class scores (enough at ENOUGH_CLASS_DB);
    maps and boxes are not. The upper SQNR allows one standard error of the per-input
    errors: equal to the SQNR when every input errs alike, above it when they scatter."""
    import onnx_ir as ir

    from datafree.toolchain.passes import floor

    def value(shape, op=None):
        v = ir.Value(name="y", shape=ir.Shape(shape))
        if op is not None:
            ir.Node("", op, inputs=[ir.Value(name="x")], outputs=[v])
        return v

    assert floor._class_scores(value(["N", 10]))
    assert floor._class_scores(value(["N", "T", 97], "Softmax"))
    # a Softmax over an inner axis as exporters write it: Reshape -> Softmax -> Reshape
    logits = ir.Value(name="logits", shape=ir.Shape(["NT", 97]))
    flat = ir.Value(name="flat", shape=ir.Shape(["NT", 97]))
    ir.Node("", "Softmax", inputs=[logits], outputs=[flat])
    probs = ir.Value(name="probs", shape=ir.Shape(["N", "T", 97]))
    ir.Node("", "Reshape", inputs=[flat, ir.Value(name="shape")], outputs=[probs])
    assert floor._class_scores(probs) and floor._scored(probs) == "logits"
    assert not floor._class_scores(value(["N", 1]))
    assert not floor._class_scores(value(["N", 84, 8400]))
    assert not floor._class_scores(value(["N", 1, "H", "W"], "Sigmoid"))
    assert floor.ENOUGH_CLASS_DB < floor.ENOUGH_DB
    ref = [torch.ones(8, 4)]
    even = [ref[0] + 0.1]
    assert abs(floor._sqnr_upper(ref, even) - floor._sqnr(ref, even)) < 1e-9
    uneven = [ref[0] + torch.tensor([0.0] * 7 + [0.5]).unsqueeze(1)]
    assert floor._sqnr_upper(ref, uneven) > floor._sqnr(ref, uneven) + 1.0


def test_a_range_before_an_activation_is_chosen_by_the_error_after_it():
    """SiLU is flat far below zero: the range of its input gives the negative tail up for
    a finer positive side, and the error after the SiLU is lower than with the MSE range
    of the input itself."""
    from datafree.toolchain.passes.fit import _range_after
    from datafree.toolchain.quant import act_qparams, fake_quant_act
    from datafree.toolchain.stats import mse_range

    x = torch.from_numpy(np.random.default_rng(0).standard_t(4, 100_000) * 2.0)
    silu = torch.nn.functional.silu

    def err_after(lo, hi):
        s, z, signed = act_qparams(lo, hi, 8)
        return float(torch.mean((silu(torch.from_numpy(fake_quant_act(x.numpy(), s, z, 8, signed))) - silu(x)) ** 2))

    lo, hi = _range_after(x, 8, silu, [])
    mlo, mhi = mse_range(x.numpy(), 8)
    assert lo > 0.5 * mlo and err_after(lo, hi) < 0.5 * err_after(mlo, mhi)
