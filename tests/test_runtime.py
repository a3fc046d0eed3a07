"""runtime: sessions, image sets, batched inference, latency, and ``datafree run``."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner

from datafree.runtime import InferenceSession
from datafree.runtime.bench import measure
from datafree.runtime.infer import load_images, predict
from datafree.toolchain.cli import main
from datafree.toolchain.errors import UserError

ROOT = Path(__file__).resolve().parents[1]
MODEL = ROOT / "examples/models/resnet20_bn.onnx"
DATA = ROOT / "examples/data/cifar10_dev500.npz"


def test_session_runs_a_plain_model():
    s = InferenceSession(MODEL, threads=1)
    assert s.input_names == ["input"] and s.output_names == ["logits"]
    assert not s.dynamic
    (y,) = s.run(None, {"input": np.zeros((2, 3, 32, 32), np.float32)})
    assert y.shape == (2, 10)


def test_npz_images_are_normalised_nchw():
    images = load_images(DATA)
    raw = np.load(DATA)
    assert images.x.shape == (500, 3, 32, 32) and images.x.dtype == np.float32
    expect = (raw["images"][3, 5, 7] / 255.0 - raw["mean"]) / raw["std"]
    np.testing.assert_allclose(images.x[3, :, 5, 7], expect, rtol=1e-5)
    assert images.labels is not None and len(images.labels) == 500


def test_predict_accuracy_does_not_depend_on_batch():
    s = InferenceSession(MODEL)
    images = load_images(DATA)
    a = predict(s, images, batch=500)
    b = predict(s, images, batch=37)
    np.testing.assert_array_equal(a.predictions, b.predictions)
    assert a.accuracy > 0.8 and a.bits is None


def test_folder_of_images(tmp_path):
    from PIL import Image

    raw = np.load(DATA)["images"][:3]
    for i, img in enumerate(raw):
        Image.fromarray(img).resize((40, 40)).save(tmp_path / f"img{i}.png")
    s = InferenceSession(MODEL)
    from datafree.runtime.infer import input_size
    images = load_images(tmp_path, input_size(s))
    assert images.x.shape == (3, 3, 32, 32) and images.names == ["img0.png", "img1.png", "img2.png"]


def test_bad_inputs_are_user_errors(tmp_path):
    with pytest.raises(UserError, match="no such file"):
        load_images(tmp_path / "missing.npz")
    np.savez(tmp_path / "empty.npz", labels=np.zeros(3))
    with pytest.raises(UserError, match="no 'images'"):
        load_images(tmp_path / "empty.npz")
    with pytest.raises(UserError, match="no PNG"):
        load_images(tmp_path)


def test_cli_run_json_and_errors(tmp_path):
    small = tmp_path / "small.npz"
    raw = np.load(DATA)
    np.savez(small, images=raw["images"][:20], labels=raw["labels"][:20], mean=raw["mean"], std=raw["std"])
    r = CliRunner().invoke(main, ["run", str(MODEL), "--images", str(small), "--batch", "8", "--json"])
    assert r.exit_code == 0, r.output
    out = json.loads(r.output)
    assert out["images"] == 20 and len(out["predictions"]) == 20 and 0 <= out["accuracy"] <= 1
    r = CliRunner().invoke(main, ["run", str(MODEL), "--images", str(tmp_path / "nope.npz")])
    assert r.exit_code == 2 and "no such file" in r.output and len(r.output.strip().splitlines()) == 1


@pytest.mark.parametrize("key, array", [("x", np.zeros((2, 3, 64, 64), np.float32)),
                                        ("images", np.zeros((2, 64, 64, 3), np.uint8))])
def test_cli_run_images_that_do_not_fit_the_model(tmp_path, key, array):
    np.savez(tmp_path / "big.npz", **{key: array})
    r = CliRunner().invoke(main, ["run", str(MODEL), "--images", str(tmp_path / "big.npz")])
    assert r.exit_code == 2, r.output
    assert r.output.strip().splitlines() == [
        "Error: images of shape [3, 64, 64] do not fit the model input [3, 32, 32] (batch axis left out)"]


def test_measure_reports_median_and_p90():
    rows = measure(MODEL, batch_sizes=(1, 4), warmup=1, repeats=3)
    assert [r["batch"] for r in rows] == [1, 4]
    assert all(0 < r["median_ms"] <= r["p90_ms"] for r in rows)


@pytest.mark.parametrize("wbits, abits, int4, folded", [(4, None, True, False), (4, 8, True, False),
                                                        (8, 8, True, False), (4, 8, False, False),
                                                        (4, 4, True, False)])
def test_models_without_integer_kernels_run_with_their_weights_folded(wbits, abits, int4, folded):
    import onnx_ir as ir
    import onnxruntime as ort

    from datafree.toolchain.compress import compress
    from datafree.toolchain.recipe import Recipe

    proto = ir.serde.serialize_model(compress(MODEL, Recipe(wbits=wbits, abits=abits, int4=int4, synthetic=0)).model)
    s = InferenceSession(proto, threads=1)
    assert s.weights_folded is folded and not InferenceSession(MODEL).weights_folded
    x = load_images(DATA).x[:32]

    def stock(spec: bool = False):
        options = ort.SessionOptions()
        if spec:
            options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
        sess = ort.InferenceSession(proto.SerializeToString(), options, providers=["CPUExecutionProvider"])
        return sess.run(None, {"input": x})[0]

    ours, spec = s.run(None, {"input": x})[0], stock(spec=True)
    rel = lambda a: float(np.linalg.norm(a - spec) / np.linalg.norm(spec))  # noqa: E731
    if abits is None:       # weights only: the same float arithmetic either way
        np.testing.assert_allclose(ours, stock(), rtol=0, atol=1e-5 * np.abs(spec).max())
    # as faithful to the model's ONNX semantics (no fusion at all) as onnxruntime's default
    assert rel(ours) <= max(rel(stock()), 1e-5)


@pytest.mark.parametrize("wbits, abits", [(4, 8), (8, None), (8, 8), (4, 4)])
def test_no_session_entry_is_needed(wbits, abits):
    """Every static model runs as fast in a plain session: no note sends the user to a
    session option (4-bit activations included: they run on the 8-bit kernels)."""
    from datafree.toolchain.compress import compress
    from datafree.toolchain.recipe import Recipe

    notes = compress(MODEL, Recipe(wbits=wbits, abits=abits, synthetic=0)).summary.notes
    assert not [n for n in notes if "session.disable_quant_qdq=1" in n]
