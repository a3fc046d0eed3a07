"""TorchGraph must compute what onnxruntime computes, and be differentiable."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx_ir as ir
import onnxruntime as ort
import pytest
import torch
from onnx import TensorProto, helper, numpy_helper

from datafree.toolchain.errors import UserError
from datafree.toolchain.ingest import load
from datafree.toolchain.torchgraph import TorchGraph

MODELS = Path(__file__).resolve().parents[1] / "examples" / "models"
TOL = 1e-4


def ort_run(model: ir.Model, feeds: dict[str, np.ndarray]) -> list[np.ndarray]:
    data = ir.serde.serialize_model(model).SerializeToString()
    sess = ort.InferenceSession(data, providers=["CPUExecutionProvider"])
    return sess.run(None, feeds)


def torch_run(model: ir.Model, feeds: dict[str, np.ndarray]) -> list[np.ndarray]:
    tg = TorchGraph(model)
    with torch.no_grad():
        out = tg.run({k: torch.from_numpy(v) for k, v in feeds.items()})
    return [out[n].numpy() for n in tg.output_names]


def assert_matches_ort(model: ir.Model, feeds: dict[str, np.ndarray], tol: float = TOL) -> None:
    for ref, got in zip(ort_run(model, feeds), torch_run(model, feeds), strict=True):
        assert got.shape == ref.shape
        np.testing.assert_allclose(got.astype(np.float64), ref.astype(np.float64), atol=tol, rtol=0)


@pytest.mark.parametrize("name", ["resnet20_bn", "resnet20_folded", "resnet20_dynamo"])
def test_bundled_resnets_match_onnxruntime(name):
    model = load(MODELS / f"{name}.onnx")
    x = np.random.default_rng(0).standard_normal((4, 3, 32, 32)).astype(np.float32)
    assert_matches_ort(model, {"input": x})


def test_bn_nodes_and_capture_and_stop_after():
    model = load(MODELS / "resnet20_bn.onnx")
    tg = TorchGraph(model)
    bns = tg.bn_nodes()
    assert len(bns) == 19
    node, inp, mean, var = bns[0]
    assert mean.shape == var.shape and mean.dim() == 1
    x = torch.randn(2, 3, 32, 32)
    seen = {}
    out = tg.run(x, capture=[inp], stop_after={inp}, hooks={inp: lambda t: seen.setdefault("v", t)})
    assert inp in out and "logits" not in out
    assert out[inp] is seen["v"] and out[inp].shape[0] == 2
    # a hook changes everything downstream
    full = tg.run(x)["logits"]
    zeroed = tg.run(x, hooks={inp: torch.zeros_like})["logits"]
    assert not torch.allclose(full, zeroed)
    assert torch.allclose(tg.run(x)["logits"], full)  # per-call hooks do not stick


def test_rebuilt_module_sees_changed_weights():
    from datafree.toolchain.graph import analyse, set_const

    model = load(MODELS / "resnet20_folded.onnx")
    x = torch.randn(2, 3, 32, 32)
    before = TorchGraph(model)(x)
    head = analyse(model).layers[-1]
    set_const(head.weight, np.zeros_like(head.weight.const_value.numpy()))
    after = TorchGraph(model)(x)
    assert not torch.allclose(before, after)
    bias = head.bias.const_value.numpy().copy()
    assert torch.allclose(after, torch.from_numpy(bias).expand_as(after))


class Small(torch.nn.Module):
    """Depthwise conv, BN, ReLU6, SiLU, HardSwish, MaxPool, Split/Concat, ConvTranspose, Gemm."""

    def __init__(self):
        super().__init__()
        self.stem = torch.nn.Conv2d(3, 8, 3, stride=2, padding=1)
        self.dw = torch.nn.Conv2d(8, 8, 3, padding=1, groups=8)
        self.pw = torch.nn.Conv2d(8, 16, 1)
        self.bn = torch.nn.BatchNorm2d(16)
        self.up = torch.nn.ConvTranspose2d(8, 8, 3, stride=2, padding=1, output_padding=1)
        self.head = torch.nn.Linear(16 * 4 * 4, 5)
        with torch.no_grad():
            self.bn.running_mean.uniform_(-0.5, 0.5)
            self.bn.running_var.uniform_(0.5, 2.0)
            self.bn.weight.uniform_(0.5, 1.5)
            self.bn.bias.uniform_(-0.2, 0.2)

    def forward(self, x):
        x = torch.nn.functional.relu6(self.stem(x))
        x = torch.nn.functional.silu(self.dw(x))
        x = self.bn(self.pw(x))
        a, b = torch.split(x, [8, 8], dim=1)
        a = torch.nn.functional.hardswish(a)
        b = self.up(torch.nn.functional.max_pool2d(b, 2))
        x = torch.cat([a, b], dim=1)
        x = torch.nn.functional.max_pool2d(x, 2, ceil_mode=True)
        x = torch.nn.functional.adaptive_avg_pool2d(x, 4)
        return self.head(torch.flatten(x, 1))


@pytest.mark.parametrize("opset", [13, 17])
def test_small_torch_export_matches_and_is_differentiable(tmp_path, opset):
    torch.manual_seed(0)
    net = Small().eval()
    path = tmp_path / f"small{opset}.onnx"
    x = torch.randn(2, 3, 16, 16)
    torch.onnx.export(net, (x,), str(path), dynamo=False, opset_version=opset,
                      training=torch.onnx.TrainingMode.PRESERVE,
                      input_names=["x"], output_names=["y"], dynamic_axes={"x": {0: "n"}, "y": {0: "n"}})
    model = load(path)
    ops = {n.op_type for n in model.graph}
    expected = {"Conv", "BatchNormalization", "Clip", "Sigmoid", "MaxPool", "Concat", "Split",
                "ConvTranspose", "Gemm"} | ({"HardSwish"} if opset >= 14 else {"HardSigmoid"})
    assert expected <= ops, ops
    feeds = {"x": np.random.default_rng(1).standard_normal((3, 3, 16, 16)).astype(np.float32)}
    assert_matches_ort(model, feeds)
    with torch.no_grad():
        np.testing.assert_allclose(TorchGraph(model)(torch.from_numpy(feeds["x"])).numpy(),
                                   net(torch.from_numpy(feeds["x"])).numpy(), atol=TOL)
    tg = TorchGraph(model)
    xg = torch.from_numpy(feeds["x"]).requires_grad_(True)
    tg(xg).square().sum().backward()
    assert xg.grad is not None and torch.isfinite(xg.grad).all() and xg.grad.abs().sum() > 0


# --------------------------------------------------------------- single-op checks
def _one_node(op, inputs, attrs=None, consts=None, opset=18, out_type=TensorProto.FLOAT, n_out=1, domain=""):
    """A one-node model; ``inputs`` maps name -> array (graph input) and ``consts`` -> initializer."""
    consts = consts or {}
    names = list(inputs) + list(consts)
    outs = [f"y{i}" for i in range(n_out)]
    node = helper.make_node(op, names, outs, domain=domain, **(attrs or {}))
    graph = helper.make_graph(
        [node], "g",
        [helper.make_tensor_value_info(k, helper.np_dtype_to_tensor_dtype(v.dtype), v.shape)
         for k, v in inputs.items()],
        [helper.make_tensor_value_info(o, out_type, None) for o in outs],
        [numpy_helper.from_array(v, k) for k, v in consts.items()])
    opsets = [helper.make_opsetid("", opset)] + ([helper.make_opsetid(domain, 1)] if domain else [])
    proto = helper.make_model(graph, opset_imports=opsets)
    return load(proto), inputs


def _c(*v, dtype=np.int64):
    return np.array(v, dtype=dtype)


R = np.random.default_rng(3)
X4 = R.standard_normal((2, 3, 7, 9)).astype(np.float32)
CASES = {
    "conv_asym_pads_dil": ("Conv", {"pads": [0, 1, 2, 1], "dilations": [2, 1], "strides": [1, 2]},
                           {"w": R.standard_normal((4, 3, 3, 3)).astype(np.float32)}),
    "conv_same_upper": ("Conv", {"auto_pad": "SAME_UPPER", "strides": [2, 2]},
                        {"w": R.standard_normal((4, 3, 4, 4)).astype(np.float32)}),
    "convT_outpad": ("ConvTranspose", {"strides": [2, 3], "pads": [1, 0, 0, 1], "output_padding": [1, 2]},
                     {"w": R.standard_normal((3, 2, 3, 3)).astype(np.float32),
                      "b": R.standard_normal(2).astype(np.float32)}),
    "maxpool_asym_ceil": ("MaxPool", {"kernel_shape": [3, 3], "strides": [2, 2], "pads": [1, 0, 0, 1],
                                      "ceil_mode": 1}, {}),
    "avgpool_include": ("AveragePool", {"kernel_shape": [3, 2], "pads": [1, 1, 1, 0], "count_include_pad": 1}, {}),
    "avgpool_exclude": ("AveragePool", {"kernel_shape": [3, 3], "strides": [2, 2], "pads": [1, 1, 1, 1]}, {}),
    "reducemean_input_axes": ("ReduceMean", {"keepdims": 0}, {"axes": _c(1, -1)}),
    "reducemax_keep": ("ReduceMax", {}, {"axes": _c(2)}),
    "pad_reflect": ("Pad", {"mode": "reflect"}, {"pads": _c(0, 0, 2, 1, 0, 0, 1, 3)}),
    "pad_edge": ("Pad", {"mode": "edge"}, {"pads": _c(0, 0, 1, 0, 0, 0, 2, 1)}),
    "pad_const": ("Pad", {}, {"pads": _c(0, 1, 0, -1, 1, 0, 2, 1), "v": np.array(0.5, np.float32)}),
    "slice_neg_step": ("Slice", {}, {"s": _c(-1, 1), "e": _c(-100, 8), "a": _c(3, 2), "st": _c(-2, 3)}),
    "resize_nearest_asym": ("Resize", {"mode": "nearest", "coordinate_transformation_mode": "asymmetric",
                                       "nearest_mode": "floor"},
                            {"roi": np.zeros(0, np.float32), "scales": np.array([1, 1, 2, 1.5], np.float32)}),
    "resize_nearest_half": ("Resize", {"mode": "nearest"},
                            {"roi": np.zeros(0, np.float32), "scales": np.array([1, 1, 2, 3], np.float32)}),
    "resize_linear_half": ("Resize", {"mode": "linear"},
                           {"roi": np.zeros(0, np.float32), "scales": np.zeros(0, np.float32),
                            "sizes": _c(2, 3, 12, 5)}),
    "resize_linear_align": ("Resize", {"mode": "linear", "coordinate_transformation_mode": "align_corners"},
                            {"roi": np.zeros(0, np.float32), "scales": np.array([1, 1, 2, 2], np.float32)}),
    "resize_linear_pth": ("Resize", {"mode": "linear", "coordinate_transformation_mode": "pytorch_half_pixel"},
                          {"roi": np.zeros(0, np.float32), "scales": np.array([1, 1, 0.5, 1.7], np.float32)}),
    "split_num_outputs": ("Split", {"axis": 3, "num_outputs": 2}, {}),
    "hardsigmoid": ("HardSigmoid", {"alpha": 0.3, "beta": 0.4}, {}),
    "selu": ("Selu", {}, {}), "elu": ("Elu", {"alpha": 0.7}, {}), "mish": ("Mish", {}, {}),
    "gelu_tanh": ("Gelu", {"approximate": "tanh"}, {}, 20),
    "softplus": ("Softplus", {}, {}), "leakyrelu": ("LeakyRelu", {"alpha": 0.2}, {}),
    "prelu": ("PRelu", {}, {"slope": R.standard_normal((3, 1, 1)).astype(np.float32)}),
    "clip_inputs": ("Clip", {}, {"lo": np.array(-0.5, np.float32), "hi": np.array(0.7, np.float32)}),
    "logsoftmax": ("LogSoftmax", {"axis": 1}, {}),
    "transpose": ("Transpose", {"perm": [0, 2, 3, 1]}, {}),
    "flatten2": ("Flatten", {"axis": 2}, {}),
    "reshape_zero": ("Reshape", {}, {"shape": _c(0, -1, 9)}),
    "gather_axis": ("Gather", {"axis": 3}, {"idx": _c([0, -1], [2, 3])}),
    "expand": ("Expand", {}, {"shape": _c(2, 1, 1, 1)}),
    "layernorm_axis": ("LayerNormalization", {"axis": 2, "epsilon": 1e-3},
                       {"s": R.standard_normal((7, 9)).astype(np.float32), "b": R.standard_normal((7, 9)).astype(np.float32)}, 17),
    "layernorm_scalar_scale": ("LayerNormalization", {"axis": -1},
                               {"s": np.array(1.7, np.float32), "b": np.array(-0.2, np.float32)}, 17),
    "groupnorm_per_channel": ("GroupNormalization", {"num_groups": 3, "epsilon": 1e-3},
                              {"s": R.standard_normal(3).astype(np.float32), "b": R.standard_normal(3).astype(np.float32)}, 21),
    "instancenorm": ("InstanceNormalization", {"epsilon": 1e-4},
                     {"s": R.standard_normal(3).astype(np.float32), "b": R.standard_normal(3).astype(np.float32)}),
}


@pytest.mark.parametrize("case", list(CASES))
def test_single_ops_match_onnxruntime(case):
    op, attrs, consts, *opset = CASES[case]
    n_out = 2 if op == "Split" else 1
    model, feeds = _one_node(op, {"x": X4}, attrs, consts, opset=opset[0] if opset else 18, n_out=n_out)
    assert_matches_ort(model, feeds)


def test_gemm_alpha_beta_trans():
    a = R.standard_normal((5, 4)).astype(np.float32)
    model, feeds = _one_node("Gemm", {"a": a}, {"alpha": 0.5, "beta": 2.0, "transA": 1, "transB": 1},
                             {"b": R.standard_normal((6, 5)).astype(np.float32),
                              "c": R.standard_normal(6).astype(np.float32)})
    assert_matches_ort(model, feeds)


@pytest.mark.parametrize("dtype,opset", [(np.int8, 13), (np.uint8, 13), ("int4", 21)])
def test_quantize_dequantize(dtype, opset):
    x = np.random.default_rng(5).standard_normal((2, 3, 4, 4)).astype(np.float32) * 3
    scale = np.array([0.02, 0.05, 0.1], np.float32)
    if dtype == "int4":
        zp_t = helper.make_tensor("zp", TensorProto.INT4, [3], [0, 1, -2])
        scale = scale * 10
    else:
        zp_t = numpy_helper.from_array(np.array([0, 3, 7], dtype), "zp")
    nodes = [helper.make_node("QuantizeLinear", ["x", "s", "zp"], ["q"], axis=1),
             helper.make_node("DequantizeLinear", ["q", "s", "zp"], ["y"], axis=1)]
    graph = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, x.shape)],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, None)],
                              [numpy_helper.from_array(scale, "s"), zp_t])
    model = load(helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)]))
    assert_matches_ort(model, {"x": x}, tol=1e-6)
    # gradients pass the rounding (straight-through)
    xg = torch.from_numpy(x).requires_grad_(True)
    TorchGraph(model)(xg).sum().backward()
    assert xg.grad.abs().sum() > 0


def test_unknown_op_is_a_user_error():
    model, _ = _one_node("Foo", {"x": X4}, domain="com.example")
    with pytest.raises(UserError, match=r"op com\.example::Foo .* is not supported"):
        TorchGraph(model)


class Normed(torch.nn.Module):
    """Norms other than BN: GroupNorm and InstanceNorm after convs, a LayerNorm'd token MLP."""

    def __init__(self):
        super().__init__()
        self.c1, self.gn = torch.nn.Conv2d(3, 8, 3, padding=1), torch.nn.GroupNorm(2, 8)
        self.c2, self.inorm = torch.nn.Conv2d(8, 8, 3, padding=1), torch.nn.InstanceNorm2d(8, affine=True)
        self.ln, self.fc = torch.nn.LayerNorm(8), torch.nn.Linear(8, 8)

    def forward(self, x):
        x = torch.relu(self.inorm(self.c2(torch.relu(self.gn(self.c1(x))))))
        t = x.flatten(2).transpose(1, 2)                  # [N, tokens, C]
        return (t + self.fc(torch.nn.functional.gelu(self.ln(t)))).mean(1)


@pytest.mark.parametrize("opset", [17, 18, 21])
def test_layer_group_and_instance_norms_match(tmp_path, opset):
    torch.manual_seed(0)
    net = Normed().eval()
    with torch.no_grad():
        for m in (net.gn, net.inorm, net.ln):
            m.weight.uniform_(0.5, 1.5), m.bias.uniform_(-0.5, 0.5)
    path = tmp_path / f"normed{opset}.onnx"
    torch.onnx.export(net, (torch.randn(2, 3, 8, 8),), str(path), dynamo=False, opset_version=opset,
                      input_names=["x"], output_names=["y"], dynamic_axes={"x": {0: "n"}, "y": {0: "n"}})
    model = load(path)
    assert {"LayerNormalization", "InstanceNormalization"} <= {n.op_type for n in model.graph}
    feeds = {"x": np.random.default_rng(1).standard_normal((3, 3, 8, 8)).astype(np.float32)}
    assert_matches_ort(model, feeds)
    with torch.no_grad():
        np.testing.assert_allclose(TorchGraph(model)(torch.from_numpy(feeds["x"])).numpy(),
                                   net(torch.from_numpy(feeds["x"])).numpy(), atol=TOL)


def _lstm_model(direction: str, layout: int = 0, **attrs) -> ir.Model:
    """One ONNX LSTM (4 inputs, 3 hidden) with every output, biases and initial states."""
    rng = np.random.default_rng(0)
    dirs = 2 if direction == "bidirectional" else 1
    inits = [numpy_helper.from_array(rng.standard_normal(s).astype(np.float32) * 0.5, n) for n, s in
             (("W", (dirs, 12, 4)), ("R", (dirs, 12, 3)), ("B", (dirs, 24)), ("h0", (dirs, 2, 3)), ("c0", (dirs, 2, 3)))]
    if layout:
        for t in inits[3:]:
            t.CopyFrom(numpy_helper.from_array(numpy_helper.to_array(t).transpose(1, 0, 2).copy(), t.name))
    node = helper.make_node("LSTM", ["x", "W", "R", "B", "", "h0", "c0"], ["y", "y_h", "y_c"], name="lstm",
                            direction=direction, hidden_size=3, layout=layout, **attrs)
    x_shape = [2, 5, 4] if layout else [5, 2, 4]
    graph = helper.make_graph([node], "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, x_shape)],
                              [helper.make_tensor_value_info(n, TensorProto.FLOAT, None) for n in ("y", "y_h", "y_c")],
                              inits)
    return ir.serde.deserialize_model(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 14)]))


@pytest.mark.parametrize("direction", ["forward", "reverse", "bidirectional"])
def test_lstm_matches_onnxruntime(direction):
    """CRNN text recognisers end in a (bidirectional) LSTM: the differentiable copy runs it."""
    model = _lstm_model(direction)
    x = np.random.default_rng(1).standard_normal([5, 2, 4]).astype(np.float32)
    assert_matches_ort(model, {"x": x}, tol=1e-5)


def test_lstm_variants_it_does_not_run_are_refused_with_the_reason():
    with pytest.raises(UserError, match="LSTM .* with a cell clip is not supported"):
        TorchGraph(_lstm_model("forward", clip=2.0))
    with pytest.raises(UserError, match="LSTM .* with batch-major layout"):
        TorchGraph(_lstm_model("forward", layout=1))
