"""Three small edge models with trained weights, exported as their users export them.

* ``yolo_like`` -- a YOLOv8-style detector: Conv-BN-SiLU, C2f blocks (chunk + Concat),
  SPPF, an upsample + Concat neck (FPN/PAN) and three decoupled heads whose outputs are
  decoded in the graph (DFL, anchors from the feature sizes) into ``[N, 4 + nc, anchors]``
  (box centre/size in pixels, class probabilities).  RGB in [0, 1], stride 32.
* ``db_like`` -- a DB-style text detector: a depthwise backbone, an FPN (upsample + Add,
  then upsample + Concat), head Conv-BN-ReLU, ConvTranspose-BN-ReLU, ConvTranspose,
  Sigmoid: a text-probability map ``[N, 1, H, W]``.  ImageNet mean/std input.
* ``mbv3_like`` -- a MobileNetV3-style text-line direction classifier (0 or 180 degrees):
  depthwise convs, SE blocks (HardSigmoid channel attention by Mul), HardSwish, softmax.
  Input 3 x 48 x 192 in [-1, 1].

Their weights (``tests/models/<name>.pt``, float16 state dicts) come from a short
training on photos with drawn text or pasted objects (``benchmarks/train_edge_models.py``),
so their activations have the statistics of a trained network.  ``photos`` renders the
same kind of inputs from the bundled dev images (never used in that training):

    path = edge_zoo.export("yolo_like", tmp_path)                    # BN folded, dynamic N, H, W
    path = edge_zoo.export("db_like", tmp_path, opset=11, fold_bn=False)
    x = edge_zoo.photos("db_like", 16)                               # float32 NCHW, model's own range
    edge_zoo.sqnr_db(reference_outputs, outputs)
"""

from __future__ import annotations

import copy
import string
import warnings
from pathlib import Path

import numpy as np
import onnx
import torch
from PIL import Image, ImageDraw, ImageFont
from torch import nn
from torch.nn import functional as F

ROOT = Path(__file__).resolve().parent.parent
WEIGHTS = Path(__file__).resolve().parent / "models"
DEV_IMAGES = ROOT / "examples" / "data" / "cifar10_dev500.npz"

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


def _range(mean: tuple[float, ...], std: tuple[float, ...]) -> tuple[float, float]:
    """Smallest and largest value ``(u / 255 - mean) / std`` takes over all channels."""
    return (min((0 - m) / s for m, s in zip(mean, std)), max((1 - m) / s for m, s in zip(mean, std)))


def _info(size, mean, std, stride, input_name, output_name, axes, out_axes) -> dict:
    return dict(size=size, mean=mean, std=std, range=_range(mean, std), stride=stride,
                input=input_name, output=output_name, axes=axes, out_axes=out_axes)


# Each model's input convention, as its users feed it: value = (pixel / 255 - mean) / std;
# ``range`` is the interval that gives, ``size`` the usual (C, H, W), ``stride`` what H and W
# must be multiples of; ``input``, ``output``, ``axes`` (input) and ``out_axes`` the names its
# exporter writes.
_P2O = {0: "p2o.DynamicDimension.0", 2: "p2o.DynamicDimension.1", 3: "p2o.DynamicDimension.2"}
INFO: dict[str, dict] = {
    "yolo_like": _info((3, 256, 256), (0.0, 0.0, 0.0), (1.0, 1.0, 1.0), 32, "images", "output0",
                       {0: "batch", 2: "height", 3: "width"}, {0: "batch", 2: "anchors"}),
    "db_like": _info((3, 256, 256), IMAGENET_MEAN, IMAGENET_STD, 32, "x", "sigmoid_0.tmp_0", _P2O,
                     {0: _P2O[0], 2: "p2o.DynamicDimension.3", 3: "p2o.DynamicDimension.4"}),
    "mbv3_like": _info((3, 48, 192), (0.5, 0.5, 0.5), (0.5, 0.5, 0.5), 8, "x", "softmax_0.tmp_0", _P2O,
                       {0: _P2O[0]}),
}
NAMES = tuple(INFO)
NUM_CLASSES = 10   # yolo_like: the CIFAR-10 class of the pasted photo


# =========================================================================== blocks
class ConvBN(nn.Module):
    """Conv (no bias) - BN - activation, the unit every model here is built of."""

    def __init__(self, cin: int, cout: int, k: int = 1, s=1, groups: int = 1, act: type | None = nn.SiLU,
                 transpose: bool = False):
        super().__init__()
        if transpose:
            self.conv = nn.ConvTranspose2d(cin, cout, k, s, bias=False)
        else:
            self.conv = nn.Conv2d(cin, cout, k, s, k // 2, groups=groups, bias=False)
        self.bn = nn.BatchNorm2d(cout)
        self.act = act() if act is not None else nn.Identity()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.act(self.bn(self.conv(x)))


# --------------------------------------------------------------------- yolo_like
class Bottleneck(nn.Module):
    def __init__(self, c: int, shortcut: bool = True):
        super().__init__()
        self.cv1, self.cv2 = ConvBN(c, c, 3), ConvBN(c, c, 3)
        self.add = shortcut

    def forward(self, x):
        y = self.cv2(self.cv1(x))
        return x + y if self.add else y


class C2f(nn.Module):
    """YOLOv8's C2f: 1x1 conv, chunk in two, bottlenecks on the second half, Concat all, 1x1 conv."""

    def __init__(self, c1: int, c2: int, n: int = 1, shortcut: bool = False):
        super().__init__()
        self.c = c2 // 2
        self.cv1 = ConvBN(c1, 2 * self.c)
        self.cv2 = ConvBN((2 + n) * self.c, c2)
        self.m = nn.ModuleList(Bottleneck(self.c, shortcut) for _ in range(n))

    def forward(self, x):
        y = list(self.cv1(x).chunk(2, 1))
        y.extend(m(y[-1]) for m in self.m)
        return self.cv2(torch.cat(y, 1))


class SPPF(nn.Module):
    """Spatial pyramid pooling, fast: three chained 5x5 max-pools, Concat, 1x1 conv."""

    def __init__(self, c1: int, c2: int, k: int = 5):
        super().__init__()
        self.cv1 = ConvBN(c1, c1 // 2)
        self.cv2 = ConvBN(c1 // 2 * 4, c2)
        self.m = nn.MaxPool2d(k, 1, k // 2)

    def forward(self, x):
        y = [self.cv1(x)]
        y.extend(self.m(y[-1]) for _ in range(3))
        return self.cv2(torch.cat(y, 1))


class DFL(nn.Module):
    """Distribution focal loss integral: softmax over ``reg_max`` bins, expectation by a fixed 1x1 conv."""

    def __init__(self, reg_max: int):
        super().__init__()
        self.reg_max = reg_max
        self.conv = nn.Conv2d(reg_max, 1, 1, bias=False).requires_grad_(False)
        self.conv.weight.data[:] = torch.arange(reg_max, dtype=torch.float32).view(1, reg_max, 1, 1)

    def forward(self, x):
        b, _, a = x.shape
        return self.conv(x.view(b, 4, self.reg_max, a).transpose(2, 1).softmax(1)).view(b, 4, a)


def make_anchors(feats: list[torch.Tensor], strides: tuple[int, ...], offset: float = 0.5):
    """Anchor centres (in cells) and strides of every feature map position, from the maps' sizes."""
    points, stride_list = [], []
    for f, stride in zip(feats, strides):
        _, _, h, w = f.shape
        sx = torch.arange(end=w, dtype=f.dtype) + offset
        sy = torch.arange(end=h, dtype=f.dtype) + offset
        sy, sx = torch.meshgrid(sy, sx, indexing="ij")
        points.append(torch.stack((sx, sy), -1).view(-1, 2))
        stride_list.append(torch.full((h * w, 1), stride, dtype=f.dtype))
    return torch.cat(points).transpose(0, 1), torch.cat(stride_list).transpose(0, 1)


class Detect(nn.Module):
    """Decoupled box (DFL) and class heads on three levels, decoded as ultralytics does."""

    def __init__(self, nc: int, channels: tuple[int, ...], strides=(8, 16, 32), reg_max: int = 16):
        super().__init__()
        self.nc, self.reg_max, self.strides = nc, reg_max, strides
        self.no = nc + 4 * reg_max
        c2, c3 = 24, 16
        self.cv2 = nn.ModuleList(nn.Sequential(ConvBN(c, c2, 3), ConvBN(c2, c2, 3), nn.Conv2d(c2, 4 * reg_max, 1))
                                 for c in channels)
        self.cv3 = nn.ModuleList(nn.Sequential(ConvBN(c, c3, 3), ConvBN(c3, c3, 3), nn.Conv2d(c3, nc, 1))
                                 for c in channels)
        self.dfl = DFL(reg_max)

    def raw(self, feats: list[torch.Tensor]):
        """(box distances in cells [N, 4, A], class logits [N, nc, A], anchors [2, A], strides [1, A])."""
        x = [torch.cat((b(f), c(f)), 1) for f, b, c in zip(feats, self.cv2, self.cv3)]
        n = x[0].shape[0]
        x_cat = torch.cat([xi.view(n, self.no, -1) for xi in x], 2)
        box, cls = x_cat.split((4 * self.reg_max, self.nc), 1)
        anchors, strides = make_anchors(x, self.strides)
        return self.dfl(box), cls, anchors, strides

    def forward(self, feats):
        dist, cls, anchors, strides = self.raw(feats)
        lt, rb = dist.chunk(2, 1)
        a = anchors.unsqueeze(0)
        x1y1, x2y2 = a - lt, a + rb
        box = torch.cat(((x1y1 + x2y2) / 2, x2y2 - x1y1), 1) * strides
        return torch.cat((box, cls.sigmoid()), 1)


class YoloLike(nn.Module):
    def __init__(self, nc: int = NUM_CLASSES, w: tuple[int, ...] = (16, 24, 32, 48, 64)):
        super().__init__()
        self.backbone_p3 = nn.Sequential(ConvBN(3, w[0], 3, 2), ConvBN(w[0], w[1], 3, 2), C2f(w[1], w[1], 1, True),
                                         ConvBN(w[1], w[2], 3, 2), C2f(w[2], w[2], 1, True))
        self.backbone_p4 = nn.Sequential(ConvBN(w[2], w[3], 3, 2), C2f(w[3], w[3], 1, True))
        self.backbone_p5 = nn.Sequential(ConvBN(w[3], w[4], 3, 2), C2f(w[4], w[4], 1, True), SPPF(w[4], w[4]))
        self.up = nn.Upsample(scale_factor=2, mode="nearest")
        self.top4 = C2f(w[4] + w[3], w[3])
        self.top3 = C2f(w[3] + w[2], w[2])
        self.down3 = ConvBN(w[2], w[2], 3, 2)
        self.bottom4 = C2f(w[2] + w[3], w[3])
        self.down4 = ConvBN(w[3], w[3], 3, 2)
        self.bottom5 = C2f(w[3] + w[4], w[4])
        self.detect = Detect(nc, (w[2], w[3], w[4]))

    def features(self, x):
        p3 = self.backbone_p3(x)
        p4 = self.backbone_p4(p3)
        p5 = self.backbone_p5(p4)
        t4 = self.top4(torch.cat((self.up(p5), p4), 1))
        n3 = self.top3(torch.cat((self.up(t4), p3), 1))
        n4 = self.bottom4(torch.cat((self.down3(n3), t4), 1))
        n5 = self.bottom5(torch.cat((self.down4(n4), p5), 1))
        return [n3, n4, n5]

    def forward(self, x):
        return self.detect(self.features(x))


# ----------------------------------------------------------------------- db_like
def _dw_separable(cin: int, cout: int, stride: int) -> nn.Sequential:
    return nn.Sequential(ConvBN(cin, cin, 3, stride, groups=cin, act=nn.ReLU), ConvBN(cin, cout, 1, act=nn.ReLU))


class DBLike(nn.Module):
    """MobileNet-like backbone (C2..C5), DB-FPN, DB probability head."""

    def __init__(self, inner: int = 32, w: tuple[int, ...] = (16, 24, 32, 64, 96)):
        super().__init__()
        self.stem = ConvBN(3, w[0], 3, 2, act=nn.ReLU)
        self.c2 = nn.Sequential(_dw_separable(w[0], w[1], 2), _dw_separable(w[1], w[1], 1))
        self.c3 = nn.Sequential(_dw_separable(w[1], w[2], 2), _dw_separable(w[2], w[2], 1))
        self.c4 = nn.Sequential(_dw_separable(w[2], w[3], 2), _dw_separable(w[3], w[3], 1))
        self.c5 = nn.Sequential(_dw_separable(w[3], w[4], 2), _dw_separable(w[4], w[4], 1))
        self.ins = nn.ModuleList(nn.Conv2d(c, inner, 1, bias=False) for c in w[1:])
        self.outs = nn.ModuleList(nn.Conv2d(inner, inner // 4, 3, padding=1, bias=False) for _ in w[1:])
        q = inner // 4
        self.head = nn.Sequential(ConvBN(inner, q, 3, act=nn.ReLU), ConvBN(q, q, 2, 2, act=nn.ReLU, transpose=True),
                                  nn.ConvTranspose2d(q, 1, 2, 2), nn.Sigmoid())

    def forward(self, x):
        c2 = self.c2(self.stem(x))
        c3 = self.c3(c2)
        c4 = self.c4(c3)
        c5 = self.c5(c4)
        in2, in3, in4, in5 = (conv(c) for conv, c in zip(self.ins, (c2, c3, c4, c5)))
        out4 = in4 + F.interpolate(in5, scale_factor=2, mode="nearest")
        out3 = in3 + F.interpolate(out4, scale_factor=2, mode="nearest")
        out2 = in2 + F.interpolate(out3, scale_factor=2, mode="nearest")
        p2, p3, p4, p5 = (conv(o) for conv, o in zip(self.outs, (out2, out3, out4, in5)))
        p5 = F.interpolate(p5, scale_factor=8, mode="nearest")
        p4 = F.interpolate(p4, scale_factor=4, mode="nearest")
        p3 = F.interpolate(p3, scale_factor=2, mode="nearest")
        return self.head(torch.cat([p5, p4, p3, p2], 1))


# --------------------------------------------------------------------- mbv3_like
class SE(nn.Module):
    """Squeeze-and-excitation: global pool, 1x1 reduce, ReLU, 1x1 expand, HardSigmoid, Mul."""

    def __init__(self, c: int, r: int = 4):
        super().__init__()
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.reduce = nn.Conv2d(c, c // r, 1)
        self.expand = nn.Conv2d(c // r, c, 1)

    def forward(self, x):
        return x * F.hardsigmoid(self.expand(F.relu(self.reduce(self.pool(x)))))


class InvertedResidual(nn.Module):
    def __init__(self, cin: int, hidden: int, cout: int, k: int, se: bool, act: type, stride):
        super().__init__()
        self.expand = ConvBN(cin, hidden, 1, act=act) if hidden != cin else nn.Identity()
        self.dw = ConvBN(hidden, hidden, k, stride, groups=hidden, act=act)
        self.se = SE(hidden) if se else nn.Identity()
        self.project = ConvBN(hidden, cout, 1, act=None)
        self.residual = stride == 1 and cin == cout

    def forward(self, x):
        y = self.project(self.se(self.dw(self.expand(x))))
        return x + y if self.residual else y


class MBV3Like(nn.Module):
    """MobileNetV3-small-like line classifier (strides (2, 1) late, as text-line models use)."""

    def __init__(self, classes: int = 2):
        super().__init__()
        hs, re = nn.Hardswish, nn.ReLU
        self.features = nn.Sequential(
            ConvBN(3, 16, 3, 2, act=hs),
            InvertedResidual(16, 16, 16, 3, True, re, 2),
            InvertedResidual(16, 64, 24, 3, False, re, 2),
            InvertedResidual(24, 72, 24, 3, False, re, 1),
            InvertedResidual(24, 96, 40, 5, True, hs, (2, 1)),
            InvertedResidual(40, 120, 40, 5, True, hs, 1),
            InvertedResidual(40, 144, 48, 5, True, hs, 1),
            ConvBN(48, 288, 1, act=hs))
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(288, classes)

    def logits(self, x):
        return self.fc(torch.flatten(self.pool(self.features(x)), 1))

    def forward(self, x):
        return self.logits(x).softmax(1)


BUILDERS = {"yolo_like": YoloLike, "db_like": DBLike, "mbv3_like": MBV3Like}


# ========================================================================= weights
def build(name: str, trained: bool = True) -> nn.Module:
    """Model ``name`` in eval mode, with its committed trained weights unless ``trained`` is False."""
    module = BUILDERS[name]()
    if trained:
        state = torch.load(WEIGHTS / f"{name}.pt", map_location="cpu", weights_only=True)
        module.load_state_dict({k: v.float() for k, v in state.items()})
    return module.eval()


def fuse_bn(module: nn.Module) -> nn.Module:
    """A copy of ``module`` with every ConvBN's BN folded into its (transposed) conv."""
    from torch.nn.utils.fusion import fuse_conv_bn_eval

    module = copy.deepcopy(module).eval()
    for m in module.modules():
        if isinstance(m, ConvBN) and isinstance(m.bn, nn.BatchNorm2d):
            m.conv = fuse_conv_bn_eval(m.conv, m.bn, transpose=isinstance(m.conv, nn.ConvTranspose2d))
            m.bn = nn.Identity()
    return module


# ========================================================================== export
def export(name: str, tmp_path: Path, *, opset: int = 17, fold_bn: bool = True, dynamic_hw: bool = True,
           module: nn.Module | None = None) -> Path:
    """Export model ``name`` (its trained weights, or ``module``) as its users do; returns the path.

    TorchScript exporter, traced at the usual size with batch 1, batch always dynamic and
    height/width too if ``dynamic_hw``, axes named as the model family's exporter names them.
    ``fold_bn``: BN folded into the convs (``torch.onnx.export``'s default); where the exporter
    leaves a BN (after a ConvTranspose) it is folded before export, so none is left.
    Otherwise every BN is kept as a BatchNormalization node.
    """
    info = INFO[name]
    module = (module if module is not None else build(name)).eval()
    path = Path(tmp_path) / f"{name}_op{opset}{'' if fold_bn else '_bn'}{'_dyn' if dynamic_hw else ''}.onnx"
    _export(module, path, info, opset, fold_bn, dynamic_hw)
    if fold_bn and _has_bn(path):
        _export(fuse_bn(module), path, info, opset, fold_bn, dynamic_hw)
    return path


def _export(module: nn.Module, path: Path, info: dict, opset: int, fold_bn: bool, dynamic_hw: bool) -> None:
    axes = {k: v for k, v in info["axes"].items() if dynamic_hw or k == 0}
    out_axes = {k: v for k, v in info["out_axes"].items() if dynamic_hw or k == 0}
    with warnings.catch_warnings():   # the TorchScript exporter's deprecation and tracer notices
        warnings.simplefilter("ignore")
        torch.onnx.export(
            module, (torch.zeros((1, *info["size"])),), str(path), dynamo=False, opset_version=opset,
            input_names=[info["input"]], output_names=[info["output"]],
            dynamic_axes={info["input"]: axes, info["output"]: out_axes},
            training=torch.onnx.TrainingMode.EVAL, do_constant_folding=fold_bn)


def _has_bn(path: Path) -> bool:
    return any(n.op_type == "BatchNormalization" for n in onnx.load(str(path)).graph.node)


# ================================================================= image rendering
_CHARS = string.ascii_letters + string.digits


def _font(size: int) -> ImageFont.ImageFont:
    return ImageFont.load_default(size)


def _resize(photo: np.ndarray, hw: tuple[int, int]) -> Image.Image:
    return Image.fromarray(photo).resize((hw[1], hw[0]), Image.BILINEAR)


def _text(rng: np.random.Generator, n_min: int = 3, n_max: int = 12) -> str:
    return "".join(rng.choice(list(_CHARS), int(rng.integers(n_min, n_max + 1))))


def _ink(rng: np.random.Generator, background: Image.Image, box) -> tuple[int, int, int]:
    """Dark ink on bright patches and bright ink on dark ones, tinted at random."""
    patch = np.asarray(background.crop(box)).mean()
    base = 20 if patch > 110 else 235
    return tuple(int(np.clip(base + rng.integers(-20, 21), 0, 255)) for _ in range(3))


def render_detection(photos: np.ndarray, labels: np.ndarray, rng: np.random.Generator, hw: tuple[int, int],
                     index: np.ndarray | None = None):
    """yolo_like scenes: one photo upscaled to ``hw``, another pasted on it at a random place and size.

    Returns uint8 NHWC images, boxes [N, 4] (x1, y1, x2, y2 in pixels) and the pasted photos' labels.
    ``index`` picks the background photos (random if None); the pasted one is another, at random.
    """
    n = len(photos) if index is None else len(index)
    out, boxes, classes = [], [], []
    for i in range(n):
        bg = int(index[i]) if index is not None else int(rng.integers(len(photos)))
        fg = int((bg + rng.integers(1, len(photos))) % len(photos))
        scene = _resize(photos[bg], hw)
        side = rng.uniform(0.15, 0.6) * min(hw)
        aspect = rng.uniform(0.7, 1.4)
        w, h = int(side * aspect ** 0.5), int(side / aspect ** 0.5)
        x1, y1 = int(rng.integers(0, hw[1] - w + 1)), int(rng.integers(0, hw[0] - h + 1))
        scene.paste(_resize(photos[fg], (h, w)), (x1, y1))
        out.append(np.asarray(scene))
        boxes.append((x1, y1, x1 + w, y1 + h))
        classes.append(int(labels[fg]))
    return np.stack(out), np.asarray(boxes, np.float32), np.asarray(classes, np.int64)


def render_text_scene(photo: np.ndarray, rng: np.random.Generator, hw: tuple[int, int]):
    """db_like scene: ``photo`` upscaled to ``hw`` with 1-4 lines of text; returns (uint8 HWC, text-box mask)."""
    scene = _resize(photo, hw)
    mask = Image.new("L", (hw[1], hw[0]), 0)
    draw, mdraw = ImageDraw.Draw(scene), ImageDraw.Draw(mask)
    for _ in range(int(rng.integers(1, 5))):
        font = _font(int(rng.integers(12, max(13, min(hw) // 6))))
        text = _text(rng)
        l, t, r, b = draw.textbbox((0, 0), text, font=font)
        if r - l >= hw[1] or b - t >= hw[0]:
            continue
        x, y = int(rng.integers(0, hw[1] - (r - l))) - l, int(rng.integers(0, hw[0] - (b - t))) - t
        box = draw.textbbox((x, y), text, font=font)
        draw.text((x, y), text, font=font, fill=_ink(rng, scene, box))
        mdraw.rectangle(box, fill=1)
    return np.asarray(scene), np.asarray(mask, np.float32)


def render_text_line(photo: np.ndarray, rng: np.random.Generator, hw: tuple[int, int], flip: bool) -> np.ndarray:
    """mbv3_like input: ``photo`` stretched to a ``hw`` line with one line of text; turned 180 degrees if ``flip``."""
    scene = _resize(photo, hw)
    draw = ImageDraw.Draw(scene)
    font = _font(int(rng.integers(hw[0] // 2, hw[0] * 4 // 5)))
    text = _text(rng, 4, 14)
    while len(text) > 1 and draw.textbbox((0, 0), text, font=font)[2] > hw[1] - 4:
        text = text[:-1]
    l, t, r, b = draw.textbbox((0, 0), text, font=font)
    x = int(rng.integers(0, max(1, hw[1] - (r - l)))) - l
    y = int(rng.integers(0, max(1, hw[0] - (b - t)))) - t
    draw.text((x, y), text, font=font, fill=_ink(rng, scene, draw.textbbox((x, y), text, font=font)))
    if flip:
        scene = scene.transpose(Image.Transpose.ROTATE_180)
    return np.asarray(scene)


def normalise(name: str, images: np.ndarray) -> np.ndarray:
    """uint8 NHWC images as model ``name`` takes them: float32 NCHW ``(u / 255 - mean) / std``."""
    info = INFO[name]
    x = images.astype(np.float32) / 255.0
    x = (x - np.asarray(info["mean"], np.float32)) / np.asarray(info["std"], np.float32)
    return np.ascontiguousarray(x.transpose(0, 3, 1, 2), dtype=np.float32)


def dev_photos() -> tuple[np.ndarray, np.ndarray]:
    """The bundled held-out dev photos (uint8 NHWC) and their labels."""
    d = np.load(DEV_IMAGES)
    return d["images"], d["labels"]


def render(name: str, photos: np.ndarray, labels: np.ndarray, n: int, rng: np.random.Generator,
           hw: tuple[int, int], index: np.ndarray | None = None) -> tuple[np.ndarray, tuple]:
    """``n`` uint8 NHWC inputs for model ``name`` made from ``photos``, and what was drawn.

    What was drawn: (boxes, classes) for yolo_like, (text masks,) for db_like, (flipped,) for
    mbv3_like.  ``index``: the photos to use, in order (random if None).
    """
    index = index if index is not None else rng.integers(len(photos), size=n)
    if name == "yolo_like":
        images, boxes, classes = render_detection(photos, labels, rng, hw, index)
        return images, (boxes, classes)
    if name == "db_like":
        scenes = [render_text_scene(photos[i], rng, hw) for i in index]
        return np.stack([s for s, _ in scenes]), (np.stack([m for _, m in scenes]),)
    flips = rng.integers(0, 2, size=len(index)).astype(bool)
    return np.stack([render_text_line(photos[i], rng, hw, f) for i, f in zip(index, flips)]), (flips,)


def photos(name: str, n: int, size: tuple[int, int] | None = None, seed: int = 0) -> np.ndarray:
    """``n`` held-out float32 NCHW inputs for model ``name`` in its own convention, deterministic.

    The bundled dev photos (in order, wrapping after 500) upscaled to ``size`` (H, W; the
    model's usual size if None), with text drawn on them for the OCR-like models and another
    dev photo pasted on them for the detector.  None of them was seen in training.
    """
    hw = tuple(size) if size is not None else INFO[name]["size"][1:]
    images, labels = dev_photos()
    index = np.arange(n) % len(images)
    rendered, _ = render(name, images, labels, n, np.random.default_rng(seed), hw, index)
    return normalise(name, rendered)


# ========================================================================= metrics
def sqnr_db(reference_outputs, outputs) -> float:
    """Output SQNR in dB over all outputs: each output's error energy is divided by that
    output's own energy (so an output is weighed alike whatever its scale), the ratios are
    averaged over the outputs, and the mean is expressed in dB: ``-10 log10(mean_k e_k)``.

    ``reference_outputs``/``outputs``: one array or a list of arrays, in the same order.
    """
    refs = reference_outputs if isinstance(reference_outputs, (list, tuple)) else [reference_outputs]
    outs = outputs if isinstance(outputs, (list, tuple)) else [outputs]
    if len(refs) != len(outs):
        raise ValueError(f"{len(refs)} reference outputs but {len(outs)} outputs")
    ratios = []
    for r, o in zip(refs, outs):
        r, o = np.asarray(r, np.float64), np.asarray(o, np.float64)
        if r.shape != o.shape:
            raise ValueError(f"output shapes differ: {r.shape} vs {o.shape}")
        ratios.append(np.sum((r - o) ** 2) / max(np.sum(r ** 2), 1e-30))
    return float(-10.0 * np.log10(max(np.mean(ratios), 1e-30)))


def map_iou(ref_map: np.ndarray, out_map: np.ndarray, thr: float = 0.5) -> float:
    """IoU of the pixels above ``thr`` in two probability maps (1.0 where both are empty)."""
    a, b = np.asarray(ref_map) > thr, np.asarray(out_map) > thr
    union = np.logical_or(a, b).sum()
    return float(np.logical_and(a, b).sum() / union) if union else 1.0
