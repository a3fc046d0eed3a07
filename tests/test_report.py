"""datafree report: SQNR references, cost formulas, target profiles, the document and the CLI."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import onnx
import pytest
from click.testing import CliRunner
from onnx import TensorProto, helper, numpy_helper

from datafree.toolchain import ingest
from datafree.toolchain.cli import main
from datafree.toolchain.errors import UserError
from datafree.toolchain.report import SCHEMA, build_report, cost, sqnr, targets, write_report

ROOT = Path(__file__).resolve().parents[1]
RESNET = ROOT / "examples" / "models" / "resnet20_bn.onnx"
FOLDED = ROOT / "examples" / "models" / "resnet20_folded.onnx"
IMAGES = ROOT / "examples" / "data" / "cifar10_dev500.npz"


# ---------------------------------------------------------------- SQNR
def test_gaussian_reference_values():
    db, step = sqnr.gaussian_quant_sqnr(-8, 7)
    assert db == pytest.approx(19.26, abs=0.005) and step == pytest.approx(0.3386, abs=2e-4)
    db, step = sqnr.gaussian_quant_sqnr(-7, 7)
    assert db == pytest.approx(18.90, abs=0.005) and step == pytest.approx(0.3534, abs=2e-4)
    assert sqnr.gaussian_prune_sqnr(0.75) == pytest.approx(5.585, abs=0.001)
    # the closed form of methods.md: error energy 0.75 - 2 t phi(t), t = Phi^-1(0.875)
    from scipy import stats
    t = stats.norm.ppf(0.875)
    assert sqnr.gaussian_prune_sqnr(0.75) == pytest.approx(-10 * np.log10(0.75 - 2 * t * stats.norm.pdf(t)), abs=1e-6)


def test_empirical_sqnr_matches_analytic_on_a_large_gaussian_sample():
    x = np.random.default_rng(0).standard_normal(1_000_000)
    for lo, hi in ((-8, 7), (-7, 7)):
        step = sqnr.mse_optimal_step(x, lo, hi)
        got = sqnr.sqnr_db(x, sqnr.uniform_quantize(x, step, lo, hi))
        assert got == pytest.approx(sqnr.gaussian_quant_sqnr(lo, hi)[0], abs=0.1)
    assert sqnr.prune_sqnr(x, 0.75) == pytest.approx(sqnr.gaussian_prune_sqnr(0.75), abs=0.1)
    assert sqnr.kurtosis(x) == pytest.approx(3.0, abs=0.02)
    assert sqnr.equal_compression_sparsity(4) == 0.75


def test_magnitude_prune_zeroes_exactly_the_smallest():
    w = np.array([[0.1, -3.0], [2.0, -0.05]])
    assert np.array_equal(sqnr.magnitude_prune(w, 0.5), [[0.0, -3.0], [2.0, 0.0]])


# ---------------------------------------------------------------- cost
def _two_layer(qdq: bool = False, conv_out: int = 4, metadata: dict | None = None) -> onnx.ModelProto:
    """x[1,2,8,8] -> Conv(2->C, 3x3, pad 1) -> Relu -> Flatten -> Gemm(C*64 -> 10)."""
    rng = np.random.default_rng(1)
    wc = rng.standard_normal((conv_out, 2, 3, 3)).astype(np.float32)
    wg = rng.standard_normal((10, conv_out * 64)).astype(np.float32)
    inits = [numpy_helper.from_array(np.zeros(conv_out, np.float32), "bc"),
             numpy_helper.from_array(np.zeros(10, np.float32), "bg")]
    nodes = []
    x = "x"
    if qdq:
        sc = (np.abs(wc).reshape(conv_out, -1).max(1) / 127).astype(np.float32)
        qc = np.round(wc / sc[:, None, None, None]).astype(np.int8)
        sg = (np.abs(wg).max(1) / 7).astype(np.float32)
        qg = np.round(wg / sg[:, None]).astype(np.int8)
        inits += [numpy_helper.from_array(qc, "qc"), numpy_helper.from_array(sc, "sc"),
                  helper.make_tensor("qg", TensorProto.INT4, qg.shape, qg.flatten().tolist()),
                  numpy_helper.from_array(sg, "sg"),
                  numpy_helper.from_array(np.array(0.05, np.float32), "xs"),
                  numpy_helper.from_array(np.array(0, np.int8), "xz")]
        nodes += [helper.make_node("DequantizeLinear", ["qc", "sc"], ["wc"], axis=0, name="dq_wc"),
                  helper.make_node("DequantizeLinear", ["qg", "sg"], ["wg"], axis=0, name="dq_wg"),
                  helper.make_node("QuantizeLinear", ["x", "xs", "xz"], ["xq"], name="q_x"),
                  helper.make_node("DequantizeLinear", ["xq", "xs", "xz"], ["xd"], name="dq_x")]
        x = "xd"
    else:
        inits += [numpy_helper.from_array(wc, "wc"), numpy_helper.from_array(wg, "wg")]
    nodes += [helper.make_node("Conv", [x, "wc", "bc"], ["c"], pads=[1, 1, 1, 1], name="conv"),
              helper.make_node("Relu", ["c"], ["r"], name="relu"),
              helper.make_node("Flatten", ["r"], ["f"], name="flat"),
              helper.make_node("Gemm", ["f", "wg", "bg"], ["y"], transB=1, name="fc")]
    g = helper.make_graph(nodes, "two", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 2, 8, 8])],
                          [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 10])], inits)
    m = helper.make_model(g, opset_imports=[helper.make_opsetid("", 21)])
    m.ir_version = 10
    for k, v in (metadata or {}).items():
        m.metadata_props.append(onnx.StringStringEntryProto(key=k, value=v))
    return m


CONV_MACS = 8 * 8 * 4 * 2 * 3 * 3      # positions x out x in x kernel = 4,608
FC_MACS = 10 * 4 * 8 * 8                # 2,560


def test_bops_of_a_float_two_layer_model():
    costs = {c.name: c for c in cost.layer_costs(ingest.load(_two_layer()))}
    assert costs["conv"].macs == 4608 and costs["fc"].macs == 2560
    assert costs["conv"].bops == CONV_MACS * 32 * 32 == 4_718_592
    assert costs["fc"].bops == FC_MACS * 32 * 32 == 2_621_440
    assert cost.totals(list(costs.values()))["bops"] == 7_340_032
    assert costs["conv"].weight_bytes == 72 * 4 + 4 * 4
    assert costs["fc"].params == 2560 + 10


def test_bops_of_a_qdq_two_layer_model_from_dtypes_and_from_metadata():
    costs = {c.name: c for c in cost.layer_costs(ingest.load(_two_layer(qdq=True)))}
    conv, fc = costs["conv"], costs["fc"]
    assert (conv.wbits, conv.abits, conv.bits_from) == (8, 8, "dtype")      # int8 weight, int8 input
    assert (fc.wbits, fc.abits) == (4, 32)                                  # int4 weight, float input
    assert conv.bops == CONV_MACS * 8 * 8 == 294_912
    assert fc.bops == FC_MACS * 4 * 32 == 327_680
    assert conv.weight_bytes == 72 * 1 + 4 * 4 and fc.weight_bytes == 2560 / 2 + 10 * 4
    meta = {"datafree.layers": json.dumps({"conv": {"wbits": 6, "abits": 8}, "fc": {"wbits": 4, "abits": None}})}
    costs = {c.name: c for c in cost.layer_costs(ingest.load(_two_layer(qdq=True, metadata=meta)))}
    assert costs["conv"].bops == CONV_MACS * 6 * 8 and costs["conv"].bits_from == "metadata"
    assert costs["fc"].bops == FC_MACS * 4 * 32
    assert costs["conv"].weight_bytes == 72 + 16      # 6-bit grid stored in int8


def test_resnet20_mac_count_matches_an_independent_count():
    conv3x3 = lambda hw, cin, cout: hw * hw * cout * cin * 9
    expected = (conv3x3(32, 3, 16)                                   # conv1 (stem)
                + 6 * conv3x3(32, 16, 16)                            # layer1: 3 blocks x 2 convs
                + conv3x3(16, 16, 32) + 5 * conv3x3(16, 32, 32)      # layer2: stride-2 conv, then 5
                + conv3x3(8, 32, 64) + 5 * conv3x3(8, 64, 64)        # layer3: stride-2 conv, then 5
                + 64 * 10)                                           # linear
    assert expected == 442_368 + 16 * 2_359_296 + 2 * 1_179_648 + 640 == 40_551_040
    costs = cost.layer_costs(ingest.load(RESNET))
    assert len(costs) == 20
    assert cost.totals(costs)["macs"] == expected
    assert cost.totals(costs)["bops"] == expected * 1024
    assert cost.totals(cost.assume_bits(costs, 4, 8))["bops"] == expected * 32


# ------------------------------------------------------------- targets
PROFILE = """
name = "toy"
kind = "npu"
description = "test device"
bandwidth_gb_s = 1.0
onchip_kib = 1
energy_pj_per_byte = 10.0
[peak_gmacs]
fp32 = 1.0
w8a8 = 4.0
[energy_pj_per_mac]
fp32 = 10.0
w8a8 = 1.0
"""


def test_builtin_profiles_load_and_cover_the_required_devices():
    names = targets.builtin_names()
    assert {"cortex-a55", "cortex-m7", "jetson-nano", "ethos-u55", "mobile-npu"} <= set(names)
    npu = targets.load_target("mobile-npu")
    assert {"w8a8", "w4a8"} <= set(npu.peak_gmacs)
    assert "w8a8" in targets.load_target("cortex-m7").peak_gmacs


def test_roofline_and_fallback_on_a_toy_profile():
    t = targets.parse_target(PROFILE)
    c = cost.LayerCost("l", "Conv", "conv", macs=4_000_000, weights=1000, biases=0, wbits=4, abits=8,
                       wstore=4, astore=8, act_in=100, act_out=100)
    e = targets.estimate_layer(t, c)
    assert (e.runs_as, e.native) == ("w8a8", False)              # no int4 kernel: runs as int8
    assert e.compute_s == pytest.approx(4e6 / 4e9)
    assert e.bytes_moved == 500                                  # activations (200 B) fit in 1 KiB
    assert e.latency_s == pytest.approx(1e-3)
    assert e.energy_j == pytest.approx((4e6 * 1.0 + 500 * 10.0) * 1e-12)
    big = targets.estimate_layer(t, cost.LayerCost("b", "Conv", "conv", 10, 8_000_000, 0, 32, 32, 32, 32, 0, 0))
    assert big.bound == "memory" and big.latency_s == pytest.approx(32e6 / 1e9)


@pytest.mark.parametrize("text, field", [
    (PROFILE.replace("bandwidth_gb_s = 1.0\n", ""), "bandwidth_gb_s"),
    (PROFILE.replace("w8a8 = 1.0\n", ""), "energy_pj_per_mac.w8a8"),
    (PROFILE.replace("fp32 = 1.0", "fp32 = -1.0"), "fp32"),
    (PROFILE.replace("w8a8 = 4.0", "int3 = 4.0"), "peak_gmacs.int3"),
    (PROFILE.replace('name = "toy"', "name = "), "TOML"),
])
def test_malformed_profiles_name_the_field(text, field):
    with pytest.raises(UserError, match=field.replace(".", r"\.")):
        targets.parse_target(text)


# ------------------------------------------------------------- document
def test_report_document_before_compression(tmp_path):
    rep = build_report(RESNET, target="cortex-a55", bits=(8, 4))
    d = rep.doc
    assert d["schema"] == SCHEMA == "datafree.report/1"
    assert set(d) >= {"schema", "mode", "model", "reference", "target", "probes", "layers", "totals", "choices",
                      "weight_sqnr", "weight_sqnr_summary", "output_sqnr", "dynamic", "measured", "bounds",
                      "assumptions", "timings"}
    assert d["mode"] == "before" and d["totals"]["macs"] == 40_551_040
    assert [c["choice"] for c in d["choices"]] == ["FP32", "W8A8", "W4A8"]
    w4 = d["choices"][2]
    assert w4["bops"] == 40_551_040 * 32 and len(w4["not_native"]) == 20     # no int4 on a Cortex-A55
    assert {"layer", "bits", "sparsity", "quant_db", "prune_db", "winner", "kurtosis"} <= set(d["weight_sqnr"][0])
    assert len(d["weight_sqnr"]) == 40
    files = write_report(rep, tmp_path / "out")
    names = {p.name for p in files}
    assert {"report.md", "report.json", "sqnr.png", "sqnr.svg", "cost.png", "cost.svg"} <= names
    assert json.loads((tmp_path / "out" / "report.json").read_text())["schema"] == SCHEMA
    assert "W4A8" in (tmp_path / "out" / "report.md").read_text()


def test_output_sqnr_against_a_reference_on_images():
    d = build_report(FOLDED, reference=RESNET, images=IMAGES, n_probes=8, bits=(4,)).doc
    out = d["output_sqnr"]
    assert d["mode"] == "after" and d["probes"]["source"].startswith("images")
    assert len(out["layers"]) == 20 and not out["skipped"]
    assert all(r["sqnr_db"] is None or r["sqnr_db"] > 60 for r in out["layers"])   # folding BN is exact
    assert out["end_to_end"]["top1_agreement"] == 1.0


def test_pruned_layers_are_compared_only_end_to_end(tmp_path):
    ref, small = tmp_path / "ref.onnx", tmp_path / "small.onnx"
    onnx.save(_two_layer(), ref)
    onnx.save(_two_layer(conv_out=3), small)
    d = build_report(small, reference=ref, n_probes=4, synth_steps=2)
    out = d.doc["output_sqnr"]
    assert out["skipped"]["conv"].startswith("pruned: 3 of 4 channels")
    assert [r["layer"] for r in out["layers"]] == ["fc"]
    assert "pruned layers" in out["compared_at"]
    assert d.doc["probes"]["count"] == 4
    assert d.doc["probes"]["source"].startswith(("synthetic", "gaussian noise"))


def test_a_reference_sharing_no_layer_is_warned_about(tmp_path):
    ref, small, other = tmp_path / "ref.onnx", tmp_path / "small.onnx", tmp_path / "other.onnx"
    onnx.save(_two_layer(), ref)
    onnx.save(_two_layer(conv_out=3), small)
    unrelated = _two_layer()
    for node in unrelated.graph.node:
        node.name = f"other_{node.name}"
    onnx.save(unrelated, other)
    assert build_report(small, reference=ref, n_probes=2, synth_steps=1).doc["warnings"] == []
    rep = build_report(small, reference=other, n_probes=2, synth_steps=1)
    assert len(rep.doc["warnings"]) == 1 and "shares no layer name" in rep.doc["warnings"][0]
    write_report(rep, tmp_path / "out", plots=False)
    assert "**warning**: the reference shares no layer name" in (tmp_path / "out" / "report.md").read_text()


# ------------------------------------------------------------------ CLI
def test_cli_targets_lists_profiles():
    r = CliRunner().invoke(main, ["targets"])
    assert r.exit_code == 0, r.output
    assert "cortex-m7" in r.output and "jetson-nano" in r.output


def test_cli_report_writes_the_folder(tmp_path):
    r = CliRunner().invoke(main, ["report", str(RESNET), "--target", "ethos-u55", "--bits", "8,4",
                                  "-o", str(tmp_path / "rep")])
    assert r.exit_code == 0, r.output
    d = json.loads((tmp_path / "rep" / "report.json").read_text())
    assert d["target"]["name"] == "ethos-u55" and (tmp_path / "rep" / "cost.svg").exists()


def _bad_reference(tmp_path) -> Path:
    p = tmp_path / "other.onnx"
    onnx.save(_two_layer(), p)
    return p


@pytest.mark.parametrize("case", ["unknown target", "malformed toml", "missing field", "reference", "out is file",
                                  "bits"])
def test_cli_bad_input_exits_2_with_one_line(tmp_path, case):
    out = tmp_path / "rep"
    args = ["report", str(RESNET), "-o", str(out)]
    expect = ""
    if case == "unknown target":
        args += ["--target", "cortex-z99"]
        expect = "known targets: cortex-a55"
    elif case == "malformed toml":
        (tmp_path / "t.toml").write_text("name = [unclosed")
        args += ["--target", str(tmp_path / "t.toml")]
        expect = "not valid TOML"
    elif case == "missing field":
        (tmp_path / "t.toml").write_text(PROFILE.replace("onchip_kib = 1\n", ""))
        args += ["--target", str(tmp_path / "t.toml")]
        expect = "onchip_kib"
    elif case == "reference":
        args += ["--reference", str(_bad_reference(tmp_path))]
        expect = "differ"
    elif case == "out is file":
        out.write_text("x")
        expect = "is an existing file"
    elif case == "bits":
        args += ["--bits", "8,x"]
        expect = "--bits"
    r = CliRunner().invoke(main, args)
    assert r.exit_code == 2, r.output
    lines = [l for l in r.output.splitlines() if l.strip()]
    assert len(lines) == 1 and lines[0].startswith("Error:") and expect in lines[0], r.output


# -------------------------------------------------------------- dynamic
def test_dynamic_costs_from_chosen_bits_and_metadata(monkeypatch):
    """Stem at 8 bits, two groups at the bits each image chose, the selector counted apart."""
    rng = np.random.default_rng(0)
    f = lambda *s: rng.standard_normal(s).astype(np.float32)
    inits = [numpy_helper.from_array(a, n) for n, a in
             (("ws", f(4, 2, 3, 3)), ("W1", f(4, 4)), ("b1", f(4)), ("W2", f(4, 3)), ("b2", f(3)),
              ("table", np.array([[4, 6], [8, 8], [4, 4]], np.float32)))]
    nodes = [helper.make_node("Conv", ["x", "ws"], ["c"], pads=[1, 1, 1, 1], name="stem"),
             helper.make_node("Relu", ["c"], ["feat"], name="act"),
             helper.make_node("BitSelect", ["feat", "W1", "b1", "W2", "b2", "table"], ["config", "bits"],
                              domain="ai.datafree", name="select"),
             helper.make_node("GlobalAveragePool", ["feat"], ["y"], name="pool")]
    vi = [helper.make_tensor_value_info(n, TensorProto.FLOAT, [1, 4, 8, 8]) for n in ("c", "feat")]
    g = helper.make_graph(nodes, "dyn", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 2, 8, 8])],
                          [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 4, 1, 1]),
                           helper.make_tensor_value_info("bits", TensorProto.FLOAT, [1, 2])], inits, value_info=vi)
    m = helper.make_model(g, opset_imports=[helper.make_opsetid("", 17), helper.make_opsetid("ai.datafree", 1)])
    meta = {"group_macs": [1000, 2000], "stem": "stem", "stem_bits": 8, "bits_output": "bits"}
    m.metadata_props.append(onnx.StringStringEntryProto(key="datafree.dynamic", value=json.dumps(meta)))
    model = ingest.load(m)
    assert cost.dynamic_costs(ingest.load(_two_layer()), np.zeros((2, 2, 8, 8), np.float32)) is None

    from datafree.toolchain.report import probes
    monkeypatch.setattr(probes, "run_model", lambda model, x, names=(): {"bits": np.array([[4, 6], [8, 8]], float)})
    d = cost.dynamic_costs(model, np.zeros((2, 2, 8, 8), np.float32))
    stem = CONV_MACS * 8 * 8
    per_image = [stem + 1000 * 16 + 2000 * 36, stem + 1000 * 64 + 2000 * 64]
    assert (d.min_bops, d.max_bops, d.expected_bops) == (per_image[0], per_image[1], sum(per_image) / 2)
    assert d.mean_bits == [6.0, 7.0]
    assert d.selector_macs == 4 * 4 + 4 * 3 and d.selector_params == 16 + 4 + 12 + 3
    assert d.selector_bops == (d.selector_macs + 4 * 8 * 8) * 32 * 32


def test_cli_report_with_bounds_and_measure(tmp_path):
    r = CliRunner().invoke(main, ["report", str(RESNET), "--images", str(IMAGES), "--probes", "2", "--bounds",
                                  "--bounds-max-n", "27", "--bounds-budget", "2", "--measure", "--bits", "4",
                                  "-o", str(tmp_path / "rep")])
    assert r.exit_code == 0, r.output
    d = json.loads((tmp_path / "rep" / "report.json").read_text())
    (row,) = d["bounds"]["layers"]
    assert row["layer"] == "/conv1/Conv" and row["bits"] == 4 and 1 <= row["channels"] <= 16
    assert row["rtn_db"] <= row["best_db"] <= row["limit_db"] + 1e-6
    assert "64 per output channel > 27" in d["bounds"]["skipped"]["/linear/Gemm"]
    batches = d["measured"]["batches"]
    assert batches["1"]["ms"] > 0 and len(batches) == 2 and "ratio" not in batches["1"]
    assert "How good can rounding be" in (tmp_path / "rep" / "report.md").read_text()


def test_host_target_is_measured_once_and_cached(tmp_path, monkeypatch):
    from datafree.toolchain.report import host

    monkeypatch.setenv("DATAFREE_CACHE", str(tmp_path))
    monkeypatch.setattr(host, "_SECONDS", 0.0)
    first = targets.load_target("host")
    assert first.name == "host" and first.peak_gmacs["w8a8"] > 0 and first.peak_gmacs["fp32"] > 0
    assert first.bandwidth_gb_s > 0 and first.onchip_kib > 0 and "cores" in first.description
    assert len(list((tmp_path / "host").glob("*.json"))) == 1

    def not_again():
        raise AssertionError("measured twice")

    monkeypatch.setattr(host, "measure_host", not_again)
    assert targets.load_target("host") == first


def test_report_measure_on_host_checks_the_estimate_layer_by_layer(tmp_path, monkeypatch):
    """--target host --measure: batch 1 and a large batch as ratios to the reference, and
    onnxruntime's profile read back onto every layer, float (NCHWc kernels named after
    their outputs) and quantized (fused QLinearConv / QGemm named after the layer)."""
    import onnx_ir as ir

    from datafree.toolchain.compress import compress
    from datafree.toolchain.recipe import Recipe
    from datafree.toolchain.report import host

    monkeypatch.setenv("DATAFREE_CACHE", str(tmp_path))
    monkeypatch.setattr(host, "_SECONDS", 0.0)
    small = tmp_path / "w8a8.onnx"
    onnx.save(ir.serde.serialize_model(compress(RESNET, Recipe(wbits=8, abits=8, synthetic=0)).model), str(small))
    for model, reference in ((RESNET, None), (small, RESNET)):
        d = build_report(model, reference=reference, target="host", measure=True, n_probes=2).doc
        m = d["measured"]
        assert len(m["batches"]) == 2 and "1" in m["batches"]     # the tests shrink the large batch
        assert all(("ratio" in b) is (reference is not None) for b in m["batches"].values())
        c = m["estimate_check"]
        assert len(c["layers"]) == 20 and not c["untimed"]
        assert c["measured_s"] == pytest.approx(sum(r["measured_s"] for r in c["layers"]))
        assert c["estimate_s"] == pytest.approx(d["totals"]["latency_s"])
        assert 0 < c["median_ratio"] < 100
    r = CliRunner().invoke(main, ["report", str(small), "--reference", str(RESNET), "--target", "host", "--measure",
                                  "--probes", "2", "-o", str(tmp_path / "rep")])
    assert r.exit_code == 0, r.output
    text = " ".join((tmp_path / "rep" / "report.md").read_text().split())
    assert "the reference's" in text and "against onnxruntime's own profile" in text
