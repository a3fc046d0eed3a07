"""This machine as a device profile (``--target host``), and the estimate checked on it.

The built-in profiles describe devices the report cannot run on, from datasheet
peaks (their files give each number's derivation).  The host profile is the one
device the report can measure, so its numbers are measured rather than derived:

* ``peak_gmacs``: what onnxruntime's CPU kernels reach on one 3x3 convolution with
  64 channels in and out at 56x56 (116 M MACs, batch 1; the 10th percentile of about
  a second of runs), once in float (``fp32``) and once as a QDQ layer onnxruntime
  fuses into its 8-bit integer kernel (``w8a8``);
  4-bit weights run on the latter, as the estimate already assumes for int8 CPUs;
* ``bandwidth_gb_s``: a copy of 128 MiB with numpy (bytes read plus written);
* ``onchip_kib``: the largest CPU cache the kernel lists;
* cores and vector width (from the CPU flags) go into the description; energy is not
  measured (zero).

The profile is measured once per CPU model, core count and onnxruntime version, and
kept under ``$DATAFREE_CACHE/host`` (default ``~/.cache/datafree``).

:func:`node_times` reads onnxruntime's own per-node profile of a model at batch 1 and
gives the time of each layer (the kernels that onnxruntime made of it: a fused
QLinearConv, an NCHWc Conv with its activation); :func:`check` compares the roofline
estimate of :mod:`.targets` with it, layer by layer.
"""

from __future__ import annotations

import datetime as dt
import hashlib
import json
import os
import platform
import re
import tempfile
import time
from pathlib import Path

import numpy as np

from .targets import Estimate, Target

NAME = "host"
_CONV = (1, 64, 56, 56)          # the measured layer: input shape, 64 output channels, 3x3, pads 1
_RUNS = 10
_SECONDS = 1.0                   # each rate is timed for about this long


def _cpu() -> tuple[str, int]:
    """(CPU model name, vector width in bits or 0 when unknown)."""
    name, flags = platform.processor() or platform.machine(), set()
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        text = ""
    m = re.search(r"^(model name|Hardware|cpu model)\s*:\s*(.+)$", text, re.M)
    if m:
        name = m.group(2).strip()
    f = re.search(r"^(flags|Features)\s*:\s*(.+)$", text, re.M)
    if f:
        flags = set(f.group(2).split())
    width = 512 if "avx512f" in flags else 256 if "avx2" in flags or "avx" in flags else \
        128 if flags & {"sse2", "asimd", "neon"} else 0
    return name, width


def _largest_cache_kib() -> float:
    sizes = []
    for p in Path("/sys/devices/system/cpu/cpu0/cache").glob("index*/size"):
        m = re.match(r"(\d+)([KMG]?)", p.read_text().strip())
        if m:
            sizes.append(int(m.group(1)) * {"": 1 / 1024, "K": 1, "M": 1024, "G": 1024 ** 2}[m.group(2)])
    return float(max(sizes)) if sizes else 1024.0


def _conv_model(quantized: bool) -> bytes:
    """One 3x3 conv, float or as QDQ that onnxruntime fuses into QLinearConv."""
    from onnx import TensorProto, helper, numpy_helper

    rng = np.random.default_rng(0)
    c = _CONV[1]
    w = rng.normal(0, 0.05, (c, c, 3, 3)).astype(np.float32)
    inits, nodes = [], []
    x, y = "x", "y"
    if quantized:
        wq = np.clip(np.round(w / 0.002), -127, 127).astype(np.int8)
        inits += [numpy_helper.from_array(wq, "wq"), numpy_helper.from_array(np.full(c, 0.002, np.float32), "ws"),
                  numpy_helper.from_array(np.zeros(c, np.int8), "wz"),
                  numpy_helper.from_array(np.float32(0.02), "s"), numpy_helper.from_array(np.uint8(0), "z")]
        nodes += [helper.make_node("QuantizeLinear", ["x", "s", "z"], ["xq"]),
                  helper.make_node("DequantizeLinear", ["xq", "s", "z"], ["xd"]),
                  helper.make_node("DequantizeLinear", ["wq", "ws", "wz"], ["w"], axis=0)]
        x, y = "xd", "yf"
        nodes += [helper.make_node("Conv", [x, "w"], [y], pads=[1, 1, 1, 1]),
                  helper.make_node("QuantizeLinear", [y, "s", "z"], ["yq"]),
                  helper.make_node("DequantizeLinear", ["yq", "s", "z"], ["y"])]
    else:
        inits.append(numpy_helper.from_array(w, "w"))
        nodes.append(helper.make_node("Conv", [x, "w"], [y], pads=[1, 1, 1, 1]))
    graph = helper.make_graph(nodes, "conv", [helper.make_tensor_value_info("x", TensorProto.FLOAT, list(_CONV))],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, None)], inits)
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]).SerializeToString()


def _gmacs(quantized: bool) -> float:
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.log_severity_level = 3
    sess = ort.InferenceSession(_conv_model(quantized), options, providers=["CPUExecutionProvider"])
    x = np.random.default_rng(1).random(_CONV, dtype=np.float32)
    for _ in range(3):
        sess.run(None, {"x": x})
    times = []
    start = time.perf_counter()
    while len(times) < _RUNS or (time.perf_counter() - start < _SECONDS and len(times) < 200):
        t = time.perf_counter()
        sess.run(None, {"x": x})
        times.append(time.perf_counter() - t)
    macs = _CONV[1] * _CONV[1] * 9 * _CONV[2] * _CONV[3]
    return macs / float(np.percentile(times, 10)) / 1e9      # what the kernel reaches, not the machine's noise


def _bandwidth_gb_s() -> float:
    a = np.ones(32 * 2 ** 20, np.float32)        # 128 MiB
    b = np.empty_like(a)
    times = []
    for _ in range(5):
        t = time.perf_counter()
        np.copyto(b, a)
        times.append(time.perf_counter() - t)
    return 2 * a.nbytes / float(np.median(times)) / 1e9


def _cache_path() -> Path:
    import onnxruntime as ort

    name, _ = _cpu()
    key = hashlib.sha1(f"{name}|{os.cpu_count()}|{platform.machine()}|{ort.__version__}".encode()).hexdigest()[:12]
    env = os.environ.get("DATAFREE_CACHE")
    root = Path(env) if env else Path.home() / ".cache" / "datafree"
    return root / "host" / f"{key}.json"


def measure_host() -> Target:
    """Measure this machine (module docstring); nothing is cached."""
    import onnxruntime as ort

    name, width = _cpu()
    fp32, w8a8 = _gmacs(False), _gmacs(True)
    vectors = f"{width}-bit vectors" if width else "vector width unknown"
    when = dt.datetime.now(dt.timezone.utc).strftime("%Y-%m-%d")
    return Target(name=NAME, kind="cpu",
                  description=f"this machine: {name}, {os.cpu_count()} cores, {vectors}; onnxruntime "
                              f"{ort.__version__} CPU kernels (rates measured {when})",
                  bandwidth_gb_s=round(_bandwidth_gb_s(), 2), onchip_kib=_largest_cache_kib(), energy_pj_per_byte=0.0,
                  peak_gmacs={"fp32": round(fp32, 2), "w8a8": round(w8a8, 2)},
                  energy_pj_per_mac={"fp32": 0.0, "w8a8": 0.0},
                  source="measured on this machine (energy not measured)")


def host_target(refresh: bool = False) -> Target:
    """The host profile, measured on first use and then read from the cache."""
    path = _cache_path()
    if not refresh and path.exists():
        try:
            d = json.loads(path.read_text())
            return Target(**d)
        except (ValueError, TypeError):
            pass                                    # a damaged entry is measured again
    target = measure_host()
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        with tempfile.NamedTemporaryFile("w", dir=path.parent, delete=False, suffix=".tmp") as f:
            json.dump(target.to_dict(), f)
        os.replace(f.name, path)
    except OSError:
        pass                                        # a read-only home: measured every time
    return target


# --------------------------------------------------------- per-layer times
_SUFFIX = re.compile(r"(_token_\d+|_nchwc|_kernel_time)+$")
_THROUGH = {"Relu", "Clip", "BatchNormalization", "Add", "Sigmoid", "HardSigmoid", "HardSwish", "Mul",
            "LeakyRelu", "QuantizeLinear", "DequantizeLinear"}


def _layer_of(key: str, layer_nodes: set[str], producer: dict) -> str | None:
    """The layer a profiled onnxruntime node belongs to: its name is a layer node's (fused
    QDQ kernels keep it), or a value's (NCHWc kernels are named after their output),
    traced back through the activations and Adds onnxruntime fuses into it."""
    if key in layer_nodes:
        return key
    node, seen = producer.get(key), 0
    while node is not None and seen < 8:
        if node.name in layer_nodes:
            return node.name
        if node.op_type not in _THROUGH:
            return None
        node = next((producer[i] for i in node.input if i in producer and
                     (producer[i].name in layer_nodes or producer[i].op_type in _THROUGH)), None)
        seen += 1
    return None


def node_times(proto, layer_names: list[str], sample_shape: tuple[int, ...], runs: int = 20) -> dict:
    """Median seconds per layer of ``proto`` (an ``onnx.ModelProto``) at batch 1 from
    onnxruntime's profile (a plain session with default options), and the time of the
    kernels that belong to no layer."""
    import onnxruntime as ort

    producer = {o: n for n in proto.graph.node for o in n.output}
    layers = set(layer_names)
    with tempfile.TemporaryDirectory() as tmp:
        options = ort.SessionOptions()
        options.log_severity_level = 3
        options.enable_profiling = True
        options.profile_file_prefix = str(Path(tmp) / "profile")
        sess = ort.InferenceSession(proto.SerializeToString(), options, providers=["CPUExecutionProvider"])
        x = np.random.default_rng(0).random((1, *sample_shape), dtype=np.float32)
        for _ in range(runs + 2):
            sess.run(None, {sess.get_inputs()[0].name: x})
        events = json.loads(Path(sess.end_profiling()).read_text())
    per_run: dict[str, list[float]] = {}
    for e in events:
        if e.get("cat") == "Node" and e["name"].endswith("_kernel_time"):
            per_run.setdefault(e["name"], []).append(e["dur"] * 1e-6)
    times = {name: 0.0 for name in layer_names}
    other = 0.0
    for name, durs in per_run.items():
        t = float(np.median(durs[2:] or durs))       # the first runs allocate
        layer = _layer_of(_SUFFIX.sub("", name).removeprefix("fused "), layers, producer)
        if layer is None:
            other += t
        else:
            times[layer] += t
    return {"layers": times, "other_s": other}


def check(est: Estimate, measured: dict) -> dict:
    """The estimate against the measured layer times: totals, and the per-layer error
    as the ratio estimate / measured (its median, and the median of |log ratio|)."""
    rows = [(l.name, l.latency_s, measured["layers"].get(l.name, 0.0)) for l in est.layers]
    timed = [(n, e, m) for n, e, m in rows if m > 0]
    ratios = np.array([e / m for _, e, m in timed]) if timed else np.array([np.nan])
    total_e, total_m = sum(e for _, e, _ in timed), sum(m for _, _, m in timed)
    return {"layers": [{"name": n, "estimate_s": e, "measured_s": m} for n, e, m in rows],
            "estimate_s": total_e, "measured_s": total_m, "other_s": measured["other_s"],
            "total_error": total_e / total_m - 1 if total_m else None,
            "median_ratio": float(np.median(ratios)),
            "layer_error_median": float(np.median(np.abs(np.log(ratios)))) if timed else None,
            "untimed": [n for n, _, m in rows if m == 0]}
