"""The dynamic-precision pass on ResNet-20, both modes (cascade: a first pass at low bits, the
unsure images rerun; upfront: bits chosen from the stem): model structure, batching, forced
configurations, target bits."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import onnx
import onnx_ir as ir
import onnxruntime as ort
import pytest

from datafree.ops.domain import all_nodes, image_bits
from datafree.runtime import InferenceSession
from datafree.toolchain.ingest import load
from datafree.toolchain.passes.dynamic import (BITS_OUTPUT, METADATA_KEY, run_values, apply_dynamic, build_fixed,
                                               config_key, fit_dynamic, pareto)
from datafree.toolchain.recipe import DynamicConfig

ROOT = Path(__file__).resolve().parents[1]
MODEL = ROOT / "examples/models/resnet20_bn.onnx"
TARGET = 5.0


@pytest.fixture(scope="module")
def model():
    return load(MODEL)


@pytest.fixture(scope="module")
def synthetic(model):
    from datafree.toolchain.synth import generate

    return generate(model, 64, steps=8, seed=0, batch_size=64)


@pytest.fixture(scope="module", params=["cascade", "upfront"])
def fitted(model, synthetic, request):
    return fit_dynamic(model, DynamicConfig(bits=(4, 6, 8), target_bits=TARGET, steps=150, mode=request.param),
                       synthetic=synthetic)


def _meta(model: onnx.ModelProto) -> dict:
    return json.loads(next(p.value for p in model.metadata_props if p.key == METADATA_KEY))


def _equal_to_either(out: np.ndarray, basic: np.ndarray, optimised: np.ndarray, atol: float) -> None:
    """Each row of ``out`` equals the model run at basic or at full optimisation
    (whose layout transforms move a fake-quantized activation a step on some images)."""
    err = np.minimum(np.abs(out - basic).max(axis=1), np.abs(out - optimised).max(axis=1))
    assert np.all(err < atol), err


def _plain(model: onnx.ModelProto, x: np.ndarray, basic: bool = False) -> list[np.ndarray]:
    """Stock onnxruntime, function bodies only (``basic``: its basic graph optimisations
    only, which keep float results bit-exact between equivalent graphs; its layout
    transforms round convs differently, so a fake-quantized activation can move a step)."""
    opts = ort.SessionOptions()
    if basic:
        opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_BASIC
    return ort.InferenceSession(model.SerializeToString(), opts, providers=["CPUExecutionProvider"]).run(
        None, {"input": x})


def test_model_structure_and_checker(fitted):
    m = fitted.model
    onnx.checker.check_model(m, full_check=True)
    assert [o.name for o in m.graph.output] == ["logits", BITS_OUTPUT]
    ops = {n.op_type for n in all_nodes(m.graph) if n.domain == "ai.datafree"}
    meta = _meta(m)
    assert len(meta["groups"]) == 3 and sum(len(g) for g in meta["groups"]) == 19   # 18 convs + the Gemm
    if meta.get("mode") == "cascade":     # keep the first pass, or rerun at one costlier configuration
        assert ops == {"BitSelect"}       # both passes standard QDQ ops
        assert len(meta["configs"]) == 2 and fitted.stats["mode"] == "cascade"
        assert sum(meta["configs"][1]) > sum(meta["configs"][0])
        # both passes read the same stored integers: no weight tensor is stored twice
        w_int = [t for t in m.graph.initializer if t.data_type == onnx.TensorProto.INT8 and t.name.endswith("/w_int")]
        assert len(w_int) == 20
        assert sum(t.ByteSize() for t in m.graph.initializer) < 1.3 * sum(t.ByteSize() for t in w_int)
    else:
        assert ops == {"BitSelect", "DynQuant", "DynQConv", "DynQGemm"}
        assert meta["configs"][0] == [4, 4, 4]
    cost = fitted.stats["selector"]
    assert cost["params"] < 1000 and cost["bops_pct_of_model"] < 5


def test_per_sample_bits_in_one_batch_equal_each_sample_alone(fitted):
    x = fitted.images[:16]
    logits, bits = _plain(fitted.model, x)
    assert bits.shape == (16, 3)
    assert len(np.unique(bits, axis=0)) >= 2, "the batch should mix configurations"
    for i in range(16):
        alone, alone_bits = _plain(fitted.model, x[i:i + 1])
        np.testing.assert_array_equal(alone_bits, bits[i:i + 1])
        np.testing.assert_allclose(alone, logits[i:i + 1], atol=1e-5)


def test_forced_configuration_equals_fixed_precision_model(fitted):
    x = fitted.images[:16]
    for k in (0, len(fitted.plan.configs) - 1):
        forced = onnx.ModelProto()
        forced.CopyFrom(fitted.model)
        sel = next(n for n in forced.graph.node if n.op_type == "BitSelect")
        b2 = next(t for t in forced.graph.initializer if t.name == sel.input[4])
        bias = np.full(len(fitted.plan.configs), -1e6, np.float32)
        bias[k] = 1e6
        b2.CopyFrom(onnx.numpy_helper.from_array(bias, b2.name))
        logits, bits = _plain(forced, x, basic=True)
        np.testing.assert_array_equal(bits, np.repeat(fitted.plan.configs[k:k + 1], 16, axis=0))
        (fixed,) = _plain(build_fixed(fitted.plan, fitted.plan.configs[k]), x, basic=True)
        np.testing.assert_allclose(logits, fixed, atol=1e-4)
        # at full optimisation onnxruntime's layout transforms round the fixed model's
        # convs differently on some images (a fake-quantized activation moves a step);
        # they reach a cascade's first pass but not the layers inside its If: each image
        # equals the fixed model run one way or the other
        default_logits, _ = InferenceSession(forced).run(None, {"input": x})
        (fixed_all,) = _plain(build_fixed(fitted.plan, fitted.plan.configs[k]), x)
        _equal_to_either(default_logits, fixed, fixed_all, atol=1e-4)
        assert (default_logits.argmax(1) == fixed_all.argmax(1)).sum() >= 15


def test_target_bits_met_on_the_probe_set(fitted):
    x = fitted.images[fitted.probe]
    _, bits = InferenceSession(fitted.model).run(None, {"input": x})
    mean_bits = float(np.mean(image_bits(_meta(fitted.model), bits)))
    assert abs(mean_bits - TARGET) <= 0.25
    assert mean_bits == pytest.approx(fitted.stats["expected_bits"], abs=1e-6)
    assert sum(fitted.stats["histogram"].values()) == len(fitted.probe)


def test_apply_dynamic_returns_an_ir_model_that_runs(model, synthetic):
    small = type(synthetic)(images=synthetic.images[:24], targets=synthetic.targets[:24],
                            source=synthetic.source, seed=0)
    out, stats = apply_dynamic(model, DynamicConfig(bits=(4, 8), target_bits=6.0, steps=20, groups="2"),
                               synthetic=small)
    logits, bits = InferenceSession(out).run(None, {"input": synthetic.images[:4]})
    assert logits.shape == (4, 10) and bits.shape == (4, 2)
    assert set(np.unique(bits)) <= {4.0, 8.0}
    assert stats["candidates"] == [4, 8]


def test_pareto_keeps_the_front_and_both_ends():
    bits = np.array([4, 5, 5, 6, 8, 8])
    loss = np.array([1.0, 0.5, 0.7, 0.6, 0.1, 0.2])
    assert pareto(bits, loss) == [0, 1, 4]


def test_three_ways_to_run_agree_and_cli_reports_bits(fitted, tmp_path):
    from click.testing import CliRunner

    from datafree.toolchain.cli import main

    x = fitted.images[:12]
    runs = [InferenceSession(fitted.model, grouped=True).run(None, {"input": x}),
            InferenceSession(fitted.model, grouped=False, use_kernels=True).run(None, {"input": x}),
            InferenceSession(fitted.model, grouped=False, use_kernels=False).run(None, {"input": x})]
    for logits, bits in runs[1:]:
        np.testing.assert_array_equal(bits, runs[0][1])
        np.testing.assert_array_equal(logits.argmax(axis=1), runs[0][0].argmax(axis=1))
    path = tmp_path / "dyn.onnx"
    onnx.save(fitted.model, str(path))
    np.savez(tmp_path / "x.npz", x=x)
    r = CliRunner().invoke(main, ["run", str(path), "--images", str(tmp_path / "x.npz"), "--json"])
    assert r.exit_code == 0, r.output
    out = json.loads(r.output)
    assert len(out["bits"]) == 12 and len(out["bits"][0]) == 3
    assert sum(out["configurations"].values()) == 12
    if fitted.stats.get("mode") == "cascade":         # reruns are named by both passes
        first = "/".join(str(int(b)) for b in fitted.plan.configs[0])
        assert all(k == first or k.startswith(first + " then ") for k in out["configurations"])
        assert set(out["configurations"]) <= set(fitted.stats["histogram"])
        text = CliRunner().invoke(main, ["run", str(path), "--images", str(tmp_path / "x.npz")])
        per_image = [line.split("\t")[2] for line in text.output.splitlines()[:12]]
        assert all(b == "bits " + first or b.startswith(f"bits {first} then ") for b in per_image), per_image


@pytest.mark.parametrize("target", [4.3, 5.0, 6.5, 7.8])
def test_price_per_bit_meets_the_target_from_above_and_below(target):
    from datafree.ops.selector import Selector, calibrate_price

    rng = np.random.default_rng(1)
    sel = Selector(rng.normal(size=(16, 8)).astype(np.float32), np.zeros(8, np.float32),
                   rng.normal(size=(8, 4)).astype(np.float32), np.array([3, 0, 0, -3], np.float32))
    pooled = rng.normal(size=(200, 16)).astype(np.float32)
    cfg_bits = np.array([4.0, 5.0, 6.0, 8.0])
    calibrate_price(sel, pooled, cfg_bits, target)
    mean = cfg_bits[sel.choose(pooled)].mean()
    assert target - 0.25 <= mean <= target + 1e-9


def test_probe_split_keeps_copies_of_probe_images_out_of_training():
    from datafree.toolchain.passes.dynamic import split_images

    images = np.broadcast_to(np.arange(40, dtype=np.float32)[:, None, None, None], (40, 3, 8, 8)).copy()
    images[:, :, :, :4] += 0.5          # mirrored copies differ, shifted ones move the edge
    out, train, probe = split_images(images, seed=0, augment=True)
    assert len(out) == 4 * len(images) and len(train) == 3 * len(probe)
    source = lambda idx: {int(v) for v in np.floor(out[idx, 0, 0, 0])} | {int(v) for v in np.floor(out[idx, 0, 0, -1])}  # noqa: E731
    assert not source(train) & source(probe) and len(source(train) | source(probe)) == 40
    plain, train0, probe0 = split_images(images, seed=0, augment=False)
    assert len(plain) == 40 and len(probe0) == 10 and not set(train0) & set(probe0)


def test_cascade_reports_its_cost_on_all_probes_too(fitted, capsys):
    """A cascade is priced on the confident probes; the summary also gives what all
    probes (hard targets included) cost, measured the same way as on the model."""
    if fitted.stats.get("mode") != "cascade":
        pytest.skip("cascade only")
    from datafree.toolchain.render import _print_dynamic

    assert len(fitted.probe) < len(fitted.all_probes)
    _, bits = InferenceSession(fitted.model).run(None, {"input": fitted.images[fitted.all_probes]})
    mean_bits = float(np.mean(image_bits(_meta(fitted.model), bits)))
    assert fitted.stats["expected_bits_all_probes"] == pytest.approx(mean_bits, abs=1e-6)
    assert fitted.stats["expected_bits_all_probes"] > fitted.stats["expected_bits"]
    assert fitted.stats["all_probe_images"] == len(fitted.all_probes)
    _print_dynamic(fitted.stats)
    assert f"on all {len(fitted.all_probes)} probes" in " ".join(capsys.readouterr().out.split())


def test_cascade_passes_have_biases_corrected_to_the_float_means(fitted):
    """Each pass of a cascade runs at one configuration with its own biases: every
    layer's mean output per channel on the fitting images equals the float model's, to
    the bias grid's step
    (each layer read on its own: asking onnxruntime for every layer's output changes its
    fusions, which moves 8-bit activations a step here and there)."""
    if fitted.stats.get("mode") != "cascade":
        pytest.skip("cascade only")
    plan = fitted.plan
    x = fitted.images[fitted.train]
    outputs = [next(n for n in plan.base.graph.node if n.name == l.name).output[0] for l in [plan.stem] + plan.layers]
    float_out = run_values(plan.base, x, outputs)
    mean = lambda v: v.reshape(v.shape[0], v.shape[1], -1).mean(axis=(0, 2))  # noqa: E731
    for cfg in plan.configs:
        assert config_key(cfg) in plan.biases
        corrected = build_fixed(plan, cfg)
        biases, plan.biases = plan.biases, {}
        try:
            stored = run_values(build_fixed(plan, cfg), x, outputs)
        finally:
            plan.biases = biases
        # the biases are INT32 on the grid s_x·s_w (what the integer kernels need): each
        # layer's mean is right to within one step of it, per channel
        inits = {t.name: onnx.numpy_helper.to_array(t) for t in corrected.graph.initializer}
        producer = {o: n for n in corrected.graph.node for o in n.output}
        for layer, name in zip([plan.stem] + plan.layers, outputs):
            node = next(n for n in corrected.graph.node if n.name == layer.name)
            step = inits[producer[node.input[2]].input[1]]
            got = run_values(corrected, x, [name])[name]
            assert np.all(np.abs(mean(got) - mean(float_out[name])) <= step + 1e-5), layer.name
        assert max(np.abs(mean(stored[n]) - mean(float_out[n])).max() for n in outputs) > 1e-2


def test_cascade_reruns_only_the_unsure_and_runs_an_empty_rerun(fitted):
    if fitted.stats.get("mode") != "cascade":
        pytest.skip("cascade only")
    from datafree.toolchain.passes.dynamic import confidence_features

    first_cfg = fitted.plan.configs[0]
    (first,) = _plain(build_fixed(fitted.plan, first_cfg), fitted.images)
    margin = confidence_features(first)[:, 0]
    _, bits = _plain(fitted.model, fitted.images)
    rerun = np.any(bits != first_cfg, axis=1)
    assert 0 < rerun.mean() < 1
    assert margin[rerun].max() < margin[~rerun].min()         # a threshold on the first pass's margin
    sure = np.flatnonzero(~rerun)[:5]                          # a batch with nothing to rerun
    for kw in ({"grouped": True}, {"grouped": False, "use_kernels": True}, {"grouped": False, "use_kernels": False}):
        logits, b = InferenceSession(fitted.model, **kw).run(None, {"input": fitted.images[sure]})
        np.testing.assert_allclose(logits, first[sure], atol=1e-4)
        assert np.all(b == first_cfg)
    costs = image_bits(_meta(fitted.model), bits)
    one = float(fitted.plan.avg_bits(first_cfg[None])[0])
    np.testing.assert_allclose(costs[~rerun], one, rtol=1e-6)
    np.testing.assert_allclose(costs[rerun], one + fitted.plan.avg_bits(bits[rerun]), rtol=1e-6)


def test_report_costs_a_cascade_by_its_passes(fitted):
    if fitted.stats.get("mode") != "cascade":
        pytest.skip("cascade only")
    from datafree.toolchain.ingest import load as load_model
    from datafree.toolchain.report.cost import dynamic_costs

    d = dynamic_costs(load_model(fitted.model), fitted.images[fitted.probe])
    assert d.expected_bops == pytest.approx(fitted.stats["expected_bops"], rel=1e-9)
    once, twice = fitted.stats["config_bops"]
    assert (d.min_bops, d.max_bops) == (once, twice)
    assert d.selector_params == fitted.stats["selector"]["params"]
    from datafree.toolchain.report.cost import layer_costs

    first = _meta(fitted.model)["first_layers"]
    rows = {c.name: c for c in layer_costs(load_model(fitted.model))}
    assert len(first) == 20 and all(rows[n].wbits == rows[n].abits == b for n, b in first.items())
    assert not any(n.startswith("selector/") for n in rows)     # the margin is not a layer


def test_cascade_falls_back_to_upfront_for_a_model_with_two_outputs(model, synthetic):
    """The cascade reruns on the margin of one score per class: a second graph output
    (here the pooled features beside the logits) would come out of the rerun short."""
    proto = ir.serde.serialize_model(model)
    gemm = next(n for n in proto.graph.node if n.op_type == "Gemm")
    proto.graph.output.append(onnx.helper.make_empty_tensor_value_info(gemm.input[0]))
    small = type(synthetic)(images=synthetic.images[:24], targets=synthetic.targets[:24],
                            source=synthetic.source, seed=0)
    result = fit_dynamic(ir.serde.deserialize_model(proto),
                         DynamicConfig(bits=(4, 8), target_bits=6.0, steps=20, groups="2"), synthetic=small)
    assert "upfront" in result.stats["note"] and "mode" not in result.stats
    outs = InferenceSession(result.model).run(None, {"input": synthetic.images[:3]})
    assert outs[0].shape == (3, 10) and len(outs) == 3


def test_default_session_takes_the_fastest_way_and_no_kernels_means_function_bodies(fitted, tmp_path):
    cascade = fitted.stats.get("mode") == "cascade"
    s = InferenceSession(fitted.model)
    assert s.grouped is (not cascade) and not (cascade and s.uses_kernels)
    from datafree.runtime.infer import run_file

    path, images = tmp_path / "dyn.onnx", tmp_path / "x.npz"
    onnx.save(fitted.model, str(path))
    np.savez(images, x=fitted.images[:8])
    bodies = run_file(path, images, use_kernels=False)
    logits, bits = _plain(fitted.model, fitted.images[:8])
    np.testing.assert_allclose(bodies.logits, logits, atol=1e-5)
    np.testing.assert_array_equal(bodies.bits, bits)


@pytest.mark.parametrize("name,mode", [("view_flatten_net", "cascade"), ("mobilenet_like", "cascade"),
                                       ("chunk_concat_net", "upfront"), ("tconv_net", "upfront")])
def test_other_models_get_a_dynamic_model_that_runs_every_way(name, mode, tmp_path):
    """Depthwise convs, a Reshape(x, [0, -1]) head (which no empty batch may reach: the
    rerun sits in an If), and outputs that are not class scores (upfront, with a note)."""
    import zoo
    from datafree.toolchain.synth import generate

    _, path = zoo.build(name, tmp_path)
    net = load(path)
    syn = generate(net, 24, steps=4, seed=0, cache=False)
    result = fit_dynamic(net, DynamicConfig(bits=(4, 8), target_bits=6.0, steps=20), synthetic=syn)
    assert result.stats.get("mode", "upfront") == mode and (mode == "cascade") != ("note" in result.stats)
    x = syn.images[:6]
    reference = _plain(result.model, x, basic=True)
    optimised = _plain(result.model, x)
    for kw in ({"grouped": True}, {"grouped": False, "use_kernels": True}, {"grouped": False, "use_kernels": False}):
        outs = InferenceSession(result.model, **kw).run(None, {"input": x})
        np.testing.assert_array_equal(outs[-1], reference[-1])
        _equal_to_either(outs[0], reference[0], optimised[0], atol=1e-3)
    if mode == "cascade":                 # nothing to rerun: the selector forced to keep every first pass
        forced = onnx.ModelProto()
        forced.CopyFrom(result.model)
        sel = next(n for n in forced.graph.node if n.op_type == "BitSelect")
        b2 = next(t for t in forced.graph.initializer if t.name == sel.input[4])
        b2.CopyFrom(onnx.numpy_helper.from_array(np.array([1e6, -1e6], np.float32), b2.name))
        (first,) = _plain(build_fixed(result.plan, result.plan.configs[0]), x, basic=True)
        (first_optimised,) = _plain(build_fixed(result.plan, result.plan.configs[0]), x)
        for kw in ({"grouped": True}, {"grouped": False, "use_kernels": True},
                   {"grouped": False, "use_kernels": False}):
            logits, bits = InferenceSession(forced, **kw).run(None, {"input": x})
            _equal_to_either(logits, first, first_optimised, atol=1e-3)
            assert np.all(bits == result.plan.configs[0])
    from datafree.runtime.retarget import retarget     # whatever the selector reads (margin, or a feature map)

    held, info = retarget(result.model, syn.images, 7.0)
    _, bits = _plain(held, syn.images)
    mean_bits = float(np.mean(image_bits(_meta(held), bits)))
    assert mean_bits == pytest.approx(info["bits_after"], abs=1e-4) and mean_bits <= 7.0


def _cheapest(model: onnx.ModelProto) -> float:
    """What the model's cheapest choice costs, in bits (a cascade: its first pass alone)."""
    sel = next(n for n in model.graph.node if n.op_type == "BitSelect")
    table = next(onnx.numpy_helper.to_array(t) for t in model.graph.initializer if t.name == sel.input[5])
    return float(image_bits(_meta(model), table).min())


@pytest.mark.parametrize("shift", [-0.6, 0.6])
def test_retarget_holds_a_new_target_on_the_given_images_and_changes_only_the_price(fitted, shift):
    from datafree.runtime.retarget import retarget

    x = fitted.images[fitted.all_probes]
    before = fitted.model.SerializeToString()
    target = max(TARGET + shift, (TARGET + _cheapest(fitted.model)) / 2)   # lower, and one the model can meet
    held, info = retarget(fitted.model, x, target)
    assert fitted.model.SerializeToString() == before                  # the source is left as it is
    _, bits = _plain(held, x)
    mean_bits = float(np.mean(image_bits(_meta(held), bits)))
    assert mean_bits <= target + 1e-6 and abs(mean_bits - target) <= 0.25
    assert info["bits_after"] == pytest.approx(mean_bits, abs=1e-4)
    assert _meta(held)["retarget"]["target_bits"] == target
    sel = next(n for n in held.graph.node if n.op_type == "BitSelect")
    changed = [t.name for t, u in zip(held.graph.initializer, fitted.model.graph.initializer) if t != u]
    assert changed == [sel.input[4]]
    assert [n.SerializeToString() for n in held.graph.node] == [n.SerializeToString() for n in fitted.model.graph.node]


def test_retarget_command_writes_the_model_and_refuses_bad_input(fitted, tmp_path, resnet20_bn):
    from click.testing import CliRunner

    from datafree.toolchain.cli import main

    path, out = tmp_path / "dyn.onnx", tmp_path / "held.onnx"
    onnx.save(fitted.model, str(path))
    np.savez(tmp_path / "x.npz", x=fitted.images[fitted.all_probes])
    run = lambda *a: CliRunner().invoke(main, ["retarget", *map(str, a)])  # noqa: E731
    lower = round(max(4.5, (TARGET + _cheapest(fitted.model)) / 2), 3)
    r = run(path, "--images", tmp_path / "x.npz", "--target-bits", lower, "-o", out, "--json")
    assert r.exit_code == 0, r.output
    assert json.loads(r.output)["bits_after"] <= lower and _meta(onnx.load(str(out)))["retarget"]["images"] == len(
        fitted.all_probes)
    for args, message in [((resnet20_bn,), "not a dynamic-precision model"),
                          ((path, "--target-bits", 20), "outside what this model's choices cost"),
                          ((path, "-o", path), "is the input file")]:
        full = [*args, "--images", tmp_path / "x.npz", "--target-bits", 5, "-o", out]
        if "--target-bits" in args:
            full = [*args, "--images", tmp_path / "x.npz", "-o", out]
        if "-o" in args:
            full = [args[0], "--images", tmp_path / "x.npz", "--target-bits", 5, "-o", path]
        r = run(*full)
        assert r.exit_code == 2 and message in r.output and len(r.output.strip().splitlines()) == 1, r.output


def test_cascade_passes_run_on_integer_kernels_in_a_plain_session(fitted, tmp_path):
    """Both passes (the second inside the If) fuse into onnxruntime's integer kernels:
    no float Conv is left in the graph it optimizes at load, the classifier is a QGemm
    (the selector's small MLP stays float)."""
    if fitted.stats.get("mode") != "cascade":
        pytest.skip("cascade only")
    options = ort.SessionOptions()
    options.optimized_model_filepath = str(tmp_path / "optimized.onnx")
    ort.InferenceSession(fitted.model.SerializeToString(), options, providers=["CPUExecutionProvider"])
    optimized = onnx.load(options.optimized_model_filepath)
    branch = next(a.g for n in optimized.graph.node if n.op_type == "If" for a in n.attribute
                  if a.name == "then_branch")
    for graph in (optimized.graph, branch):
        ops = [n.op_type for n in graph.node]
        assert ops.count("QLinearConv") >= 19 and "QGemm" in ops
        assert not {"Conv", "FusedConv"} & set(ops)


def test_confident_probes_without_class_targets_are_all_probes():
    """Images made without class targets (a BN-folded model's natural images come with
    [n, 0] targets): every probe is kept, no error."""
    from datafree.toolchain.passes.dynamic import _confident_probes

    probes = np.arange(10, 20)
    for targets in (None, np.zeros((40, 0), np.float32), np.zeros(40, np.float32)):
        np.testing.assert_array_equal(_confident_probes(targets, 40, probes, seed=0), probes)


@pytest.mark.parametrize("groups", ["stage", "3"])
def test_plan_weighs_layers_by_their_macs_where_sizes_are_symbolic(model, synthetic, groups):
    """With height and width symbolic, layers are grouped and priced at the input size
    assumed, as they are where the size is fixed (not by the few sizes the graph fixes)."""
    from types import SimpleNamespace

    from datafree.toolchain import graph as G
    from datafree.toolchain.passes.dynamic.plan import make_plan
    from datafree.toolchain.stages.load import positions_at

    proto = onnx.load(MODEL)
    for d in list(proto.graph.input[0].type.tensor_type.shape.dim)[2:]:
        d.Clear()
        d.dim_param = "size"
    del proto.graph.value_info[:]
    sym = load(proto)
    positions = positions_at(sym, SimpleNamespace(shape=(3, 32, 32)), G.analyse(sym))
    assert len(positions) > 10
    config = DynamicConfig(bits=(4, 8), target_bits=6, mode="upfront", groups=groups)
    images = synthetic.images[:8]
    fixed, symbolic = make_plan(model, config, images), make_plan(sym, config, images, positions)
    assert symbolic.groups == fixed.groups and len(fixed.groups) == 3
    np.testing.assert_array_equal(symbolic.group_macs, fixed.group_macs)
    assert [l.macs for l in symbolic.layers] == [l.macs for l in fixed.layers]
    assert symbolic.stem.macs == fixed.stem.macs > 0
