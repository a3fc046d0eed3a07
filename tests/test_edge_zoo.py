"""The edge test models export as users export them, run alike in torch and onnxruntime,
and their photos and metrics mean what they say."""

from __future__ import annotations

import numpy as np
import onnx
import pytest
import torch
from torch import nn

import edge_zoo
import zoo

ATOL, RTOL = 2e-4, 1e-5   # the detector outputs pixel coordinates (up to 256)


@pytest.fixture(scope="module")
def modules():
    return {name: edge_zoo.build(name) for name in edge_zoo.NAMES}


@pytest.fixture(scope="module")
def exports(tmp_path_factory, modules):
    """Export each (name, opset, fold_bn, dynamic_hw) once for the module."""
    cache = {}

    def get(name, opset=17, fold_bn=True, dynamic_hw=True):
        key = (name, opset, fold_bn, dynamic_hw)
        if key not in cache:
            cache[key] = edge_zoo.export(name, tmp_path_factory.mktemp(name), opset=opset, fold_bn=fold_bn,
                                         dynamic_hw=dynamic_hw, module=modules[name])
        return cache[key]

    return get


def _torch(module, x):
    with torch.no_grad():
        return module(torch.from_numpy(x)).numpy()


def _other_size(name):
    """A size other than the usual one (smaller, so the tests stay fast), a multiple of the stride."""
    _, h, w = edge_zoo.INFO[name]["size"]
    s = edge_zoo.INFO[name]["stride"]
    return (h + s, w + 2 * s) if h < 4 * s else (3 * s, 4 * s)


def _ops(path):
    return [n.op_type for n in onnx.load(str(path)).graph.node]


def _dims(value_info):
    return [d.dim_param or d.dim_value for d in value_info.type.tensor_type.shape.dim]


# -------------------------------------------------------------------- exports
@pytest.mark.parametrize("opset", [11, 17])
@pytest.mark.parametrize("name", edge_zoo.NAMES)
def test_folded_export_matches_torch_at_two_sizes(name, opset, modules, exports):
    path = exports(name, opset)
    assert onnx.load(str(path)).opset_import[0].version == opset
    for n, size in ((1, None), (2, _other_size(name))):
        x = edge_zoo.photos(name, n, size)
        np.testing.assert_allclose(zoo.run(path, x), _torch(modules[name], x), atol=ATOL, rtol=RTOL)


@pytest.mark.parametrize("opset", [11, 17])
@pytest.mark.parametrize("name", edge_zoo.NAMES)
def test_folded_export_has_no_batchnorm(name, opset, exports):
    ops = _ops(exports(name, opset))
    assert "BatchNormalization" not in ops and "Conv" in ops


@pytest.mark.parametrize("name", edge_zoo.NAMES)
def test_bn_kept_export_keeps_every_bn_and_matches(name, modules, exports):
    path = exports(name, 17, fold_bn=False)
    bns = [m for m in modules[name].modules() if isinstance(m, nn.BatchNorm2d)]
    assert _ops(path).count("BatchNormalization") == len(bns)
    x = edge_zoo.photos(name, 1)
    np.testing.assert_allclose(zoo.run(path, x), _torch(modules[name], x), atol=ATOL, rtol=RTOL)


@pytest.mark.parametrize("opset", [11, 17])
@pytest.mark.parametrize("name", edge_zoo.NAMES)
def test_batch_height_width_are_symbolic_and_named(name, opset, exports):
    graph = onnx.load(str(exports(name, opset))).graph
    info = edge_zoo.INFO[name]
    (inp,), (out,) = graph.input, graph.output
    assert (inp.name, out.name) == (info["input"], info["output"])
    assert _dims(inp) == [info["axes"][0], 3, info["axes"][2], info["axes"][3]]
    assert _dims(out)[0] == info["axes"][0]


def test_fixed_size_export_has_fixed_height_width(exports):
    graph = onnx.load(str(exports("mbv3_like", 11, dynamic_hw=False))).graph
    assert _dims(graph.input[0]) == [edge_zoo.INFO["mbv3_like"]["axes"][0], 3, 48, 192]


def test_outputs_have_the_documented_layout(modules):
    x = {name: edge_zoo.photos(name, 2, (96, 128) if name != "mbv3_like" else None) for name in edge_zoo.NAMES}
    det = _torch(modules["yolo_like"], x["yolo_like"])
    anchors = sum((96 // s) * (128 // s) for s in (8, 16, 32))
    assert det.shape == (2, 4 + edge_zoo.NUM_CLASSES, anchors)
    assert det[:, 4:].min() >= 0 and det[:, 4:].max() <= 1 and det[:, 2:4].min() >= 0
    text = _torch(modules["db_like"], x["db_like"])
    assert text.shape == (2, 1, 96, 128) and text.min() >= 0 and text.max() <= 1
    cls = _torch(modules["mbv3_like"], x["mbv3_like"])
    np.testing.assert_allclose(cls.sum(1), 1, atol=1e-5)


def test_weights_are_small_float16_files():
    files = sorted(edge_zoo.WEIGHTS.glob("*.pt"))
    assert [f.stem for f in files] == sorted(edge_zoo.NAMES)
    assert sum(f.stat().st_size for f in files) < 5 * 2 ** 20
    state = torch.load(files[0], weights_only=True)
    assert {v.dtype for v in state.values() if v.is_floating_point()} == {torch.float16}


# -------------------------------------------------------------------- trained
def test_trained_models_do_their_task_on_held_out_photos(modules):
    """Trained, not random: direction right, text found where it was drawn, the pasted photo located."""
    images, labels = edge_zoo.dev_photos()
    idx = np.arange(48)
    rendered, (flips,) = edge_zoo.render("mbv3_like", images, labels, 48, np.random.default_rng(0), (48, 192), idx)
    probs = _torch(modules["mbv3_like"], edge_zoo.normalise("mbv3_like", rendered))
    assert (probs.argmax(1) == flips).mean() >= 0.65   # a short training: far from perfect, far from chance
    rendered, (masks,) = edge_zoo.render("db_like", images, labels, 16, np.random.default_rng(0), (256, 256),
                                         idx[:16])
    maps = _torch(modules["db_like"], edge_zoo.normalise("db_like", rendered))[:, 0]
    assert np.mean([edge_zoo.map_iou(m, p) for m, p in zip(masks, maps)]) >= 0.5
    rendered, (boxes, _) = edge_zoo.render("yolo_like", images, labels, 16, np.random.default_rng(0), (256, 256),
                                           idx[:16])
    det = _torch(modules["yolo_like"], edge_zoo.normalise("yolo_like", rendered))
    best = det[:, 4:].max(1).argmax(1)
    centres = det[np.arange(16), :2, best]
    inside = ((centres >= boxes[:, :2]) & (centres <= boxes[:, 2:])).all(1)
    assert inside.mean() >= 0.8


# --------------------------------------------------------------------- photos
@pytest.mark.parametrize("name", edge_zoo.NAMES)
def test_photos_are_deterministic_in_the_model_range(name):
    x = edge_zoo.photos(name, 5)
    assert x.shape == (5, *edge_zoo.INFO[name]["size"]) and x.dtype == np.float32
    lo, hi = edge_zoo.INFO[name]["range"]
    assert x.min() >= lo - 1e-6 and x.max() <= hi + 1e-6 and x.max() - x.min() > 0.8 * (hi - lo)
    np.testing.assert_array_equal(edge_zoo.photos(name, 5), x)
    assert edge_zoo.photos(name, 2, (64, 96)).shape == (2, 3, 64, 96)


def test_photos_use_the_bundled_dev_images():
    """Photo i of the text-line model is dev image i stretched (text covers only part of it)."""
    images, _ = edge_zoo.dev_photos()
    x = edge_zoo.photos("mbv3_like", 3)
    u8 = np.rint((x * 0.5 + 0.5) * 255).transpose(0, 2, 3, 1)
    for i in range(3):
        plain = np.asarray(edge_zoo._resize(images[i], (48, 192)), np.float32)
        upright, rotated = np.abs(u8[i] - plain), np.abs(u8[i] - plain[::-1, ::-1])
        assert min(np.median(upright), np.median(rotated)) <= 1


# -------------------------------------------------------------------- metrics
def test_sqnr_weighs_each_output_by_its_own_energy():
    rng = np.random.default_rng(0)
    a, b = rng.standard_normal(1000), 100 * rng.standard_normal(1000)
    assert edge_zoo.sqnr_db(a, a + 0.1 * a) == pytest.approx(20.0)
    # a relative error of 0.1 on one output and none on the other: the mean ratio is 0.005
    assert edge_zoo.sqnr_db([a, b], [a + 0.1 * a, b]) == pytest.approx(-10 * np.log10(0.005))
    assert edge_zoo.sqnr_db([a, b], [a, b + 0.1 * b]) == pytest.approx(-10 * np.log10(0.005))
    with pytest.raises(ValueError):
        edge_zoo.sqnr_db([a], [a, b])


def test_map_iou():
    ref = np.zeros((4, 4))
    ref[:2] = 0.9
    out = np.zeros((4, 4))
    out[1:3] = 0.8
    assert edge_zoo.map_iou(ref, out) == pytest.approx(4 / 12)
    assert edge_zoo.map_iou(ref, ref) == 1.0
    assert edge_zoo.map_iou(np.zeros(3), np.zeros(3)) == 1.0
