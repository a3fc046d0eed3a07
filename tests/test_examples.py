"""The examples run as documented (with small settings) and say what they promise."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import pytest

import zoo

EXAMPLES = Path(__file__).resolve().parent.parent / "examples"
FAST = ["--synthetic", "0"]


def _run(script: str, *args: str) -> str:
    done = subprocess.run([sys.executable, str(EXAMPLES / script), *args], capture_output=True, text=True,
                          timeout=600, cwd=EXAMPLES.parent)
    assert done.returncode == 0, done.stderr[-3000:]
    return done.stdout


@pytest.fixture(autouse=True)
def _compress_ready():
    zoo.require_compress()


def test_resnet20_end_to_end(tmp_path):
    out = _run("resnet20_end_to_end.py", "--out", str(tmp_path), "--prune", "0", "--wbits", "8", "--abits", "8",
               *FAST)
    assert (tmp_path / "resnet20_small.onnx").exists()
    before, after = map(float, re.search(r"top-1 on 500 CIFAR-10 test images: ([\d.]+)% -> ([\d.]+)%", out).groups())
    assert before >= 80.0
    assert after >= before - 5.0, out      # W8A8 without pruning stays close to float
    from datafree.toolchain.cli import main

    if "report" in main.commands:
        assert (tmp_path / "report" / "report.md").exists(), out


def test_mobilenetv2_pipeline(tmp_path):
    out = _run("mobilenetv2_pipeline.py", "--out", str(tmp_path), "--width", "0.35", "--resolution", "64", *FAST)
    assert {p.name for p in tmp_path.glob("*.onnx")} == {"mobilenetv2.onnx", "mobilenetv2_small.onnx"}
    assert (tmp_path / "mobilenetv2_small.onnx").stat().st_size < (tmp_path / "mobilenetv2.onnx").stat().st_size / 2
    cosine = float(re.search(r"cosine ([\d.]+)", out).group(1))
    assert cosine > 0.9, out


def test_custom_activation(tmp_path):
    # random weights carry no redundant channels: judge the W8A8 path unpruned
    out = _run("custom_activation.py", "--out", str(tmp_path), "--prune", "0", *FAST)
    assert (tmp_path / "mish_net_small.onnx").exists()
    assert "W8A8" in out and float(re.search(r"cosine to float outputs ([\d.]+)", out).group(1)) > 0.9
