"""Shared fixtures: the bundled ResNet-20 exports, the bundled dev images, an accuracy helper."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch

import zoo

if os.environ.get("PYTEST_XDIST_WORKER"):
    # one thread per worker: two workers with two spinning threads each on two cores run
    # the many small steps of the fitting passes over ten times slower
    torch.set_num_threads(1)

@pytest.fixture(autouse=True)
def _brief_speed_measurements(monkeypatch):
    """compress() times float and compressed model at its end: a few runs at batches 1 and
    2 are enough to exercise that here (tests assert behaviour, benchmarks measure)."""
    from datafree.toolchain.passes import speed

    monkeypatch.setattr(speed, "BUDGET_S", 0.0)
    monkeypatch.setattr(speed, "LARGE_RUN_S", 0.0)


ROOT = Path(__file__).resolve().parent.parent
MODELS = ROOT / "examples" / "models"
DEV_IMAGES = ROOT / "examples" / "data" / "cifar10_dev500.npz"


def _asset(name: str) -> Path:
    path = MODELS / name
    if not path.exists():
        pytest.skip(f"bundled model {path} is missing")
    return path


@pytest.fixture(scope="session")
def resnet20_bn() -> Path:
    """ResNet-20 (CIFAR-10) exported with BatchNormalization nodes kept."""
    return _asset("resnet20_bn.onnx")


@pytest.fixture(scope="session")
def resnet20_folded() -> Path:
    """ResNet-20 with BN folded into the convolutions."""
    return _asset("resnet20_folded.onnx")


@pytest.fixture(scope="session")
def resnet20_dynamo() -> Path:
    """ResNet-20 from the dynamo exporter, weights in an external .data file."""
    return _asset("resnet20_dynamo.onnx")


@pytest.fixture(scope="session")
def dev_images():
    """The 500 bundled CIFAR-10 test images: (x float32 NCHW normalised, labels int64)."""
    return zoo.load_images(DEV_IMAGES)


@pytest.fixture(scope="session")
def accuracy():
    """``accuracy(model_or_path, x, y) -> float`` (top-1, onnxruntime CPU)."""
    return zoo.accuracy


@pytest.fixture(scope="session", autouse=True)
def synthetic_cache(tmp_path_factory):
    """One synthetic-image cache for the whole run (shared by xdist workers), never the user's."""
    import os

    root = tmp_path_factory.getbasetemp().parent / "datafree-cache"
    root.mkdir(parents=True, exist_ok=True)
    old = os.environ.get("DATAFREE_CACHE")
    os.environ["DATAFREE_CACHE"] = str(root)
    yield root
    if old is None:
        os.environ.pop("DATAFREE_CACHE", None)
    else:
        os.environ["DATAFREE_CACHE"] = old


# a small synthetic set the tests share (generated once per run, then cached)
SMALL_SYNTHETIC = {"synthetic": 64, "synthetic_steps": 30, "joint_steps": 40}
