"""Where torch runs: ``--device auto|cpu|cuda``, and code that keeps every tensor on the device.

No GPU is needed to check the second: the runs below make torch's default device "meta"
(and ``torch.from_numpy`` / ``torch.as_tensor`` without a device give meta tensors), so any
tensor the toolchain makes without naming the device of the run lands on meta, and torch
refuses to mix it with the run's tensors, as it would refuse a CPU tensor beside CUDA
ones.  The runs must write the same bytes as plain ones.
"""

from __future__ import annotations

import contextlib
import json
from unittest import mock

import onnx_ir as ir
import pytest
import torch
from click.testing import CliRunner

import edge_zoo
from datafree.toolchain import device as dev
from datafree.toolchain.cli import main
from datafree.toolchain.compress import compress
from datafree.toolchain.errors import UserError
from datafree.toolchain.recipe import Recipe

SMALL = {"synthetic": 16, "synthetic_steps": 4, "joint_steps": 5}


@contextlib.contextmanager
def _tensors_without_a_device_go_to_meta():
    real_from_numpy, real_as_tensor = torch.from_numpy, torch.as_tensor

    def from_numpy(a):
        return real_from_numpy(a).to("meta")

    def as_tensor(data, dtype=None, device=None):
        return real_as_tensor(data, dtype=dtype, device="meta" if device is None else device)

    with torch.device("meta"), mock.patch.object(torch, "from_numpy", from_numpy), \
            mock.patch.object(torch, "as_tensor", as_tensor):
        yield


def _bytes(source, recipe: Recipe, strict: bool) -> bytes:
    with _tensors_without_a_device_go_to_meta() if strict else contextlib.nullcontext():
        result = compress(source, recipe, measure=False, device="cpu")
    assert result.summary.device.startswith("cpu")
    return ir.serde.serialize_model(result.model).SerializeToString()


@pytest.mark.parametrize("case", ["bn-statistics prune W4A8", "dynamic cascade", "folded detector prune W4A8"])
def test_every_tensor_is_made_on_the_device_of_the_run(case, resnet20_bn, tmp_path, monkeypatch):
    """Generation (BN statistics and procedural photographs), pruning with joint fits,
    GPTQ, activation ranges and the floor, the dynamic plan: nothing is made off the device."""
    monkeypatch.setenv("DATAFREE_CACHE", str(tmp_path / "cache"))
    source, recipe = {
        "bn-statistics prune W4A8": (resnet20_bn, {"prune": 0.3, "wbits": 4, "abits": 8, **SMALL}),
        "dynamic cascade": (resnet20_bn, {"synthetic": 32, "synthetic_steps": 4,
                                          "dynamic": {"bits": [4, 8], "target_bits": 6, "mode": "cascade",
                                                      "steps": 20}}),
        "folded detector prune W4A8": (edge_zoo.export("yolo_like", tmp_path),
                                       {"prune": 0.3, "wbits": 4, "abits": 8, "time_budget": "10m",
                                        "input_shape": [3, 64, 64], **SMALL}),   # small: placement, not quality
    }[case]
    recipe = Recipe.from_dict(recipe)
    assert _bytes(source, recipe, strict=True) == _bytes(source, recipe, strict=False)


def test_the_meta_check_catches_a_tensor_made_off_the_device():
    with pytest.raises(RuntimeError, match="device"), _tensors_without_a_device_go_to_meta():
        x = dev.tensor([1.0, 2.0])
        x + torch.ones(2)


def test_resolve(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert dev.resolve("auto") == dev.resolve(None) == dev.resolve("CPU") == torch.device("cpu")
    with pytest.raises(UserError, match="no CUDA device"):
        dev.resolve("cuda")
    for bad in ("gpu", "tpu", "meta", "cuda:x"):
        with pytest.raises(UserError, match="auto, cpu, cuda"):
            dev.resolve(bad)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    monkeypatch.delenv("CUBLAS_WORKSPACE_CONFIG", raising=False)
    assert dev.resolve("auto") == torch.device("cuda") and dev.resolve("cuda:0") == torch.device("cuda:0")
    import os

    assert os.environ["CUBLAS_WORKSPACE_CONFIG"]      # deterministic cuBLAS for the generator
    with pytest.raises(UserError, match="finds 1 CUDA device"):
        dev.resolve("cuda:1")


def test_the_run_uses_its_device_and_hands_it_back():
    assert dev.current() == torch.device("cpu")
    with dev.using(torch.device("meta")):
        assert dev.current() == torch.device("meta") and dev.tensor([1.0]).device.type == "meta"
    assert dev.current() == torch.device("cpu")


@pytest.mark.skipif(torch.cuda.is_available(), reason="this machine has a CUDA device")
@pytest.mark.parametrize("value,message", [("cuda", "no CUDA device"), ("tpu", "device must be one of")])
def test_cli_refuses_a_device_it_cannot_use(value, message, resnet20_bn, tmp_path):
    out = tmp_path / "o.onnx"
    res = CliRunner().invoke(main, ["compress", str(resnet20_bn), "-o", str(out), "--wbits", "8", "--device", value])
    assert res.exit_code == 2, res.output
    assert message in res.output and "Traceback" not in res.output and len(res.output.strip().splitlines()) == 1
    assert not out.exists()


def test_summary_says_where_it_ran(resnet20_bn, tmp_path):
    res = CliRunner().invoke(main, ["compress", str(resnet20_bn), "-o", str(tmp_path / "o.onnx"), "--wbits", "8",
                                    "--no-measure", "--device", "cpu", "--json"])
    assert res.exit_code == 0, res.output
    assert json.loads(res.output)["device"] == f"cpu ({torch.get_num_threads()} threads)"
    res = CliRunner().invoke(main, ["compress", str(resnet20_bn), "-o", str(tmp_path / "o.onnx"), "--wbits", "8",
                                    "--no-measure"])
    assert res.exit_code == 0 and " on cpu (" in res.output, res.output


def test_a_gpu_out_of_memory_is_one_line_saying_what_to_do():
    with pytest.raises(UserError, match="out of memory on cuda:0: compress on the CPU"), \
            dev.using(torch.device("cuda:0")):
        raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")
    with pytest.raises(torch.OutOfMemoryError), dev.using(torch.device("cpu")):
        raise torch.OutOfMemoryError("not a GPU's")
