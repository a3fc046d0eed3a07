"""What input the compressor assumes: the size where the export left it symbolic, and the
value range, read from the model alone."""

from __future__ import annotations

import numpy as np
import onnx
import pytest
from onnx import numpy_helper

import zoo
from datafree.toolchain import inputs
from datafree.toolchain.ingest import load

STANDARD = inputs.CONVENTIONS["imagenet"]


def expecting(path, convention: inputs.Convention, out_path, *, into_conv: bool = False) -> str:
    """The same network, made to expect ``convention`` instead of mean/std normalised inputs:
    ``x_std = a·x + c`` per channel, as Mul and Add nodes before the graph (exact), or
    ``into_conv``: folded into the first convolution, as training on that convention
    would leave it (exact but at the zero-padded border)."""
    proto = onnx.load(str(path))
    m, s = np.array(STANDARD.mean), np.array(STANDARD.std)
    a = np.array(convention.std) / (convention.scale * s)
    c = (np.array(convention.mean) / convention.scale - m) / s
    if into_conv:
        inits = {t.name: t for t in proto.graph.initializer}
        first = next(n for n in proto.graph.node if n.op_type == "Conv")
        w = numpy_helper.to_array(inits[first.input[1]]).astype(np.float64)
        b = numpy_helper.to_array(inits[first.input[2]]).astype(np.float64)
        inits[first.input[1]].CopyFrom(numpy_helper.from_array((w * a[None, :, None, None]).astype(np.float32),
                                                               first.input[1]))
        inits[first.input[2]].CopyFrom(numpy_helper.from_array((b + w.sum(axis=(2, 3)) @ c).astype(np.float32),
                                                               first.input[2]))
    else:
        name = proto.graph.input[0].name
        for node in proto.graph.node:
            node.input[:] = ["x_std" if i == name else i for i in node.input]
        proto.graph.initializer.extend([numpy_helper.from_array(a.astype(np.float32).reshape(1, 3, 1, 1), "in_a"),
                                        numpy_helper.from_array(c.astype(np.float32).reshape(1, 3, 1, 1), "in_c")])
        pre = [onnx.helper.make_node("Mul", [name, "in_a"], ["x_a"], name="in_mul"),
               onnx.helper.make_node("Add", ["x_a", "in_c"], ["x_std"], name="in_add")]
        nodes = pre + list(proto.graph.node)
        del proto.graph.node[:]
        proto.graph.node.extend(nodes)
    onnx.save(proto, str(out_path))
    return str(out_path)


@pytest.mark.parametrize("export,into_conv", [("resnet20_bn", False), ("resnet20_folded", False),
                                              ("resnet20_folded", True)])
@pytest.mark.parametrize("name", list(inputs.CONVENTIONS))
def test_value_range_is_inferred_from_the_first_layers(request, tmp_path, export, into_conv, name):
    """ResNet-20 made to expect each convention, BN kept (its statistics decide) and folded
    (the first layers' output statistics decide): the right one wins."""
    path = expecting(request.getfixturevalue(export), inputs.CONVENTIONS[name], tmp_path / "m.onnx",
                     into_conv=into_conv)
    spec = inputs.resolve(load(path))
    assert spec.convention.name == name, spec.scores
    assert spec.shape == (3, 32, 32) and spec.shape_reason == "fixed by the model"


def test_a_given_range_is_taken_as_given(resnet20_folded):
    spec = inputs.resolve(load(resnet20_folded), input_range="0..255")
    assert spec.convention.name == "0..255" and spec.range_reason == "as given" and not spec.scores


def test_conventions_map_photographs_as_their_names_say():
    u = np.stack([np.zeros((3, 8, 8)), np.ones((3, 8, 8))]).astype(np.float32)
    lo_hi = {n: (float(c.apply(u)[0].mean()), float(c.apply(u)[1].mean())) for n, c in inputs.CONVENTIONS.items()}
    assert lo_hi["0..1"] == (0.0, 1.0) and lo_hi["0..255"] == (0.0, 255.0) and lo_hi["-1..1"] == (-1.0, 1.0)
    assert lo_hi["imagenet"][0] == pytest.approx(-1.986, abs=0.001) and lo_hi["caffe"][1] == pytest.approx(140.5, abs=0.1)


def test_cli_choices_are_the_conventions():
    from datafree.toolchain.cli_compress import _RANGES

    assert list(_RANGES) == list(inputs.CONVENTIONS)


# ------------------------------------------------------------------------------ size
class _Strided(zoo.nn.Module):
    """Three stride-2 stages, an upsample and a Concat with the skip: sizes must divide by 8."""

    def __init__(self):
        super().__init__()
        nn = zoo.nn
        self.a = nn.Sequential(nn.Conv2d(3, 8, 3, 2, 1), nn.ReLU())
        self.b = nn.Sequential(nn.Conv2d(8, 8, 3, 2, 1), nn.ReLU())
        self.c = nn.Sequential(nn.Conv2d(8, 8, 3, 2, 1), nn.ReLU())
        self.up = nn.Upsample(scale_factor=2.0, mode="nearest")
        self.head = nn.Conv2d(16, 4, 1)

    def forward(self, x):
        b = self.b(self.a(x))
        return self.head(zoo.torch.cat([self.up(self.c(b)), b], 1))


@pytest.mark.parametrize("opset", [11, 17])
def test_symbolic_height_and_width_get_a_size_that_fits_the_stride(tmp_path, opset):
    path = zoo.export_model(zoo.randomize(_Strided()), tmp_path, "s", (1, 3, 64, 64), opset, dynamic_spatial=True)
    model = load(path)
    assert inputs.network_stride(model) == 8
    shape, why = inputs.infer_shape(model)
    assert shape == (3, 224, 224) and "stride 8" in why


def test_text_line_input_gets_four_times_its_height(tmp_path):
    path = zoo.export_model(zoo.randomize(_Strided()), tmp_path, "t", (1, 3, 48, 192), dynamic_spatial=True)
    proto = onnx.load(str(path))
    proto.graph.input[0].type.tensor_type.shape.dim[2].dim_value = 48     # height fixed, width free
    onnx.save(proto, str(path))
    shape, why = inputs.infer_shape(load(path))
    assert shape == (3, 48, 192) and "width" in why


class _Line(zoo.nn.Module):
    """A CRNN-style line reader: height downsampled 32x, width 4x (strides (2, 1) late)."""

    def __init__(self):
        super().__init__()
        nn = zoo.nn
        layers, c = [], 3
        for stride in (2, 2, (2, 1), (2, 1), (2, 1)):
            layers += [nn.Conv2d(c, 8, 3, stride, 1), nn.ReLU()]
            c = 8
        self.body = nn.Sequential(*layers)
        self.head = nn.Conv2d(8, 5, 1)

    def forward(self, x):
        return self.head(self.body(x)).mean(2)


@pytest.mark.parametrize("opset", [11, 17])
def test_a_network_that_downsamples_height_more_than_width_reads_text_lines(tmp_path, opset):
    path = zoo.export_model(zoo.randomize(_Line()), tmp_path, "l", (1, 3, 32, 128), opset, dynamic_spatial=True)
    model = load(path)
    assert inputs.network_strides(model) == (32, 4)
    assert inputs.network_strides(load(zoo.export_model(zoo.randomize(_Strided()), tmp_path, "s", (1, 3, 64, 64),
                                                        opset, dynamic_spatial=True))) == (8, 8)
    shape, why = inputs.infer_shape(model)
    assert shape == (3, 48, 192) and "a text line" in why and "height 32x, width 4x" in why


def test_exporter_imgsz_metadata_is_used(tmp_path):
    path = zoo.export_model(zoo.randomize(_Strided()), tmp_path, "m", (1, 3, 64, 64), dynamic_spatial=True)
    proto = onnx.load(str(path))
    onnx.helper.set_model_props(proto, {"imgsz": "[320, 256]", "stride": "32"})
    onnx.save(proto, str(path))
    assert inputs.infer_shape(load(path)) == ((3, 320, 256), "the exporter's imgsz metadata")


def test_given_shape_overrides_and_is_checked(tmp_path):
    path = zoo.export_model(zoo.randomize(_Strided()), tmp_path, "g", (1, 3, 64, 64), dynamic_spatial=True)
    assert inputs.infer_shape(load(path), (1, 3, 96, 128)) == ((3, 96, 128), "as given")
    from datafree.toolchain.errors import UserError

    with pytest.raises(UserError, match="does not match"):
        inputs.infer_shape(load(path), (1, 4, 96, 128))


def test_macs_of_a_symbolic_export_are_counted_at_the_assumed_size(tmp_path):
    from datafree.toolchain.compress import compress
    from datafree.toolchain.recipe import Recipe

    module = zoo.mobilenet_like()
    sym = zoo.export_model(module, tmp_path, "sym", (1, 3, 64, 64), fold_bn=True, dynamic_spatial=True)
    static = zoo.export_model(module, tmp_path, "static", (1, 3, 64, 64), fold_bn=True)
    recipe = Recipe(prune=0.3, wbits=8, synthetic=0)
    a = compress(sym, recipe, input_shape=(1, 3, 64, 64)).summary.totals
    b = compress(static, recipe).summary.totals
    assert a["macs_before"] == b["macs_before"] > 0 and a["macs_after"] == b["macs_after"] < a["macs_before"]
