"""Exports users deploy (BN folded, symbolic height/width, detection and text heads): the
compressor infers their input, makes images for them and fits them, with no option given.

Scored against the float model on held-out photos (``edge_zoo.photos``) the compressor
never saw, at each model's usual size."""

from __future__ import annotations

import numpy as np
import pytest

import edge_zoo
from datafree.toolchain import inputs
from datafree.toolchain.compress import compress
from datafree.toolchain.ingest import load
from datafree.toolchain.recipe import Recipe

QUICK = dict(synthetic=32, joint_steps=20)
# the convention each model was trained on (edge_zoo.INFO's mean/std), by name
RANGES = {"yolo_like": "0..1", "db_like": "imagenet", "mbv3_like": "-1..1"}
# the size assumed with height and width symbolic: the line classifier downsamples height
# more than width (strides (2, 1)), a text line
SIZES = {"yolo_like": (3, 224, 224), "db_like": (3, 224, 224), "mbv3_like": (3, 48, 192)}
# W8A8 output SQNR on held-out photos, dB (the closed form, before these models got images:
# 9.8 and 13.5; the line classifier at the square size once assumed for it: 22); rounding
# the weights alone to 8 bits gives 45 and 35
W8A8_SQNR = {"yolo_like": 18.0, "mbv3_like": 25.0}


# pruned 30 % + W8 with the quick settings, output SQNR on held-out photos, dB (measured 12.2,
# 8.3 and 36.9 at 0.68x, 0.77x and 0.84x the MACs; the text detector's FPN loses the most)
PRUNED_SQNR = {"yolo_like": 10.0, "db_like": 6.0, "mbv3_like": 25.0}


def _sqnr(name: str, src, model, n: int = 16) -> float:
    import zoo

    x = edge_zoo.photos(name, n)
    return edge_zoo.sqnr_db(zoo.run(src, x), zoo.run(model, x))


@pytest.mark.parametrize("opset", [11, 17])
@pytest.mark.parametrize("fold_bn", [True, False])
@pytest.mark.parametrize("name", edge_zoo.NAMES)
def test_input_size_and_range_are_inferred(request, tmp_path, name, opset, fold_bn):
    if name == "db_like" and fold_bn:
        request.applymarker(pytest.mark.xfail(strict=True, reason=(
            "-1..1 and imagenet differ only by a 2.2x scale; with BN folded the typical BN-output "
            "scale decides, and this briefly trained model's BN gammas are near 1, twice the typical")))
    path = edge_zoo.export(name, tmp_path, opset=opset, fold_bn=fold_bn)
    spec = inputs.resolve(load(path))
    assert spec.convention.name == RANGES[name], spec.scores
    assert spec.shape == SIZES[name] and "symbolic height and width" in spec.shape_reason
    assert ("a text line" in spec.shape_reason) == (name == "mbv3_like")


@pytest.mark.parametrize("name", list(W8A8_SQNR))
def test_w8a8_fits_on_photographs_it_makes_and_keeps_the_outputs(tmp_path, name):
    """(Not yet for the text detector: its range is taken for -1..1 instead of imagenet with
    BN folded, 11 dB.)"""
    path = edge_zoo.export(name, tmp_path, opset=11)
    result = compress(path, Recipe(wbits=8, abits=8, **QUICK))
    head = result.summary.headline
    size = SIZES[name]
    assert head[0].startswith(f"input assumed: [1, 3, {size[1]}, {size[2]}]")
    assert "procedural photographs" in head[1] and not any("closed form" in h for h in head)
    assert result.recipe.input_range == head[0].split("values ")[1].split(" ")[0]
    assert result.recipe.input_shape == list(size)
    sqnr = _sqnr(name, path, result.model)
    assert sqnr >= W8A8_SQNR[name], sqnr


@pytest.mark.parametrize("name", edge_zoo.NAMES)
def test_pruning_and_4_bit_weights_run_on_every_edge_model(tmp_path, name):
    """Every option combination writes a model that runs, with MACs counted at the size assumed."""
    import zoo

    path = edge_zoo.export(name, tmp_path, opset=17)
    pruned = compress(path, Recipe(prune=0.3, wbits=8, **QUICK))
    totals = pruned.summary.totals
    assert 0 < totals["macs_after"] < 0.95 * totals["macs_before"]
    w4 = compress(path, Recipe(wbits=4, abits=8, **QUICK))
    x = edge_zoo.photos(name, 2)
    for model in (pruned.model, w4.model):
        y = zoo.run(model, x)
        assert np.isfinite(y).all()
    assert _sqnr(name, path, pruned.model, 8) > PRUNED_SQNR[name]
