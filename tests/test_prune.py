"""UDFC pruning: the closed form, exact compensation, physical removal, MACs."""

from __future__ import annotations

import numpy as np
import onnx
import pytest
import torch
from torch import nn

import zoo
from datafree.toolchain import graph as G
from datafree.toolchain.compress import compress
from datafree.toolchain.errors import UserError
from datafree.toolchain.ingest import load
from datafree.toolchain.passes import prune
from datafree.toolchain.recipe import Recipe


def test_closed_form_matches_brute_force_least_squares(tmp_path):
    module = zoo.conv_bn_relu_conv(seed=3)
    path = zoo.export_model(module, tmp_path, "cbrc")
    layer = G.analyse(load(path)).layers[0]
    keep, pruned = np.arange(0, 12), np.arange(12, 16)
    S = prune.closed_form_coefficients(layer, keep, pruned, alpha1=0.01)
    # brute force: minimise the UDFC objective numerically, written out from the paper
    bn = module[1]
    w = module[0].weight.detach().numpy().reshape(16, -1).astype(np.float64)
    gamma = bn.weight.detach().numpy().astype(np.float64)
    sigma = np.sqrt(bn.running_var.numpy().astype(np.float64) + bn.eps)
    K = bn.bias.detach().numpy() - gamma * bn.running_mean.numpy() / sigma
    for col, j in enumerate(pruned):
        def objective(s):
            Q = sum(s[k] * gamma[i] * sigma[j] / (sigma[i] * gamma[j]) * w[i] for k, i in enumerate(keep))
            return np.sum((Q - w[j]) ** 2) + 0.01 * (s @ K[keep] - K[j]) ** 2
        from scipy.optimize import minimize

        best = minimize(objective, np.zeros(len(keep)), method="BFGS", options={"gtol": 1e-12}).x
        assert objective(S[:, col]) <= objective(best) + 1e-9
        np.testing.assert_allclose(S[:, col], best, atol=1e-4)


def test_closed_form_without_bn_solves_all_columns_at_once_as_one_by_one(tmp_path):
    """Without a BN (folded, as most exports are), every pruned channel's system has the
    same matrix: one solve for all of them gives what one solve per channel gave."""
    from datafree.toolchain.passes.fold import fold_batchnorm

    path = zoo.export_model(zoo.conv_bn_relu_conv(seed=3), tmp_path, "cbrc")
    layer = G.analyse(load(path)).layers[1]
    fold_batchnorm(layer)
    keep, pruned = np.arange(0, 22), np.arange(22, 32)
    S = prune.closed_form_coefficients(layer, keep, pruned, alpha1=0.01)
    w = layer.w_oc().reshape(layer.out_channels, -1).astype(np.float64)
    K = layer.bias_array().astype(np.float64)
    A = np.vstack([w[keep].T, 0.1 * K[keep][None, :]])
    for col, j in enumerate(pruned):
        one = np.linalg.lstsq(A, np.concatenate([w[j], [0.1 * K[j]]]), rcond=None)[0]
        np.testing.assert_allclose(S[:, col], one, rtol=0, atol=1e-10 * np.abs(one).max())


def _scaled_copy_conv(seed: int = 0) -> nn.Module:
    """Conv-BN-ReLU-Conv whose channel 5 is exactly 0.01 x channel 2 after BN."""
    module = zoo.conv_bn_relu_conv(seed)
    conv, bn = module[0], module[1]
    with torch.no_grad():
        # z_5 = 0.01 z_2 requires gamma5/sigma5 W5 = 0.01 gamma2/sigma2 W2 and K5 = 0.01 K2
        bn.running_var[5] = bn.running_var[2]
        bn.weight[5] = bn.weight[2]
        conv.weight[5] = 0.01 * conv.weight[2]
        bn.running_mean[5] = 0.01 * bn.running_mean[2]
        bn.bias[5] = 0.01 * bn.bias[2]
    return module


@pytest.mark.parametrize("folded", [False, True])
def test_compensation_exact_for_scaled_copy_conv(tmp_path, folded):
    module = _scaled_copy_conv()
    path = zoo.folded(module, tmp_path) if folded else zoo.export_model(module, tmp_path, "copy")
    x = zoo.images(8)
    ref = zoo.run(path, x)
    recipe = Recipe(prune=0.07, wbits=None, synthetic=0, bias_correction=False, channel_multiple=1,
                    layers={"*": {"prune": 0.0}} | {_first_conv(path): {"prune": 0.07}})
    result = compress(path, recipe)
    out = zoo.run(result.model, x)
    assert result.summary.rows[0].channels_after == 15
    np.testing.assert_allclose(out, ref, rtol=1e-5, atol=1e-5 * np.abs(ref).max())
    # without compensation the same pruning changes the output far more
    plain = compress(path, recipe.replace(compensation=False))
    err_plain = np.abs(zoo.run(plain.model, x) - ref).max()
    assert err_plain > 100 * max(np.abs(out - ref).max(), 1e-7)


def _first_conv(path) -> str:
    return G.analyse(load(path)).layers[0].name


def test_compensation_exact_for_linear_combination_gemm(tmp_path):
    """Gemm-Gemm with no activation: any exact linear combination is rebuilt exactly."""
    lin1, lin2 = nn.Linear(32, 24), nn.Linear(24, 10)
    zoo.randomize(nn.Sequential(lin1, lin2), seed=1)
    with torch.no_grad():
        lin1.weight[7] = 0.003 * lin1.weight[1] - 0.002 * lin1.weight[4]
        lin1.bias[7] = 0.003 * lin1.bias[1] - 0.002 * lin1.bias[4]
    path = zoo.export_model(nn.Sequential(lin1, lin2).eval(), tmp_path, "gemm", input_shape=(1, 32))
    x = zoo.images(16, (32,))
    ref = zoo.run(path, x)
    name = _first_conv(path)
    recipe = Recipe(wbits=None, synthetic=0, bias_correction=False, layers={name: {"prune": 0.05}})
    out = zoo.run(compress(path, recipe).model, x)
    np.testing.assert_allclose(out, ref, rtol=1e-5, atol=1e-5 * np.abs(ref).max())


def test_pruned_shapes_macs_and_onnxruntime(tmp_path):
    module, path = zoo.build("conv_bn_relu_conv", tmp_path)
    result = compress(path, Recipe(prune=0.5, wbits=None, synthetic=0))
    model = result.model
    convs = [n for n in model.graph if n.op_type == "Conv"]
    w1 = convs[0].inputs[1].const_value.numpy()
    w2 = convs[1].inputs[1].const_value.numpy()
    # both convs lose half their channels (the second one feeds GAP-Flatten-Gemm)
    assert w1.shape == (8, 3, 3, 3) and w2.shape == (16, 8, 3, 3)
    rows = {r.name: r for r in result.summary.rows}
    first, second = rows[convs[0].name], rows[convs[1].name]
    assert first.macs_after == 32 * 32 * 8 * 3 * 9
    assert second.macs_after == 32 * 32 * 16 * 8 * 9
    assert result.summary.totals["macs_after"] == first.macs_after + second.macs_after + 16 * 10
    out = zoo.run(model, zoo.images(2))
    assert out.shape == (2, 10)


def test_channel_multiple_keeps_vector_friendly_counts(tmp_path):
    _, path = zoo.build("conv_bn_relu_conv", tmp_path)
    result = compress(path, Recipe(prune=0.3, wbits=None, synthetic=0, channel_multiple=8))
    assert result.summary.rows[0].channels_after == 16  # 16 - 4 = 12 -> rounded up to 16
    result = compress(path, Recipe(prune=0.6, wbits=None, synthetic=0, channel_multiple=4))
    assert result.summary.rows[0].channels_after == 8   # 16 - 9 = 7 -> 8


@pytest.mark.parametrize("ratio, multiple, warned", [(0.3, 1, "23"), (0.45, 1, "9, 18"), (0.3, 16, None),
                                                     (0.3, "auto", None)])
def test_note_on_channel_counts_off_the_kernel_blocks(tmp_path, ratio, multiple, warned):
    _, path = zoo.build("conv_bn_relu_conv", tmp_path)
    notes = compress(path, Recipe(prune=ratio, wbits=None, synthetic=0, channel_multiple=multiple)).summary.notes
    odd = [n for n in notes if "not multiples of 4" in n]
    assert len(odd) == (warned is not None)
    if warned:
        assert f"({warned})" in odd[0] and "channel_multiple 'auto'" in odd[0]


@pytest.mark.parametrize("channels, multiple", [(512, 8), (128, 8), (127, 4), (32, 4), (31, 2), (16, 2), (15, 1),
                                                (3, 1)])
def test_auto_channel_multiple_is_8_in_wide_layers_4_below_and_keeps_eight_steps(channels, multiple):
    from datafree.toolchain.passes import prune

    assert prune.group_multiple(channels, "auto") == multiple
    assert prune.group_multiple(channels, 16) == 16
    assert prune.n_keep(channels, 0.3, "auto") % multiple == 0 or prune.n_keep(channels, 0.3, "auto") == channels


def test_auto_channel_multiple_is_the_default_and_counts_follow_it(tmp_path):
    """Pruned by default, every kept count is a multiple of its group's auto multiple, and
    the recipe records 'auto' (the CLI takes it and integers, and refuses anything else)."""
    from datafree.toolchain.passes import prune

    _, path = zoo.build("conv_bn_relu_conv", tmp_path)
    result = compress(path, Recipe(prune=0.3, wbits=None, synthetic=0))
    assert result.recipe.channel_multiple == "auto"
    for row in result.summary.rows:
        if row.channels_after != row.channels_before:
            assert row.channels_after % prune.group_multiple(row.channels_before, "auto") == 0
    with pytest.raises(UserError):
        Recipe(channel_multiple="eight")


@pytest.mark.parametrize("name", ["mobilenet_like", "vgg_like", "silu_net", "mish_net", "tconv_net",
                                  "split_concat_net", "mlp"])
def test_zoo_models_compress_and_run(tmp_path, name):
    module, path = zoo.build(name, tmp_path)
    shape = zoo.INPUT_SHAPES[name][1:]
    x = zoo.images(4, shape)
    ref = zoo.run(path, x)
    result = compress(path, Recipe(prune=0.3, wbits=8, abits=8, synthetic=0))
    out = zoo.run(result.model, x)
    assert out.shape == ref.shape
    assert np.isfinite(out).all()
    onnx.checker.check_model(onnx.load_from_string(
        __import__("onnx_ir").serde.serialize_model(result.model).SerializeToString()))


def test_vgg_flatten_into_gemm_prunes_feature_blocks(tmp_path):
    _, path = zoo.build("vgg_like", tmp_path)
    result = compress(path, Recipe(prune=0.5, wbits=None, synthetic=0))
    gemm = [n for n in result.model.graph if n.op_type == "Gemm"][0]
    # the last conv (16 channels, 2x2 map) lost 8 channels: the Gemm reads 8*4 features
    assert gemm.inputs[1].const_value.numpy().shape[1] == 32


def test_mobilenet_depthwise_pruned_with_its_expand_conv(tmp_path):
    _, path = zoo.build("mobilenet_like", tmp_path)
    result = compress(path, Recipe(prune=0.5, wbits=None, synthetic=0))
    dw = [n for n in result.model.graph if n.op_type == "Conv" and n.attributes["group"].value > 1][0]
    assert dw.attributes["group"].value == 32 and dw.inputs[1].const_value.numpy().shape[0] == 32


def test_scale_compensation_is_applied_when_asked(tmp_path):
    from datafree.toolchain.passes.quantize import scale_compensation

    w = np.random.default_rng(0).standard_normal((4, 9))
    np.testing.assert_allclose(scale_compensation(w, w, np.ones(4)), 1.0)     # nothing lost: s~ = 1
    _, path = zoo.build("conv_bn_relu_conv", tmp_path)
    plain = compress(path, Recipe(wbits=3, synthetic=0))
    scaled = compress(path, Recipe(wbits=3, synthetic=0, scale_compensation=True))
    second_w = lambda r: [n for n in r.model.graph if n.op_type == "Conv"][1].inputs[1]   # noqa: E731
    w_plain = second_w(plain).producer().inputs[1].const_value.numpy()
    w_scaled = second_w(scaled).producer().inputs[1].const_value.numpy()
    assert not np.array_equal(w_plain, w_scaled)


def test_per_channel_constants_are_sliced_right_at_high_ratios(tmp_path):
    """A per-channel scale after the activation (layer-scale style) loses exactly the pruned channels."""
    from torch import nn

    class Scaled(nn.Module):
        def __init__(self):
            super().__init__()
            self.c1, self.b1 = nn.Conv2d(3, 16, 3, padding=1), nn.BatchNorm2d(16)
            self.register_buffer("scale", torch.linspace(0.5, 2.0, 16).reshape(1, 16, 1, 1))
            self.c2 = nn.Conv2d(16, 8, 3, padding=1)

        def forward(self, x):
            return self.c2(torch.relu(self.b1(self.c1(x))) * self.scale)

    module = zoo.randomize(Scaled(), seed=4).eval()
    path = zoo.export_model(module, tmp_path, "scaled")
    for ratio in (0.3, 0.5, 0.75):
        result = compress(path, Recipe(prune=ratio, wbits=None, compensation=False, synthetic=0))
        mul = next(n for n in result.model.graph if n.op_type == "Mul")
        kept = 16 - int(np.floor(ratio * 16 + 1e-9))
        scale = next(v for v in mul.inputs if v.const_value is not None).const_value.numpy().reshape(-1)
        assert scale.shape == (kept,)
        assert np.isin(scale, np.linspace(0.5, 2.0, 16, dtype=np.float32)).all()
        assert zoo.run(result.model, zoo.images(2)).shape == (2, 8, 32, 32)


class _SEBlock(nn.Module):
    """An inverted residual with a squeeze-and-excitation gate, as MobileNetV3 has it."""

    def __init__(self, c: int = 8, hidden: int = 24, squeeze: int = 8):
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(3, c, 3, 1, 1), nn.ReLU())
        self.expand = nn.Sequential(nn.Conv2d(c, hidden, 1), nn.BatchNorm2d(hidden), nn.Hardswish())
        self.dw = nn.Sequential(nn.Conv2d(hidden, hidden, 3, 1, 1, groups=hidden), nn.BatchNorm2d(hidden),
                                nn.Hardswish())
        self.reduce, self.gate = nn.Conv2d(hidden, squeeze, 1), nn.Conv2d(squeeze, hidden, 1)
        self.project = nn.Conv2d(hidden, c, 1)
        self.head = nn.Conv2d(c, 4, 1)

    def forward(self, x):
        x = self.stem(x)
        y = self.dw(self.expand(x))
        g = torch.nn.functional.hardsigmoid(self.gate(torch.relu(self.reduce(y.mean((2, 3), keepdim=True)))))
        return self.head(x + self.project(y * g))


def _se_model(tmp_path, bias_apart: bool):
    """The SE block exported with BN folded; ``bias_apart``: the gate conv's bias as a
    separate per-channel Add (as paddle2onnx writes convolutions)."""
    torch.manual_seed(0)
    module = _SEBlock().eval()
    for m in module.modules():
        if isinstance(m, nn.BatchNorm2d):
            m.running_mean.uniform_(-0.5, 0.5)
            m.running_var.uniform_(0.5, 2.0)
    path = tmp_path / "se.onnx"
    torch.onnx.export(module, (torch.zeros(1, 3, 16, 16),), str(path), dynamo=False, opset_version=17)
    proto = onnx.load(path)
    if bias_apart:
        conv = next(n for n in proto.graph.node if n.op_type == "Conv" and "gate" in n.name)
        bias = conv.input.pop()
        init = next(i for i in proto.graph.initializer if i.name == bias)
        init.dims[:] = [1, init.dims[0], 1, 1]
        out = conv.output[0]
        conv.output[0] = out + "_nobias"
        at = list(proto.graph.node).index(conv) + 1
        proto.graph.node.insert(at, onnx.helper.make_node("Add", [out + "_nobias", bias], [out], name="gate_bias"))
    return load(proto)


@pytest.mark.parametrize("bias_apart", [False, True])
def test_squeeze_excitation_gate_is_pruned_with_the_channels_it_gates(tmp_path, bias_apart):
    """The expand conv's channels go through the depthwise conv, the SE gate's own conv
    (its output rows) and the product: removed together, the kept channels compute
    exactly what they did with the removed ones cut off at the layers that read them."""
    x = np.random.default_rng(0).standard_normal((1, 3, 16, 16)).astype(np.float32)

    def group_of(model):
        a = G.analyse(model)
        g = next(g for g in a.groups if "expand" in g.name)
        return a, g

    masked, pruned_model = _se_model(tmp_path, bias_apart), _se_model(tmp_path, bias_apart)
    a, g = group_of(pruned_model)
    assert g.prunable, g.reason
    assert [gate.name for gate in g.gates] == [next(l.name for l in a.layers if "gate" in l.name)]
    assert {c.layer.name.split("/")[1] for c in g.consumers} == {"project", "reduce"}
    gate_group = next(h for h in a.groups if h.producer is g.gates[0])
    assert not gate_group.prunable and "channel gate" in gate_group.reason
    pruned = np.array([1, 4, 5, 11, 17, 20, 21, 23])
    keep = np.setdiff1d(np.arange(g.channels), pruned)
    for model, group in ((masked, group_of(masked)[1]), (pruned_model, g)):
        for c in group.consumers:             # cut the removed channels off where they are read
            w = prune.consumer_in_weight(c)
            w[:, pruned] = 0
            prune.set_consumer_in_weight(c, w)
    prune.apply(prune.PrunePlan(group=g, keep=keep, pruned=pruned))
    gate = g.gates[0]
    assert gate.out_channels == len(keep) and g.depthwise[0].out_channels == len(keep)
    np.testing.assert_allclose(zoo.run(pruned_model, x), zoo.run(masked, x), rtol=1e-5, atol=1e-5)


def test_se_block_is_pruned_by_compress_and_runs(tmp_path):
    path = tmp_path / "se_full.onnx"
    onnx.save(__import__("onnx_ir").serde.serialize_model(_se_model(tmp_path, True)), path)
    result = compress(path, Recipe(prune=0.3, wbits=None, synthetic=0))
    dw = next(n for n in result.model.graph if n.op_type == "Conv" and n.attributes["group"].value > 1)
    assert dw.attributes["group"].value < 24          # the SE-gated channels lost some
    assert result.summary.totals["macs_after"] < 0.85 * result.summary.totals["macs_before"]
    x = np.random.default_rng(0).standard_normal((1, 3, 16, 16)).astype(np.float32)
    assert np.isfinite(zoo.run(result.model, x)).all()
