"""Small torch models with seeded random weights, exported to ONNX for the tests.

Every builder returns an ``nn.Module`` in eval mode whose BatchNorm layers carry
random running statistics and affine parameters, so BN is never the identity and
a wrong fold or a wrong channel slice shows up in the outputs.  The export helpers
write into a folder the test owns (pytest's ``tmp_path``) and return the path:

    module = zoo.conv_bn_relu_conv()
    path = zoo.export_model(module, tmp_path, "cbrc")          # BN kept, batch dynamic
    path = zoo.folded(module, tmp_path)                         # BN folded into the convs
    x = zoo.images(4, zoo.INPUT_SHAPES["conv_bn_relu_conv"][1:])
"""

from __future__ import annotations

import warnings
from pathlib import Path
from typing import Callable

import numpy as np
import onnx
import onnx_ir as ir
import torch
from torch import nn
from torch.nn import functional as F

OPSET = 17
IMAGE = (1, 3, 32, 32)


# --------------------------------------------------------------------- weights
def randomize(module: nn.Module, seed: int = 0) -> nn.Module:
    """Seeded random weights, and BN statistics far from (0, 1) so BN is not the identity."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for m in module.modules():
            if isinstance(m, (nn.Conv1d, nn.Conv2d, nn.ConvTranspose2d, nn.Linear)):
                fan_in = m.weight[0].numel() if not isinstance(m, nn.ConvTranspose2d) else m.weight.shape[0]
                m.weight.copy_(torch.randn(m.weight.shape, generator=gen) * (2.0 / fan_in) ** 0.5)
                if m.bias is not None:
                    m.bias.copy_(torch.randn(m.bias.shape, generator=gen) * 0.1)
            elif isinstance(m, (nn.BatchNorm1d, nn.BatchNorm2d)):
                c = m.num_features
                m.weight.copy_(torch.rand(c, generator=gen) * 1.5 + 0.25)
                m.bias.copy_(torch.randn(c, generator=gen) * 0.3)
                m.running_mean.copy_(torch.randn(c, generator=gen) * 0.5)
                m.running_var.copy_(torch.rand(c, generator=gen) * 2.0 + 0.2)
    return module.eval()


def images(n: int, shape: tuple[int, ...] = IMAGE[1:], seed: int = 0) -> np.ndarray:
    """``n`` seeded standard-normal float32 inputs, each of ``shape`` (no batch axis)."""
    return np.random.default_rng(seed).standard_normal((n, *shape)).astype(np.float32)


# ---------------------------------------------------------------------- export
def export_model(module: nn.Module, tmp_path: Path, name: str, input_shape: tuple[int, ...] = IMAGE,
                 opset: int = OPSET, *, fold_bn: bool = False, dynamic_spatial: bool = False) -> Path:
    """TorchScript export with a dynamic batch axis; BN nodes are kept unless ``fold_bn``."""
    module = module.eval()
    path = Path(tmp_path) / f"{name}.onnx"
    axes = {0: "batch"}
    if dynamic_spatial:
        axes.update({i: f"d{i}" for i in range(2, len(input_shape))})
    with warnings.catch_warnings():  # the TorchScript exporter's deprecation notice
        warnings.simplefilter("ignore", DeprecationWarning)
        torch.onnx.export(
            module, (torch.zeros(input_shape),), str(path), dynamo=False, opset_version=opset,
            input_names=["input"], output_names=["output"],
            dynamic_axes={"input": axes, "output": {0: "batch"}},
            training=torch.onnx.TrainingMode.EVAL, do_constant_folding=fold_bn,
        )
    return path


def folded(module: nn.Module, tmp_path: Path, name: str = "folded", input_shape: tuple[int, ...] = IMAGE,
           opset: int = OPSET) -> Path:
    """Export with every Conv+BN pair folded into one Conv (no BatchNormalization left)."""
    path = export_model(module, tmp_path, name, input_shape, opset, fold_bn=True)
    if any(n.op_type == "BatchNormalization" for n in onnx.load(str(path)).graph.node):
        path = export_model(fuse_bn(module), tmp_path, name, input_shape, opset, fold_bn=True)
    return path


def fuse_bn(module: nn.Module) -> nn.Module:
    """A copy of ``module`` with each Conv directly followed by a BN (in a Sequential) fused."""
    import copy

    from torch.nn.utils.fusion import fuse_conv_bn_eval

    module = copy.deepcopy(module).eval()
    for parent in module.modules():
        if not isinstance(parent, nn.Sequential):
            continue
        names = list(parent._modules)
        for a, b in zip(names, names[1:]):
            conv, bn = parent._modules[a], parent._modules[b]
            if isinstance(conv, nn.Conv2d) and isinstance(bn, nn.BatchNorm2d):
                parent._modules[a] = fuse_conv_bn_eval(conv, bn)
                parent._modules[b] = nn.Identity()
    return module


def old_opset(module: nn.Module, tmp_path: Path, opset: int = 11, name: str | None = None,
              input_shape: tuple[int, ...] = IMAGE) -> Path:
    """Export at an opset below the normal form's minimum (ingest must upgrade it)."""
    return export_model(module, tmp_path, name or f"opset{opset}", input_shape, opset)


def symbolic_spatial(module: nn.Module, tmp_path: Path, name: str = "symbolic",
                     input_shape: tuple[int, ...] = IMAGE, opset: int = OPSET) -> Path:
    """Export with symbolic batch and symbolic H/W."""
    return export_model(module, tmp_path, name, input_shape, opset, dynamic_spatial=True)


def constant_weights(module: nn.Module, tmp_path: Path, name: str = "constants",
                     input_shape: tuple[int, ...] = IMAGE, opset: int = OPSET) -> Path:
    """Export, then move every initializer into a Constant node (as some exporters write them)."""
    path = export_model(module, tmp_path, name, input_shape, opset)
    proto = onnx.load(str(path))
    consts = [onnx.helper.make_node("Constant", [], [init.name], name=f"const_{i}", value=init)
              for i, init in enumerate(proto.graph.initializer)]
    keep = [i for i in proto.graph.input if i.name not in {c.output[0] for c in consts}]
    del proto.graph.initializer[:]
    del proto.graph.input[:]
    proto.graph.input.extend(keep)
    nodes = consts + list(proto.graph.node)
    del proto.graph.node[:]
    proto.graph.node.extend(nodes)
    onnx.checker.check_model(proto)
    onnx.save(proto, str(path))
    return path


# --------------------------------------------------------------------- models
def _cbr(cin: int, cout: int, k: int = 3, stride: int = 1, groups: int = 1, act: nn.Module | None = None) -> list[nn.Module]:
    return [nn.Conv2d(cin, cout, k, stride, k // 2, groups=groups, bias=False), nn.BatchNorm2d(cout),
            act if act is not None else nn.ReLU()]


def conv_bn_relu_conv(seed: int = 0) -> nn.Module:
    """Conv-BN-ReLU-Conv-BN-ReLU-GAP-Flatten-Gemm."""
    return randomize(nn.Sequential(*_cbr(3, 16), *_cbr(16, 32), nn.AdaptiveAvgPool2d(1), nn.Flatten(),
                                   nn.Linear(32, 10)), seed)


def mlp(seed: int = 0) -> nn.Module:
    """Gemm-ReLU-Gemm on 64 features."""
    return randomize(nn.Sequential(nn.Linear(64, 48), nn.ReLU(), nn.Linear(48, 10)), seed)


class InvertedResidual(nn.Module):
    """MobileNetV2 block: 1x1 expand, 3x3 depthwise, 1x1 project, residual add."""

    def __init__(self, c: int, expand: int = 4) -> None:
        super().__init__()
        h = c * expand
        self.expand = nn.Sequential(*_cbr(c, h, 1, act=nn.ReLU6()))
        self.dw = nn.Sequential(*_cbr(h, h, 3, groups=h, act=nn.ReLU6()))
        self.project = nn.Sequential(nn.Conv2d(h, c, 1, bias=False), nn.BatchNorm2d(c))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.project(self.dw(self.expand(x)))


def mobilenet_like(seed: int = 0) -> nn.Module:
    """Stem, one inverted residual block, 1x1 head, GAP, classifier."""
    return randomize(nn.Sequential(*_cbr(3, 16, 3, 2, act=nn.ReLU6()), InvertedResidual(16),
                                   *_cbr(16, 32, 1, act=nn.ReLU6()), nn.AdaptiveAvgPool2d(1), nn.Flatten(),
                                   nn.Linear(32, 10)), seed)


def vgg_like(seed: int = 0) -> nn.Module:
    """Conv stacks with MaxPool down to 2x2, flattened into a Gemm (4 features per channel)."""
    return randomize(nn.Sequential(
        *_cbr(3, 16), *_cbr(16, 16), nn.MaxPool2d(2),        # 16x16
        *_cbr(16, 32), nn.MaxPool2d(2),                      # 8x8
        *_cbr(32, 32), nn.MaxPool2d(2),                      # 4x4
        *_cbr(32, 16), nn.MaxPool2d(2),                      # 2x2
        nn.Flatten(), nn.Linear(16 * 4, 32), nn.ReLU(), nn.Linear(32, 10)), seed)


def silu_net(seed: int = 0) -> nn.Module:
    """SiLU (exported as x*Sigmoid(x)) and HardSwish activations."""
    return randomize(nn.Sequential(*_cbr(3, 16, act=nn.SiLU()), *_cbr(16, 24, act=nn.Hardswish()),
                                   nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(24, 10)), seed)


class SpelledHardswish(nn.Module):
    """HardSwish written out, as export-minded code does (YOLOv5's ``Hardswish``): it exports
    as Add, Clip, Mul and Div at any opset."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * F.hardtanh(x + 3.0, 0.0, 6.0) / 6.0


class SqueezeExcite(nn.Module):
    def __init__(self, c: int, mid: int) -> None:
        super().__init__()
        self.reduce, self.expand = nn.Conv2d(c, mid, 1), nn.Conv2d(mid, c, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        s = F.adaptive_avg_pool2d(x, 1)
        return x * F.hardsigmoid(self.expand(F.relu(self.reduce(s))))


def hswish_se_net(seed: int = 0) -> nn.Module:
    """Spelled-out HardSwish after a conv and a depthwise conv, then a squeeze-and-excitation
    block gated by HardSigmoid (MobileNetV3's block as paddle2onnx and YOLOv5 write it)."""
    return randomize(nn.Sequential(*_cbr(3, 16, act=SpelledHardswish()), *_cbr(16, 16, groups=16, act=SpelledHardswish()),
                                   SqueezeExcite(16, 8), *_cbr(16, 24), nn.AdaptiveAvgPool2d(1), nn.Flatten(),
                                   nn.Linear(24, 10)), seed)


def tconv_net(seed: int = 0) -> nn.Module:
    """Strided conv down, ConvTranspose up, conv to a 3-channel image output."""
    return randomize(nn.Sequential(*_cbr(3, 16, 3, 2), nn.ConvTranspose2d(16, 8, 2, 2, bias=False),
                                   nn.BatchNorm2d(8), nn.ReLU(), nn.Conv2d(8, 3, 3, padding=1)), seed)


class SplitConcat(nn.Module):
    """Conv, Split into two branches with their own convs, Concat, conv head."""

    def __init__(self) -> None:
        super().__init__()
        self.stem = nn.Sequential(*_cbr(3, 16))
        self.a = nn.Sequential(*_cbr(8, 8))
        self.b = nn.Sequential(*_cbr(8, 8))
        self.head = nn.Sequential(*_cbr(16, 16), nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(16, 10))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        a, b = torch.split(self.stem(x), 8, dim=1)
        return self.head(torch.cat([self.a(a), self.b(b)], dim=1))


def split_concat_net(seed: int = 0) -> nn.Module:
    return randomize(SplitConcat(), seed)


class HandMish(nn.Module):
    """Mish written by hand: exports as Softplus, Tanh and a Mul back onto its input."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * torch.tanh(nn.functional.softplus(x))


def mish_net(seed: int = 0) -> nn.Module:
    """Conv-BN-Mish twice, GAP, Gemm: an activation graph the analysis does not know by name."""
    return randomize(nn.Sequential(*_cbr(3, 16, act=HandMish()), *_cbr(16, 24, act=HandMish()),
                                   nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(24, 10)), seed)


def token_mlp(seed: int = 0) -> nn.Module:
    """Linear-ReLU-Linear on [N, tokens, features]: exported as MatMul + Add (bias), channels last."""
    return randomize(nn.Sequential(nn.Linear(32, 64), nn.ReLU(), nn.Linear(64, 32)), seed)


class ChunkConcat(nn.Module):
    """YOLOv8's C2f pattern: a conv's output chunked in two (Slice), one half straight into a Concat."""

    def __init__(self, c: int = 16):
        super().__init__()
        act = nn.SiLU
        self.stem = nn.Sequential(*_cbr(3, c, act=act()))
        self.cv1 = nn.Sequential(*_cbr(c, c, 1, act=act()))
        self.m = nn.Sequential(*_cbr(c // 2, c // 2, act=act()))
        self.cv2 = nn.Sequential(*_cbr(c + c // 2, c, 1, act=act()))

    def forward(self, x):
        a, b = self.cv1(self.stem(x)).chunk(2, 1)
        return self.cv2(torch.cat([a, b, self.m(b)], 1))


def chunk_concat_net(seed: int = 0) -> nn.Module:
    return randomize(ChunkConcat(), seed)


class ViewFlatten(nn.Module):
    """``x.view(x.size(0), -1)`` before the head: Shape -> Gather(scalar) -> Concat -> Reshape."""

    def __init__(self):
        super().__init__()
        self.features = nn.Sequential(*_cbr(3, 16), *_cbr(16, 16), nn.AdaptiveAvgPool2d(1))
        self.fc = nn.Linear(16, 10)

    def forward(self, x):
        return self.fc(self.features(x).view(x.size(0), -1))


def view_flatten_net(seed: int = 0) -> nn.Module:
    return randomize(ViewFlatten(), seed)


def dynamo(module: nn.Module, tmp_path: Path, name: str = "dynamo", input_shape: tuple[int, ...] = IMAGE) -> Path:
    """torch's default (dynamo) export, batch dynamic: its flatten is Reshape(x, [-1, C], allowzero=1)."""
    path = Path(tmp_path) / f"{name}.onnx"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(module.eval(), (torch.zeros((2, *input_shape[1:])),), str(path), dynamo=True,
                          input_names=["input"], output_names=["output"], verbose=False,
                          dynamic_shapes=({0: torch.export.Dim("batch", min=1, max=1024)},))
    return path


BUILDERS: dict[str, Callable[[], nn.Module]] = {
    "conv_bn_relu_conv": conv_bn_relu_conv,
    "mlp": mlp,
    "mobilenet_like": mobilenet_like,
    "vgg_like": vgg_like,
    "silu_net": silu_net,
    "hswish_se_net": hswish_se_net,
    "tconv_net": tconv_net,
    "split_concat_net": split_concat_net,
    "mish_net": mish_net,
    "token_mlp": token_mlp,
    "chunk_concat_net": chunk_concat_net,
    "view_flatten_net": view_flatten_net,
}
INPUT_SHAPES: dict[str, tuple[int, ...]] = {name: IMAGE for name in BUILDERS} | {"mlp": (1, 64),
                                                                                  "token_mlp": (1, 8, 32)}


def build(name: str, tmp_path: Path, **export_kwargs) -> tuple[nn.Module, Path]:
    """Build zoo model ``name`` and export it; returns (module, path)."""
    module = BUILDERS[name]()
    return module, export_model(module, tmp_path, name, INPUT_SHAPES[name], **export_kwargs)


# ------------------------------------------------------------------- running
def session(model) -> "onnxruntime.InferenceSession":  # noqa: F821
    """An onnxruntime CPU session for a path, ModelProto or onnx_ir.Model."""
    import onnxruntime as ort

    if isinstance(model, ir.Model):
        model = ir.serde.serialize_model(model)
    if isinstance(model, onnx.ModelProto):
        model = model.SerializeToString()
    elif not isinstance(model, bytes):
        model = str(model)
    opts = ort.SessionOptions()
    opts.log_severity_level = 3
    return ort.InferenceSession(model, opts, providers=["CPUExecutionProvider"])


def run(model, x: np.ndarray) -> np.ndarray:
    """First output of ``model`` on ``x`` with onnxruntime."""
    sess = session(model)
    return sess.run(None, {sess.get_inputs()[0].name: x})[0]


def run_torch(module: nn.Module, x: np.ndarray) -> np.ndarray:
    with torch.no_grad():
        return module.eval()(torch.from_numpy(x)).numpy()


def accuracy(model, x: np.ndarray, y: np.ndarray, batch: int = 100) -> float:
    """Top-1 accuracy of a classifier (path, ModelProto or onnx_ir.Model) with onnxruntime."""
    sess = session(model)
    name = sess.get_inputs()[0].name
    logits = np.concatenate([sess.run(None, {name: x[i:i + batch]})[0] for i in range(0, len(x), batch)])
    return float((logits.argmax(axis=1) == y).mean())


def load_images(path: Path) -> tuple[np.ndarray, np.ndarray]:
    """A CIFAR-10 ``.npz`` (uint8 NHWC + mean/std) as normalised float32 NCHW and labels."""
    d = np.load(path)
    x = d["images"].astype(np.float32) / 255.0
    x = (x - d["mean"].reshape(1, 1, 1, 3)) / d["std"].reshape(1, 1, 1, 3)
    return np.ascontiguousarray(x.transpose(0, 3, 1, 2), dtype=np.float32), d["labels"].astype(np.int64)


# ------------------------------------------------------------- compress ready?
_COMPRESS_READY: bool | None = None


def require_compress() -> None:
    """Skip the calling test while ``datafree.toolchain.compress.compress`` is not implemented."""
    import pytest

    global _COMPRESS_READY
    if _COMPRESS_READY is None:
        from datafree.toolchain.compress import compress
        from datafree.toolchain.recipe import Recipe

        import tempfile

        with tempfile.TemporaryDirectory() as tmp:
            try:
                compress(export_model(mlp(), Path(tmp), "probe", INPUT_SHAPES["mlp"]), Recipe(synthetic=0))
                _COMPRESS_READY = True
            except NotImplementedError:
                _COMPRESS_READY = False
    if not _COMPRESS_READY:
        pytest.skip("compress() is not implemented yet")
