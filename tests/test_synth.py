"""The synthetic-data generator: deterministic, cached, and it does match BN statistics."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from datafree.toolchain import synth
from datafree.toolchain.errors import UserError
from datafree.toolchain.ingest import load

MODELS = Path(__file__).resolve().parents[1] / "examples" / "models"


@pytest.fixture(scope="module")
def bn_model():
    return load(MODELS / "resnet20_bn.onnx")


@pytest.fixture(scope="module")
def folded_model():
    return load(MODELS / "resnet20_folded.onnx")


def test_shapes_dtypes_and_progress(bn_model, tmp_path):
    calls = []
    s = synth.generate(bn_model, 5, steps=2, batch_size=3, cache=False,
                       progress=lambda stage, done, total: calls.append((stage, done, total)))
    assert s.images.shape == (5, 3, 32, 32) and s.images.dtype == np.float32
    assert s.targets.shape == (5, 10) and s.targets.dtype == np.float32
    np.testing.assert_allclose(s.targets.sum(axis=1), 1.0, atol=1e-5)
    assert s.source == "bn-statistics" and s.seed == 0
    assert calls[0] == ("synthetic images", 0, 5) and calls[-1] == ("synthetic images", 5, 5)
    assert all(d <= t for _, d, t in calls) and [d for _, d, _ in calls] == sorted(d for _, d, _ in calls)


def test_same_seed_is_bit_identical_and_seeds_differ(bn_model):
    a = synth.generate(bn_model, 4, steps=3, seed=7, batch_size=4, cache=False)
    b = synth.generate(bn_model, 4, steps=3, seed=7, batch_size=4, cache=False)
    c = synth.generate(bn_model, 4, steps=3, seed=8, batch_size=4, cache=False)
    assert np.array_equal(a.images, b.images) and np.array_equal(a.targets, b.targets)
    assert not np.allclose(a.images, c.images)


def test_chunks_do_not_depend_on_n(bn_model):
    small = synth.generate(bn_model, 2, steps=2, batch_size=2, cache=False)
    large = synth.generate(bn_model, 4, steps=2, batch_size=2, cache=False)
    assert np.array_equal(small.images, large.images[:2])


def test_cache_hit_returns_the_same_set_without_generating(bn_model, tmp_path, monkeypatch):
    first = synth.generate(bn_model, 3, steps=2, batch_size=3, cache_dir=tmp_path)
    files = list(tmp_path.glob("synth-*.npz"))
    assert len(files) == 1 and not list(tmp_path.glob("*.tmp"))

    def boom(*args, **kwargs):
        raise AssertionError("generated again despite a cache entry")

    monkeypatch.setattr(synth._Generator, "run", boom)
    second = synth.generate(bn_model, 3, steps=2, batch_size=3, cache_dir=tmp_path)
    assert np.array_equal(first.images, second.images) and np.array_equal(first.targets, second.targets)
    assert second.source == first.source and second.seed == first.seed
    # other arguments are another key
    monkeypatch.undo()
    synth.generate(bn_model, 3, steps=2, batch_size=3, seed=1, cache_dir=tmp_path)
    assert len(list(tmp_path.glob("synth-*.npz"))) == 2


def test_a_larger_set_makes_only_the_chunks_the_cache_lacks(bn_model, tmp_path, monkeypatch):
    """Chunks are cached one by one: asking for 5 images after 4 (chunks of 2) makes only
    the third chunk, and the set is the one made without a cache."""
    synth.generate(bn_model, 4, steps=2, batch_size=2, cache_dir=tmp_path)
    fresh = synth.generate(bn_model, 5, steps=2, batch_size=2, cache=False)
    made = []
    original = synth._Generator.optimised_chunk

    def counting(self, count, start, index, **kw):
        made.append((index, count))
        return original(self, count, start, index, **kw)

    monkeypatch.setattr(synth._Generator, "optimised_chunk", counting)
    more = synth.generate(bn_model, 5, steps=2, batch_size=2, cache_dir=tmp_path)
    assert made == [(2, 1)]
    assert np.array_equal(more.images, fresh.images) and np.array_equal(more.targets, fresh.targets)
    fewer = synth.generate(bn_model, 2, steps=2, batch_size=2, cache_dir=tmp_path)
    assert made == [(2, 1)] and np.array_equal(fewer.images, fresh.images[:2])     # all from the cache


def test_is_cached_says_whether_generate_would_read_every_image_from_the_cache(bn_model, tmp_path):
    """What a benchmark reports as "loaded from the cache": every chunk ``generate`` would read."""
    args = dict(steps=2, batch_size=2, cache_dir=tmp_path)
    assert not synth.is_cached(bn_model, 4, **args)
    synth.generate(bn_model, 4, **args)
    assert synth.is_cached(bn_model, 4, **args) and synth.is_cached(bn_model, 2, **args)
    assert not synth.is_cached(bn_model, 5, **args)                   # a third chunk is missing
    assert not synth.is_cached(bn_model, 4, seed=1, **args)           # other arguments, another key


def test_cache_dir_from_environment(bn_model, tmp_path, monkeypatch):
    monkeypatch.setenv("DATAFREE_CACHE", str(tmp_path / "env"))
    synth.generate(bn_model, 2, steps=1, batch_size=2)
    assert len(list((tmp_path / "env").glob("synth-*.npz"))) == 1


def test_bn_statistics_loss_decreases(bn_model):
    gen = synth._Generator(bn_model, synth.sample_shape(bn_model))
    s = synth.generate(bn_model, 16, steps=30, batch_size=16, cache=False)
    noise = np.random.default_rng(0).standard_normal(s.images.shape).astype(np.float32)
    before = gen.evaluate(noise, s.targets)
    after = gen.evaluate(s.images, s.targets)
    assert after["bn"] < 0.5 * before["bn"], (before, after)
    assert after["ce"] < before["ce"]


def test_folded_model_gets_photographs_and_output_only_on_request(folded_model):
    assert synth.generate(folded_model, 4, steps=1, cache=False).source == "natural"
    gen = synth._Generator(folded_model, synth.sample_shape(folded_model), route="output-only")
    assert gen.preacts  # the scale prior watches the convolutions
    s = synth.generate(folded_model, 8, steps=15, batch_size=8, cache=False, route="output-only")
    assert s.source == "output-only" and s.images.shape == (8, 3, 32, 32)
    assert np.isfinite(s.images).all()
    noise = np.random.default_rng(0).standard_normal(s.images.shape).astype(np.float32)
    assert gen.evaluate(s.images, s.targets)["ce"] < gen.evaluate(noise, s.targets)["ce"]


def test_symbolic_spatial_size_needs_input_shape(folded_model):
    import onnx_ir as ir

    model = load(MODELS / "resnet20_folded.onnx")
    model.graph.inputs[0].shape = ir.Shape(["batch", 3, "h", "w"])
    with pytest.raises(UserError, match=r"input size \[batch, 3, h, w\] is symbolic: pass input_shape"):
        synth.generate(model, 2, steps=1, cache=False)
    s = synth.generate(model, 2, steps=1, cache=False, input_shape=(3, 16, 16))
    assert s.images.shape == (2, 3, 16, 16)
    assert synth.sample_shape(model, (1, 3, 8, 8)) == (3, 8, 8)


def test_model_with_hard_coded_batch_is_generated_in_chunks_it_accepts(tmp_path):
    import torch

    class Net(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.conv = torch.nn.Conv2d(3, 4, 3, padding=1)
            self.bn = torch.nn.BatchNorm2d(4)
            self.fc = torch.nn.Linear(4 * 8 * 8, 3)

        def forward(self, x):
            return self.fc(torch.relu(self.bn(self.conv(x))).reshape(1, -1))

    path = tmp_path / "fixed.onnx"
    torch.onnx.export(Net().eval(), (torch.randn(1, 3, 8, 8),), str(path), dynamo=False, opset_version=13,
                      training=torch.onnx.TrainingMode.PRESERVE)
    model = load(path)
    s = synth.generate(model, 3, steps=2, batch_size=4, cache=False)
    assert s.images.shape == (3, 3, 8, 8) and s.targets.shape == (3, 3) and s.source == "bn-statistics"


# ------------------------------------------------ models that are not BN classifiers
def test_image_to_image_model_gets_images_without_class_targets(tmp_path):
    import zoo

    _, path = zoo.build("tconv_net", tmp_path)                   # output: a 3-channel image
    s = synth.generate(load(path), 4, steps=2, cache=False)
    assert s.images.shape == (4, 3, 32, 32) and np.isfinite(s.images).all()


def test_compress_falls_back_to_the_closed_form_when_no_images_can_be_made(tmp_path):
    import zoo
    from datafree.toolchain.compress import compress
    from datafree.toolchain.recipe import DynamicConfig, Recipe

    small = dict(synthetic=8, synthetic_steps=2, joint_steps=5)
    _, tokens = zoo.build("token_mlp", tmp_path)                 # no BN, output is not class scores
    with pytest.raises(synth.CannotSynthesise, match="no BatchNormalization statistics"):
        synth.generate(load(tokens), 2, steps=1, cache=False)
    headline = compress(tokens, Recipe(wbits=4, **small)).summary.headline
    assert any("closed form used" in n for n in headline), headline
    headline = compress(tokens, Recipe(wbits=8, **small)).summary.headline     # nothing to fit: none asked for
    assert any("no synthetic images needed" in n for n in headline), headline
    with pytest.raises(UserError, match="dynamic precision needs synthetic images"):
        compress(tokens, Recipe(dynamic=DynamicConfig(steps=2), **small))


def test_symbolic_spatial_size_is_chosen_and_images_made_at_it(tmp_path):
    import zoo
    from datafree.toolchain.compress import compress
    from datafree.toolchain.recipe import Recipe

    small = dict(synthetic=8, synthetic_steps=2, joint_steps=5)
    sym = zoo.symbolic_spatial(zoo.conv_bn_relu_conv(), tmp_path)
    chosen = compress(sym, Recipe(prune=0.3, **small))
    assert chosen.summary.headline[0].startswith("input assumed: [1, 3, 224, 224] (symbolic height and width")
    assert any("8 synthetic images" in n for n in chosen.summary.headline)
    assert chosen.recipe.input_shape == [3, 224, 224]
    fitted = compress(sym, Recipe(prune=0.3, **small), input_shape=(1, 3, 32, 32))
    assert fitted.summary.headline[0].startswith("input assumed: [1, 3, 32, 32] (as given)")
    assert any("8 synthetic images" in n for n in fitted.summary.headline)


def test_an_op_the_differentiable_copy_lacks_means_closed_form_not_failure(tmp_path):
    import onnx
    import zoo
    from onnx import helper
    from datafree.toolchain.compress import compress
    from datafree.toolchain.recipe import Recipe

    _, path = zoo.build("conv_bn_relu_conv", tmp_path)
    proto = onnx.load(str(path))
    relu = next(n for n in proto.graph.node if n.op_type == "Relu")
    out, relu.output[0] = relu.output[0], relu.output[0] + "_pre"
    proto.graph.node.insert(list(proto.graph.node).index(relu) + 1,
                            helper.make_node("LRN", [out + "_pre"], [out], size=3, name="lrn"))
    onnx.save(proto, str(tmp_path / "lrn.onnx"))
    result = compress(tmp_path / "lrn.onnx", Recipe(wbits=8, abits=8, synthetic=8, synthetic_steps=2))
    assert any("LRN" in n and "closed form used" in n for n in result.summary.headline)
    assert np.isfinite(zoo.run(result.model, zoo.images(2))).all()


def test_dims_in_messages_name_symbolic_dims_or_mark_them_unknown():
    import onnx_ir as ir

    from datafree.toolchain.errors import format_dims

    assert format_dims([ir.SymbolicDim(None), 3, ir.SymbolicDim("h"), 32]) == "[?, 3, h, 32]"
    assert format_dims(["batch", None, np.int64(3)]) == "[batch, ?, 3]"      # onnxruntime's and numpy's dims


def test_natural_route_makes_photographs_in_the_input_range(folded_model):
    from datafree.toolchain.inputs import CONVENTIONS

    s = synth.generate(folded_model, 6, steps=3, cache=False, route="natural", convention=CONVENTIONS["0..255"])
    assert s.source == "natural" and s.images.shape == (6, 3, 32, 32) and s.targets.shape == (6, 0)
    assert s.images.min() >= 0 and s.images.max() <= 255 and 60 < s.images.mean() < 200
    again = synth.generate(folded_model, 6, steps=3, cache=False, route="natural", convention=CONVENTIONS["0..255"])
    assert np.array_equal(s.images, again.images)


def test_a_route_the_model_cannot_take_is_refused_not_replaced(folded_model):
    with pytest.raises(synth.RouteRefused, match="no BatchNormalization statistics"):
        synth.generate(folded_model, 2, steps=1, cache=False, route="bn-statistics")
    with pytest.raises(UserError, match="synthetic_route must be one of"):
        from datafree.toolchain.recipe import Recipe

        Recipe(synthetic_route="photos")
