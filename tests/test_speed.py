"""The measure pass: float and compressed model timed in a plain onnxruntime session."""

from __future__ import annotations

import onnx

import zoo
from datafree.toolchain.compress import compress
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
