"""The README's Python examples run as written."""

from __future__ import annotations

import re
from pathlib import Path

README = Path(__file__).resolve().parent.parent / "README.md"


def _blocks() -> list[str]:
    return re.findall(r"```python\n(.*?)```", README.read_text(), flags=re.S)


def test_export_pipeline_example_runs(tmp_path, monkeypatch):
    block = next(b for b in _blocks() if "compress_module" in b)
    monkeypatch.chdir(tmp_path)
    exec(compile(block, "README.md", "exec"), {})
    assert (tmp_path / "net.onnx").exists() and (tmp_path / "net_small.onnx").exists()


def test_library_example_runs(tmp_path, monkeypatch, resnet20_bn):
    block = next(b for b in _blocks() if "from datafree.toolchain.compress import compress" in b)
    block = block.replace('"model.onnx"', repr(str(resnet20_bn))).replace(
        "Recipe(prune=0.3, wbits=4, abits=8)", "Recipe(prune=0.3, wbits=4, abits=8, synthetic=0)")
    monkeypatch.chdir(tmp_path)
    exec(compile(block, "README.md", "exec"), {})
    assert (tmp_path / "small.onnx").exists()


def test_plain_onnxruntime_session_example_runs(tmp_path, monkeypatch, resnet20_bn):
    library = next(b for b in _blocks() if "from datafree.toolchain.compress import compress" in b)
    library = library.replace('"model.onnx"', repr(str(resnet20_bn))).replace(
        "Recipe(prune=0.3, wbits=4, abits=8)", "Recipe(wbits=4, synthetic=0)")
    block = next(b for b in _blocks() if 'ort.InferenceSession("small.onnx"' in b)
    monkeypatch.chdir(tmp_path)
    scope: dict = {}
    exec(compile(library, "README.md", "exec"), {})
    exec(compile(block, "README.md", "exec"), scope)
    assert scope["session"].get_inputs()[0].name == "input"
