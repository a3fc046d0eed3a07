"""`datafree compress` through click's CliRunner: outputs, recipes, and every bad input."""

from __future__ import annotations

import hashlib
import json
import shutil

import onnx
import pytest
from click.testing import CliRunner

from datafree.toolchain.cli import main

FAST = ["--synthetic", "0"]


def _sha(path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def _run(*args):
    return CliRunner().invoke(main, [str(a) for a in args])


def test_compress_writes_model_with_recipe_metadata(tmp_path, resnet20_bn):
    out = tmp_path / "small.onnx"
    res = _run("compress", resnet20_bn, "-o", out, "--prune", "0.3", "--wbits", "4", "--abits", "8", *FAST)
    assert res.exit_code == 0, res.output
    meta = {p.key: p.value for p in onnx.load(str(out)).metadata_props}
    recipe = json.loads(meta["datafree.recipe"])
    assert recipe["prune"] == 0.3 and recipe["wbits"] == 4 and recipe["abits"] == 8
    layers = json.loads(meta["datafree.layers"])
    assert all(v["wbits"] == 4 for v in layers.values())
    # not a terminal (a log): a plain line as each stage ends, instead of bars
    assert [line.split(":")[0] for line in res.output.splitlines() if " done in " in line] == \
        ["load", "prune", "quantize", "measure"]
    assert "time on this machine, plain onnxruntime" in res.output


def test_json_summary_and_dry_run(tmp_path, resnet20_bn):
    res = _run("compress", resnet20_bn, "--dry-run", "--json", "--prune", "0.5", *FAST)
    assert res.exit_code == 0, res.output
    summary = json.loads(res.output)
    assert summary["totals"]["macs_after"] < summary["totals"]["macs_before"]
    assert {"layers", "skipped", "recipe"} <= set(summary)
    assert not list(tmp_path.iterdir())


def test_recipe_file_reproduces_model_byte_for_byte(tmp_path, resnet20_bn):
    a, b = tmp_path / "a.onnx", tmp_path / "b.onnx"
    assert _run("compress", resnet20_bn, "-o", a, "--prune", "0.3", "--wbits", "6", *FAST).exit_code == 0
    recipe = json.loads({p.key: p.value for p in onnx.load(str(a)).metadata_props}["datafree.recipe"])
    from datafree.toolchain.recipe import Recipe

    (tmp_path / "r.toml").write_text(Recipe.from_dict(recipe).to_toml())
    res = _run("compress", resnet20_bn, "-o", b, "--recipe", tmp_path / "r.toml")
    assert res.exit_code == 0, res.output
    assert a.read_bytes() == b.read_bytes()


@pytest.mark.parametrize("fields", [
    {"latency": 0.7},                                            # None-default fields given a value
    {"wbits": None, "depthwise_wbits": None, "max_activation_loss": None},  # None where the default is not
    {"prune": 0.3, "input_shape": [3, 32, 32], "input_range": "0..1"},
])
def test_recipe_round_trips_through_toml(fields):
    """TOML has no null: every field the recipe may hold as None is written so that it
    reads back the same."""
    import tomllib

    from datafree.toolchain.recipe import Recipe

    recipe = Recipe(**fields)
    assert Recipe.from_dict(tomllib.loads(recipe.to_toml())) == recipe


def test_recipe_per_layer_override(tmp_path, resnet20_bn):
    (tmp_path / "r.toml").write_text('wbits = 4\nsynthetic = 0\n[layers."/linear/Gemm"]\nwbits = 8\n')
    out = tmp_path / "o.onnx"
    res = _run("compress", resnet20_bn, "-o", out, "--recipe", tmp_path / "r.toml")
    assert res.exit_code == 0, res.output
    layers = json.loads({p.key: p.value for p in onnx.load(str(out)).metadata_props}["datafree.layers"])
    assert layers["/linear/Gemm"]["wbits"] == 8 and layers["/conv1/Conv"]["wbits"] == 4


def _bad(tmp_path, resnet20_bn):
    cases = {}
    text = tmp_path / "notes.onnx"
    text.write_text("this is not a model\n" * 20)
    cases["not onnx"] = ([text], "not a valid ONNX model")
    trunc = tmp_path / "trunc.onnx"
    trunc.write_bytes(resnet20_bn.read_bytes()[: 300_000])
    cases["truncated"] = ([trunc], "not a valid ONNX model")
    dyn = tmp_path / "dyn.onnx"
    shutil.copy(resnet20_bn.parent / "resnet20_dynamo.onnx", dyn)
    cases["missing external data"] = ([dyn], "external data file missing")
    cases["ratio"] = ([resnet20_bn, "--prune", "1.0"], "prune must be a ratio in [0, 1)")
    cases["negative ratio"] = ([resnet20_bn, "--prune", "-0.1"], "prune must be a ratio in [0, 1)")
    cases["bits"] = ([resnet20_bn, "--wbits", "9"], "wbits must be an integer number of bits in 2..8")
    cases["abits"] = ([resnet20_bn, "--abits", "1"], "abits must be an integer number of bits in 2..8")
    cases["latency and prune"] = ([resnet20_bn, "--latency", "0.7", "--prune", "0.3"], "give prune or latency")
    cases["time budget"] = ([resnet20_bn, "--time-budget", "soon"], "time_budget must be a duration")
    relu = tmp_path / "relu.onnx"
    x = onnx.helper.make_tensor_value_info("x", onnx.TensorProto.FLOAT, [1, 4])
    y = onnx.helper.make_tensor_value_info("y", onnx.TensorProto.FLOAT, [1, 4])
    onnx.save(onnx.helper.make_model(onnx.helper.make_graph([onnx.helper.make_node("Relu", ["x"], ["y"])],
                                                            "g", [x], [y]),
                                     opset_imports=[onnx.helper.make_opsetid("", 17)]), str(relu))
    cases["nothing compressible"] = ([relu], "nothing to compress")
    cases["missing file"] = ([tmp_path / "nope.onnx"], "no such file")
    return cases


@pytest.mark.parametrize("case", ["not onnx", "truncated", "missing external data", "ratio", "negative ratio",
                                  "bits", "abits", "latency and prune", "time budget", "nothing compressible",
                                  "missing file"])
def test_bad_input_one_line_exit_2_nothing_written(tmp_path, resnet20_bn, case):
    args, message = _bad(tmp_path, resnet20_bn)[case]
    src = args[0]
    before = _sha(src) if src.exists() else None
    out = tmp_path / "out" / "o.onnx"
    out.parent.mkdir()
    res = _run("compress", *args, "-o", out, *FAST)
    assert res.exit_code == 2, res.output
    lines = [l for l in res.output.strip().splitlines() if l.strip()]
    assert len(lines) == 1 and message in lines[0], res.output
    assert "Traceback" not in res.output
    assert not list(out.parent.iterdir())
    if before is not None:
        assert _sha(src) == before


def test_output_equal_to_input_is_refused(tmp_path, resnet20_bn):
    model = tmp_path / "m.onnx"
    shutil.copy(resnet20_bn, model)
    before = _sha(model)
    res = _run("compress", model, "-o", model, *FAST)
    assert res.exit_code == 2 and "is the input file" in res.output
    assert _sha(model) == before


def test_missing_output_folder(tmp_path, resnet20_bn):
    res = _run("compress", resnet20_bn, "-o", tmp_path / "no" / "such" / "o.onnx", *FAST)
    assert res.exit_code == 2 and "does not exist" in res.output


def test_bad_recipe_file_names_the_field(tmp_path, resnet20_bn):
    (tmp_path / "r.toml").write_text("prune = 0.3\nwbitz = 4\n")
    res = _run("compress", resnet20_bn, "-o", tmp_path / "o.onnx", "--recipe", tmp_path / "r.toml")
    assert res.exit_code == 2 and "wbitz" in res.output


def test_convert_and_compress_accepts_onnx(tmp_path, resnet20_bn):
    out = tmp_path / "o.onnx"
    res = _run("convert-and-compress", resnet20_bn, "-o", out, "--wbits", "8", *FAST)
    assert res.exit_code == 0, res.output
    assert out.exists()


def test_dynamic_precision_through_compress(tmp_path, resnet20_bn):
    out = tmp_path / "dyn.onnx"
    res = _run("compress", resnet20_bn, "-o", out, "--dynamic", "--bits", "4,6,8", "--target-bits", "6",
               "--synthetic", "16", "--synthetic-steps", "5", "--json")
    assert res.exit_code == 0, res.output
    summary = json.loads(res.output)
    assert "dynamic" in summary
    model = onnx.load(str(out))
    assert any(n.domain == "ai.datafree" for n in model.graph.node)
    assert [o.name for o in model.graph.output][1:] == ["bits"] or len(model.graph.output) == 2


@pytest.mark.parametrize("mode", ["cascade", "upfront"])
def test_dynamic_summary_says_how_the_model_chooses(tmp_path, resnet20_bn, mode):
    out = tmp_path / "dyn.onnx"
    res = _run("compress", resnet20_bn, "-o", out, "--dynamic", "--dynamic-mode", mode, "--target-bits", "6",
               "--synthetic", "16", "--synthetic-steps", "5")
    assert res.exit_code == 0, res.output
    assert f"dynamic ({mode})" in res.output and "probe images" in res.output
    assert "expected average bits" in res.output and "selector:" in res.output
    recipe = json.loads(next(p.value for p in onnx.load(str(out)).metadata_props if p.key == "datafree.recipe"))
    assert recipe["dynamic"]["mode"] == mode


@pytest.mark.parametrize("bits,target,message", [("6,4,8", "5", "sorted"), ("4,4,8", "5", "sorted"),
                                                 ("4,6,8", "9", "outside the candidate range")])
def test_dynamic_bad_options(tmp_path, resnet20_bn, bits, target, message):
    res = _run("compress", resnet20_bn, "-o", tmp_path / "d.onnx", "--dynamic", "--bits", bits,
               "--target-bits", target, *FAST)
    assert res.exit_code == 2 and message in res.output, res.output
    assert not (tmp_path / "d.onnx").exists()


def test_input_shape_lets_symbolic_onnx_models_get_synthetic_images(tmp_path):
    import zoo

    sym = zoo.symbolic_spatial(zoo.conv_bn_relu_conv(), tmp_path)
    args = ["compress", sym, "-o", tmp_path / "o.onnx", "--prune", "0.3", "--json",
            "--synthetic", "8", "--synthetic-steps", "2", "--joint-steps", "5"]
    res = _run(*args)
    assert res.exit_code == 0, res.output
    out = json.loads(res.output)
    assert out["headline"][0].startswith("input assumed: [1, 3, 224, 224] (symbolic height and width")
    assert out["inputs"]["shape"] == [3, 224, 224] and out["recipe"]["input_shape"] == [3, 224, 224]
    res = _run(*args, "--input-shape", "1,3,32,32")
    assert res.exit_code == 0, res.output
    assert any("8 synthetic images" in n for n in json.loads(res.output)["headline"])


@pytest.mark.parametrize("user_value, expected", [(None, "1000"), ("5", "5")])
def test_openmp_spin_is_capped_before_torch_loads(user_value, expected):
    """Every entry point imports datafree.toolchain first; it caps libgomp's spin unless the user set it."""
    import os
    import subprocess
    import sys

    env = {k: v for k, v in os.environ.items() if k != "GOMP_SPINCOUNT"}
    if user_value is not None:
        env["GOMP_SPINCOUNT"] = user_value
    code = "import datafree.exporters, os, sys; print(os.environ['GOMP_SPINCOUNT'], 'torch' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True).stdout
    assert out.split() == [expected, "False"]


@pytest.mark.parametrize("shape, message", [("1,3,64,64", "does not match"), ("1,3,32,32,4", "rank 4")])
def test_input_shape_that_does_not_fit_is_refused_even_for_the_closed_form(tmp_path, resnet20_bn, shape, message):
    out = tmp_path / "o.onnx"
    res = _run("compress", resnet20_bn, "-o", out, "--input-shape", shape, *FAST)
    assert res.exit_code == 2 and message in res.output and len(res.output.strip().splitlines()) == 1
    assert not out.exists()


@pytest.mark.parametrize("args, message", [
    (["--wbits", "abc"], "Invalid value for '--wbits'"),
    (["--prune", "abc"], "'abc' is not a valid float"),
    (["--bogus"], "No such option '--bogus'"),
])
def test_bad_option_is_one_line_with_where_to_look(tmp_path, resnet20_bn, args, message):
    out = tmp_path / "o.onnx"
    res = _run("compress", resnet20_bn, "-o", out, *args, *FAST)
    assert res.exit_code == 2
    assert res.output.strip().splitlines() == [f"Error: {res.output.split('Error: ')[1].strip()}"]
    assert message in res.output and "(see 'main compress --help')" in res.output and not out.exists()


@pytest.mark.parametrize("value, kept", [("off", None), ("1.5", 1.5)])
def test_max_activation_loss_is_written_into_the_recipe(tmp_path, resnet20_folded, value, kept):
    out = tmp_path / "m.onnx"
    res = _run("compress", resnet20_folded, "-o", out, "--abits", "8", "--max-activation-loss", value, *FAST)
    assert res.exit_code == 0, res.output
    recipe = json.loads(next(p.value for p in onnx.load(str(out)).metadata_props if p.key == "datafree.recipe"))
    assert recipe["max_activation_loss"] == kept


@pytest.mark.parametrize("value", ["-1", "lots"])
def test_max_activation_loss_bad_values(tmp_path, resnet20_folded, value):
    res = _run("compress", resnet20_folded, "-o", tmp_path / "m.onnx", "--max-activation-loss", value, *FAST)
    assert res.exit_code == 2 and "max-activation-loss" in res.output, res.output
    assert not (tmp_path / "m.onnx").exists()
