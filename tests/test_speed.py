"""The measure pass: float and compressed model timed in a plain onnxruntime session."""

from __future__ import annotations

import onnx
import pytest

import zoo
from datafree.toolchain.compress import compress
from datafree.toolchain.errors import UserError
from datafree.toolchain.passes import speed
from datafree.toolchain.recipe import Recipe


def test_summary_gives_the_time_against_float_at_batch_one_and_a_larger_batch(tmp_path):
    _, path = zoo.build("conv_bn_relu_conv", tmp_path)
    result = compress(path, Recipe(wbits=8, abits=8, synthetic=0))
    batches = result.summary.speed["batches"]
    assert list(batches)[0] == "1" and len(batches) == 2 and int(list(batches)[1]) > 1
    for row in batches.values():
        assert row["float_ms"] > 0 and row["compressed_ms"] > 0
        assert abs(row["ratio"] - row["compressed_ms"] / row["float_ms"]) < 1e-3
    line = [h for h in result.summary.headline if h.startswith("time on this machine")]
    assert len(line) == 1 and "the float model's at batch 1" in line[0]
    assert "measure" in result.summary.timings
    assert "speed" in result.summary.to_dict()


def test_no_measurement_when_not_asked(tmp_path):
    _, path = zoo.build("conv_bn_relu_conv", tmp_path)
    result = compress(path, Recipe(wbits=8, synthetic=0), measure=False)
    assert result.summary.speed == {} and "measure" in result.summary.timings
    assert not any(h.startswith("time on this machine") for h in result.summary.headline)


def test_a_fixed_batch_is_timed_at_that_batch_only(tmp_path):
    _, path = zoo.build("conv_bn_relu_conv", tmp_path)
    model = onnx.load(str(path))
    for value in [*model.graph.input, *model.graph.output]:
        value.type.tensor_type.shape.dim[0].dim_value = 3
    fixed = tmp_path / "fixed.onnx"
    onnx.save(model, str(fixed))
    result = compress(fixed, Recipe(wbits=8, synthetic=0))
    assert list(result.summary.speed["batches"]) == ["3"]


def test_a_model_onnxruntime_cannot_time_is_a_note_not_a_failure(tmp_path, monkeypatch):
    _, path = zoo.build("conv_bn_relu_conv", tmp_path)

    def refuse(*args, **kwargs):
        raise RuntimeError("[ONNXRuntimeError] : 9 : NOT_IMPLEMENTED : no kernel\nmore lines")

    monkeypatch.setattr(speed, "measure", refuse)
    result = compress(path, Recipe(wbits=8, synthetic=0))
    assert result.summary.speed == {}
    assert any(n.startswith("speed not measured: onnxruntime could not run the models here") and "NOT_IMPLEMENTED" in n
               and "more lines" not in n for n in result.summary.notes)


def _bytes_as_time(monkeypatch):
    """speed.measure replaced by a deterministic stand-in: the compressed model's time is
    its size over the float model's (pruning a float model shrinks both alike)."""
    def fake(float_model, compressed, sample_shape, *, fixed_batch=None, seed=0):
        ratio = len(compressed) / len(float_model)
        return speed.Speed(batches={1: (1.0, ratio), 8: (8.0, 8.0 * ratio)}, onnxruntime="test")

    monkeypatch.setattr(speed, "measure", fake)


def test_latency_target_chooses_the_smallest_prune_ratio_that_meets_it(tmp_path, monkeypatch):
    from datafree.toolchain.stages import latency

    _bytes_as_time(monkeypatch)
    _, path = zoo.build("vgg_like", tmp_path)
    result = compress(path, Recipe(latency=0.75, wbits=None, synthetic=0))
    chosen = result.recipe.prune
    assert 0 < chosen <= latency.MAX_RATIO and result.recipe.latency is None      # the recipe reproduces the model
    tried = {float(p): r for p, r in result.summary.inputs["latency"]["measured"].items()}
    assert tried[chosen] <= 0.75
    assert any(chosen - latency.STEP - 1e-9 <= p < chosen and r > 0.75 for p, r in tried.items())
    assert result.summary.speed["batches"]["1"]["ratio"] <= 0.75 + 1e-6
    assert any(h.startswith("latency target 0.75") and f"prune ratio {chosen:.2f}" in h
               for h in result.summary.headline)


def test_latency_met_without_pruning_prunes_nothing_and_an_unreachable_one_is_refused(tmp_path, monkeypatch):
    _bytes_as_time(monkeypatch)
    _, path = zoo.build("vgg_like", tmp_path)
    assert compress(path, Recipe(latency=1.0, wbits=8, synthetic=0)).recipe.prune == 0.0
    with pytest.raises(UserError, match="cannot be reached"):
        compress(path, Recipe(latency=0.01, wbits=None, synthetic=0))


@pytest.mark.parametrize("fields", [dict(latency=0.7, prune=0.3), dict(latency=0.0), dict(latency=1.5),
                                    dict(latency=0.7, dynamic={"bits": [4, 8]})])
def test_impossible_latency_recipes_are_refused(fields):
    with pytest.raises(UserError):
        Recipe(**fields)


def test_a_model_slower_than_float_at_every_batch_says_what_runs_faster():
    from datafree.toolchain.stages.measure import _slower_note

    assert _slower_note({1: 0.8, 64: 1.3}, Recipe(abits=8)) == ""          # faster somewhere: nothing to add
    note = _slower_note({1: 1.4, 64: 1.6}, Recipe(abits=8))
    assert "1.60x" in note and "weight-only" in note and "--prune" in note
    assert "weight-only" not in _slower_note({1: 1.2, 64: 1.1}, Recipe())
