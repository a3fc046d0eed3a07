"""The test zoo exports cleanly, survives ingest unchanged, and graph analysis reads it right."""

from __future__ import annotations

import numpy as np
import onnx
import pytest
from torch import nn

import zoo
from datafree.toolchain.graph import analyse
from datafree.toolchain.ingest import load, opset_of

ATOL = 1e-4


def _groups(model):
    return {g.name: g for g in analyse(model).groups}


def _group(groups, fragment: str):
    """The one group whose producer name contains ``fragment``."""
    (g,) = [g for name, g in groups.items() if fragment in name]
    return g


@pytest.mark.parametrize("name", sorted(zoo.BUILDERS))
def test_export_load_and_run_match_torch(name, tmp_path):
    module, path = zoo.build(name, tmp_path)
    x = zoo.images(3, zoo.INPUT_SHAPES[name][1:])
    expected = zoo.run_torch(module, x)
    np.testing.assert_allclose(zoo.run(path, x), expected, atol=ATOL, rtol=0)
    model = load(path)
    assert opset_of(model) == zoo.OPSET
    np.testing.assert_allclose(zoo.run(model, x), expected, atol=ATOL, rtol=0)


@pytest.mark.parametrize("name", sorted(zoo.BUILDERS))
def test_bn_is_kept_and_not_identity(name, tmp_path):
    module, path = zoo.build(name, tmp_path)
    ops = [n.op_type for n in onnx.load(str(path)).graph.node]
    bns = [m for m in module.modules() if isinstance(m, nn.BatchNorm2d)]
    assert ops.count("BatchNormalization") == len(bns)
    for bn in bns:
        assert not np.allclose(bn.running_mean.numpy(), 0) and not np.allclose(bn.running_var.numpy(), 1)


def test_dynamic_batch(tmp_path):
    module, path = zoo.build("conv_bn_relu_conv", tmp_path)
    for n in (1, 5):
        x = zoo.images(n, zoo.IMAGE[1:], seed=n)
        np.testing.assert_allclose(zoo.run(path, x), zoo.run_torch(module, x), atol=ATOL, rtol=0)


# ------------------------------------------------------------------ analysis
def test_conv_bn_relu_conv_analysis(tmp_path):
    _, path = zoo.build("conv_bn_relu_conv", tmp_path)
    a = analyse(load(path))
    assert [(l.kind, l.bn is not None, l.act_type) for l in a.layers] == [
        ("conv", True, "relu"), ("conv", True, "relu"), ("gemm", False, None)]
    first, second, fc = a.groups
    assert first.prunable and [c.layer.name for c in first.consumers] == [second.producer.name]
    assert first.consumers[0].stride == 1 and first.channels == 16
    assert second.prunable and [c.layer.kind for c in second.consumers] == ["gemm"]
    assert second.consumers[0].stride == 1
    assert not fc.prunable and "graph output" in fc.reason


def test_mlp_analysis(tmp_path):
    _, path = zoo.build("mlp", tmp_path)
    a = analyse(load(path))
    assert [(l.kind, l.act_type) for l in a.layers] == [("gemm", "relu"), ("gemm", None)]
    hidden, out = a.groups
    assert hidden.prunable and hidden.consumers[0].layer is a.layers[1] and hidden.channels == 48
    assert not out.prunable


def test_mobilenet_like_analysis(tmp_path):
    _, path = zoo.build("mobilenet_like", tmp_path)
    a = analyse(load(path))
    assert [l.kind for l in a.layers] == ["conv", "conv", "depthwise", "conv", "conv", "gemm"]
    assert {l.act_type for l in a.layers[:3]} == {"clip"}
    groups = _groups(load(path))
    assert not any("dw" in name for name in groups), "depthwise convs ride along, they own no group"
    expand = _group(groups, "expand")
    assert expand.prunable and expand.channels == 64
    assert [d.kind for d in expand.depthwise] == ["depthwise"] and "dw" in expand.depthwise[0].name
    assert [c.layer.name for c in expand.consumers] == [_group(groups, "project").producer.name]
    for tied in (_group(groups, "/0/Conv"), _group(groups, "project")):
        assert not tied.prunable and "residual" in tied.reason
    assert _group(groups, "/4/Conv").prunable


def test_vgg_like_flatten_stride(tmp_path):
    _, path = zoo.build("vgg_like", tmp_path)
    a = analyse(load(path))
    convs = [g for g in a.groups if g.producer.kind == "conv"]
    assert len(convs) == 5 and all(g.prunable for g in convs)
    last = convs[-1]
    assert [(c.layer.kind, c.stride) for c in last.consumers] == [("gemm", 4)]
    assert last.consumers[0].layer.in_channels == last.channels * 4
    for g in convs[:-1]:
        assert [(c.layer.kind, c.stride) for c in g.consumers] == [("conv", 1)]
    hidden = [g for g in a.groups if g.producer.kind == "gemm"][0]
    assert hidden.prunable and hidden.consumers[0].stride == 1


def test_silu_net_activations(tmp_path):
    _, path = zoo.build("silu_net", tmp_path)
    a = analyse(load(path))
    assert [l.act_type for l in a.layers] == ["silu", "hardswish", None]
    assert [len(l.act) for l in a.layers[:2]] == [2, 1]          # Sigmoid + Mul ; HardSwish
    first, second, _ = a.groups
    assert first.prunable and first.consumers[0].layer is a.layers[1]
    assert second.prunable and second.consumers[0].layer.kind == "gemm"


def test_tconv_net_analysis(tmp_path):
    _, path = zoo.build("tconv_net", tmp_path)
    a = analyse(load(path))
    assert [l.kind for l in a.layers] == ["conv", "convtranspose", "conv"]
    assert a.layers[1].out_channels == 8 and a.layers[1].in_channels == 16
    down, up, out = a.groups
    assert down.prunable and down.consumers[0].layer.kind == "convtranspose"
    assert up.prunable and up.producer.bn is not None and up.consumers[0].layer is a.layers[2]
    assert not out.prunable and "graph output" in out.reason


def test_split_concat_analysis(tmp_path):
    _, path = zoo.build("split_concat_net", tmp_path)
    groups = _groups(load(path))
    assert not _group(groups, "stem").prunable and "Split" in _group(groups, "stem").reason
    for branch in ("/a/", "/b/"):
        g = _group(groups, branch)
        assert not g.prunable and "Concat" in g.reason
    head = _group(groups, "head.0")
    assert head.prunable and head.consumers[0].layer.kind == "gemm"


def test_hand_written_mish_keeps_channels_apart(tmp_path):
    _, path = zoo.build("mish_net", tmp_path)
    first, second, _ = analyse(load(path)).groups
    assert first.prunable, first.reason
    assert second.prunable, second.reason


def test_token_mlp_layers(tmp_path):
    _, path = zoo.build("token_mlp", tmp_path)
    a = analyse(load(path))
    assert [(l.kind, l.out_channels, l.act_type) for l in a.layers] == [("matmul", 64, None), ("matmul", 32, None)]


def test_token_mlp_hidden_group_is_prunable(tmp_path):
    """Channels on the last axis ([N, tokens, C]): the bias Add is a member, the MatMul a consumer."""
    _, path = zoo.build("token_mlp", tmp_path)
    hidden = analyse(load(path)).groups[0]
    assert hidden.prunable, hidden.reason
    assert [c.layer.kind for c in hidden.consumers] == ["matmul"]
    assert [n.op_type for n in hidden.members] == ["Add"]
    from datafree.toolchain.compress import compress
    from datafree.toolchain.recipe import Recipe

    result = compress(path, Recipe(prune=0.5, wbits=8, synthetic=0))
    assert result.summary.totals["macs_after"] == result.summary.totals["macs_before"] // 2
    assert zoo.run(result.model, zoo.images(3, (8, 32))).shape == (3, 8, 32)


# ------------------------------------------------------------- export variants
def _same_groups(a, b):
    return [(g.prunable, [c.stride for c in g.consumers], len(g.depthwise)) for g in a.groups] == \
           [(g.prunable, [c.stride for c in g.consumers], len(g.depthwise)) for g in b.groups]


@pytest.mark.parametrize("name", ["conv_bn_relu_conv", "mobilenet_like", "vgg_like"])
def test_folded(name, tmp_path):
    module = zoo.BUILDERS[name]()
    path = zoo.folded(module, tmp_path)
    assert "BatchNormalization" not in {n.op_type for n in onnx.load(str(path)).graph.node}
    x = zoo.images(3, zoo.IMAGE[1:])
    model = load(path)
    np.testing.assert_allclose(zoo.run(model, x), zoo.run_torch(module, x), atol=ATOL, rtol=0)
    a = analyse(model)
    assert all(l.bn is None for l in a.layers)
    assert _same_groups(a, analyse(load(zoo.export_model(module, tmp_path, "bn"))))


def test_fuse_bn_matches(tmp_path):
    module = zoo.conv_bn_relu_conv()
    x = zoo.images(2, zoo.IMAGE[1:])
    np.testing.assert_allclose(zoo.run_torch(zoo.fuse_bn(module), x), zoo.run_torch(module, x), atol=ATOL, rtol=0)


def test_old_opset_is_upgraded(tmp_path):
    module = zoo.conv_bn_relu_conv()
    path = zoo.old_opset(module, tmp_path, opset=11)
    assert onnx.load(str(path)).opset_import[0].version == 11
    model = load(path)
    assert opset_of(model) >= 13
    x = zoo.images(3, zoo.IMAGE[1:])
    np.testing.assert_allclose(zoo.run(model, x), zoo.run_torch(module, x), atol=ATOL, rtol=0)
    assert _same_groups(analyse(model), analyse(load(zoo.export_model(module, tmp_path, "new"))))


@pytest.mark.parametrize("name", ["conv_bn_relu_conv", "mobilenet_like"])
def test_constant_weights_are_lifted(name, tmp_path):
    module = zoo.BUILDERS[name]()
    path = zoo.constant_weights(module, tmp_path)
    proto = onnx.load(str(path))
    assert not proto.graph.initializer and any(n.op_type == "Constant" for n in proto.graph.node)
    x = zoo.images(3, zoo.IMAGE[1:])
    np.testing.assert_allclose(zoo.run(path, x), zoo.run_torch(module, x), atol=ATOL, rtol=0)
    model = load(path)
    assert "Constant" not in {n.op_type for n in model.graph}
    np.testing.assert_allclose(zoo.run(model, x), zoo.run_torch(module, x), atol=ATOL, rtol=0)
    assert _same_groups(analyse(model), analyse(load(zoo.export_model(module, tmp_path, "init"))))


def test_symbolic_spatial(tmp_path):
    module = zoo.conv_bn_relu_conv()
    path = zoo.symbolic_spatial(module, tmp_path)
    dims = onnx.load(str(path)).graph.input[0].type.tensor_type.shape.dim
    assert [d.dim_param for d in dims[2:]] and all(d.dim_param for d in dims[2:])
    x = zoo.images(2, (3, 40, 24))
    model = load(path)
    np.testing.assert_allclose(zoo.run(model, x), zoo.run_torch(module, x), atol=ATOL, rtol=0)
    a = analyse(model)
    assert [g.prunable for g in a.groups] == [True, True, False]   # GAP makes the Flatten size-free
    assert a.layers[0].macs() is None                              # no spatial size, no MAC count


def test_symbolic_spatial_flatten_is_not_pruned(tmp_path):
    path = zoo.symbolic_spatial(zoo.vgg_like(), tmp_path)
    last = [g for g in analyse(load(path)).groups if g.producer.kind == "conv"][-1]
    assert not last.prunable and "static spatial" in last.reason


# ----------------------------------------------------------------- bundled assets
@pytest.mark.parametrize("fixture", ["resnet20_bn", "resnet20_folded", "resnet20_dynamo"])
def test_bundled_resnet20(fixture, request, dev_images, accuracy):
    path = request.getfixturevalue(fixture)
    x, y = dev_images
    assert x.shape == (500, 3, 32, 32) and x.dtype == np.float32 and y.shape == (500,)
    model = load(path)
    acc = accuracy(model, x, y)
    assert acc >= 0.80
    assert accuracy(path, x, y) == acc
    assert accuracy(onnx.load(str(path)), x, y) == acc
    a = analyse(model)
    assert len(a.layers) == 20 and len(a.prunable) >= 9   # the first conv of each block
