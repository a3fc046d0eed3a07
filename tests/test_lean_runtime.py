"""The runtime on a device: ``datafree.runtime`` runs compressed models, static and
dynamic, and retargets a dynamic one, with none of the compressor's dependencies.

The models are made here with the toolchain; a child interpreter, in which importing
torch, onnx_ir, onnxscript, cvxpy, scipy, matplotlib, rich, click or the toolchain
itself fails, runs them and must give what the same calls give here."""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap

import numpy as np
import onnx
import pytest

import zoo
from datafree.exporters.writer import save
from datafree.runtime import InferenceSession
from datafree.runtime.infer import run_file
from datafree.runtime.retarget import retarget_file
from datafree.toolchain.compress import compress
from datafree.toolchain.ingest import load
from datafree.toolchain.passes.dynamic import fit_dynamic
from datafree.toolchain.recipe import DynamicConfig, Recipe
from datafree.toolchain.synth import generate

ABSENT = ("torch", "onnx_ir", "onnxscript", "cvxpy", "scipy", "matplotlib", "rich", "click",
          "datafree.toolchain", "datafree.exporters")
WAYS = {"grouped": {"grouped": True}, "kernels": {"grouped": False, "use_kernels": True},
        "bodies": {"grouped": False, "use_kernels": False}}
RETARGET_BITS = 7.0

# Run in the child: every model's outputs each way, run_file's predictions, and what
# retarget_file writes, into outputs.npz; the modules it loaded into loaded.json.
DEVICE = textwrap.dedent("""
    import importlib.abc, json, sys
    from pathlib import Path

    ABSENT = {absent!r}

    class Absent(importlib.abc.MetaPathFinder):
        def find_spec(self, name, path=None, target=None):
            if any(name == a or name.startswith(a + ".") for a in ABSENT):
                raise ImportError(f"{{name}} is not installed on this device")
            return None

    sys.meta_path.insert(0, Absent())
    import numpy as np
    from datafree.runtime import InferenceSession
    from datafree.runtime.infer import run_file
    from datafree.runtime.retarget import retarget_file

    folder = Path(sys.argv[1])
    x = np.load(folder / "x.npz")["x"]
    out = {{}}
    for name, ways in json.loads((folder / "models.json").read_text()).items():
        for way, kwargs in ways.items():
            for i, y in enumerate(InferenceSession(folder / name, threads=1, **kwargs).run(None, {{"input": x}})):
                out[f"{{name}}/{{way}}/{{i}}"] = y
        out[f"{{name}}/run_file"] = run_file(folder / name, folder / "x.npz", threads=1).predictions
        if "grouped" in ways:
            held, info = retarget_file(folder / name, folder / "x.npz", {bits})
            out[f"{{name}}/retarget"] = np.frombuffer(held.SerializeToString(), np.uint8)
    np.savez(folder / "outputs.npz", **out)
    (folder / "loaded.json").write_text(json.dumps(sorted(sys.modules)))
""").format(absent=ABSENT, bits=RETARGET_BITS)


def _dynamic(name: str, folder) -> onnx.ModelProto:
    _, path = zoo.build(name, folder)
    net = load(path)
    syn = generate(net, 24, steps=4, seed=0, cache=False)
    return fit_dynamic(net, DynamicConfig(bits=(4, 8), target_bits=6.0, steps=20), synthetic=syn).model


@pytest.fixture(scope="module")
def device(tmp_path_factory, resnet20_bn):
    """The models (W8A8 ResNet-20, a cascade, an upfront model), the images, and what
    the child made of them."""
    folder = tmp_path_factory.mktemp("device")
    save(compress(resnet20_bn, Recipe(wbits=8, abits=8, synthetic=0)).model, folder / "w8a8.onnx")
    onnx.save(_dynamic("view_flatten_net", folder), str(folder / "cascade.onnx"))
    onnx.save(_dynamic("chunk_concat_net", folder), str(folder / "upfront.onnx"))
    models = {"w8a8.onnx": {"default": {}}, "cascade.onnx": WAYS, "upfront.onnx": WAYS}
    (folder / "models.json").write_text(json.dumps(models))
    np.savez(folder / "x.npz", x=zoo.images(6))
    child = subprocess.run([sys.executable, "-c", DEVICE, str(folder)], capture_output=True, text=True,
                           timeout=300)
    assert child.returncode == 0, child.stderr
    return folder, models, dict(np.load(folder / "outputs.npz"))


def test_the_runtime_loads_none_of_the_compressor(device):
    folder, _, _ = device
    loaded = json.loads((folder / "loaded.json").read_text())
    assert [m for m in loaded if any(m == a or m.startswith(a + ".") for a in ABSENT)] == []
    assert {"onnxruntime", "datafree.runtime", "datafree.ops.selector"} <= set(loaded)


def test_models_run_on_the_device_as_with_the_compressor(device):
    folder, models, outputs = device
    x = np.load(folder / "x.npz")["x"]
    for name, ways in models.items():
        for way, kwargs in ways.items():
            here = InferenceSession(folder / name, threads=1, **kwargs).run(None, {"input": x})
            for i, y in enumerate(here):
                np.testing.assert_allclose(outputs[f"{name}/{way}/{i}"], y, rtol=0, atol=1e-6)
        assert len(here) == (2 if name != "w8a8.onnx" else 1)
        np.testing.assert_array_equal(outputs[f"{name}/run_file"],
                                      run_file(folder / name, folder / "x.npz", threads=1).predictions)


def test_retarget_on_the_device_writes_what_it_writes_with_the_compressor(device):
    folder, models, outputs = device
    for name in ("cascade.onnx", "upfront.onnx"):
        held, info = retarget_file(folder / name, folder / "x.npz", RETARGET_BITS)
        assert outputs[f"{name}/retarget"].tobytes() == held.SerializeToString()
        assert info["bits_after"] <= RETARGET_BITS
