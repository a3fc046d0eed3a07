"""From a torch ``nn.Module`` to an ONNX file the compressor can work on.

The TorchScript exporter folds BatchNormalization into the preceding Conv when it
constant-folds; the compressor wants BN kept (its statistics are the data-free
stand-in for activations), so export runs in eval mode with constant folding off.
The batch axis is dynamic, and the file is written atomically by ``writer.save``.

    from datafree.exporters import export
    export(model, torch.zeros(1, 3, 224, 224), "model.onnx")

``load_torchscript`` and ``load_factory`` turn what a user names on the command
line into a module; every bad input becomes a one-line ``UserError``.
"""

from __future__ import annotations

import importlib
import importlib.util
import os
import sys
import tempfile
import warnings
from pathlib import Path
from typing import Sequence

import onnx_ir as ir
import torch
from torch import nn

from datafree.exporters.writer import save
from datafree.toolchain.errors import UserError

Inputs = torch.Tensor | Sequence[torch.Tensor] | Sequence[int]


def as_inputs(spec: Inputs) -> tuple[torch.Tensor, ...]:
    """A tensor, a tuple of tensors, or one shape like ``(1, 3, 32, 32)`` (zeros) as a tuple of tensors."""
    if isinstance(spec, torch.Tensor):
        return (spec,)
    spec = tuple(spec)
    if spec and all(isinstance(d, int) and not isinstance(d, bool) for d in spec):
        if any(d <= 0 for d in spec):
            raise UserError(f"input shape {spec} must have positive dimensions")
        return (torch.zeros(spec),)
    if spec and all(isinstance(t, torch.Tensor) for t in spec):
        return spec
    raise UserError("example inputs must be a tensor, a tuple of tensors, or a shape such as (1, 3, 32, 32)")


def parse_shape(text: str) -> tuple[int, ...]:
    """``"1,3,32,32"`` (or ``1x3x32x32``) as a shape."""
    try:
        shape = tuple(int(d) for d in text.replace("x", ",").split(",") if d.strip())
    except ValueError:
        raise UserError(f"input shape {text!r} is not a list of integers such as 1,3,32,32") from None
    if not shape or any(d <= 0 for d in shape):
        raise UserError(f"input shape {text!r} must list positive integers such as 1,3,32,32")
    return shape


def check_inputs(module: nn.Module, inputs: tuple[torch.Tensor, ...]) -> None:
    """Run ``module`` once so a shape that does not fit fails here, in one line."""
    try:
        with torch.no_grad():
            module(*inputs)
    except Exception as exc:
        shapes = ", ".join(str(tuple(t.shape)) for t in inputs)
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise UserError(f"input shape {shapes} does not fit {type(module).__name__}: {first}") from None


def export(module: nn.Module, example_inputs: Inputs, path: str | os.PathLike, *, opset: int = 17,
           dynamic_batch: bool = True, external_data: bool | None = None,
           input_names: Sequence[str] = ("input",), output_names: Sequence[str] = ("output",)) -> Path:
    """Export ``module`` to ``path`` with BatchNormalization nodes kept; returns the path.

    ``external_data``: True puts the weights in ``<path>.data``, None decides by size.
    The module's train/eval mode is restored afterwards.
    """
    if not isinstance(module, nn.Module):
        raise UserError(f"expected a torch nn.Module, got {type(module).__name__}")
    path = Path(path)
    if not path.parent.exists():
        raise UserError(f"{path.parent}: output folder does not exist")
    inputs = as_inputs(example_inputs)
    was_training = module.training
    module.eval()
    try:
        check_inputs(module, inputs)
        with tempfile.TemporaryDirectory(prefix="datafree-export-") as tmp:
            raw = Path(tmp) / "model.onnx"
            _torch_export(module, inputs, raw, opset, dynamic_batch, list(input_names), list(output_names))
            model = ir.load(raw)  # external weights (> 2 GB) are read lazily from tmp: save before it goes
            return save(model, path, external_data=external_data)
    finally:
        module.train(was_training)


def _torch_export(module, inputs, path, opset, dynamic_batch, input_names, output_names) -> None:
    names = input_names + [f"input_{i}" for i in range(len(input_names), len(inputs))]
    names = names[:len(inputs)]
    axes = {n: {0: "batch"} for n in names + output_names} if dynamic_batch else None
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # the TorchScript exporter's deprecation and tracer notices
            torch.onnx.export(module, inputs, str(path), dynamo=False, opset_version=opset,
                              input_names=names, output_names=output_names, dynamic_axes=axes,
                              training=torch.onnx.TrainingMode.EVAL, do_constant_folding=False)
    except Exception as exc:
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise UserError(f"torch could not export {type(module).__name__} to ONNX opset {opset}: {first}") from None


# ------------------------------------------------------------- module sources
def load_torchscript(path: str | os.PathLike) -> nn.Module:
    """A TorchScript file (``torch.jit.save``) as a module on the CPU."""
    path = Path(path)
    if not path.is_file():
        raise UserError(f"{path}: no such file")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", DeprecationWarning)
            return torch.jit.load(str(path), map_location="cpu").eval()
    except Exception as exc:
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise UserError(f"{path}: not a TorchScript model ({first})") from None


def load_factory(spec: str) -> nn.Module:
    """``"package.module:factory"`` or ``"path/to/file.py:factory"``: call the factory, get a module."""
    target, sep, attr_name = spec.rpartition(":")
    if not sep or not target or not attr_name:
        raise UserError(f"factory {spec!r} must look like package.module:function or file.py:function")
    mod = _import(target, spec)
    factory = mod
    for part in attr_name.split("."):
        factory = getattr(factory, part, None)
        if factory is None:
            raise UserError(f"factory {spec!r}: {target} has no attribute {attr_name!r}")
    if not callable(factory):
        raise UserError(f"factory {spec!r}: {attr_name} is not callable")
    try:
        module = factory() if not isinstance(factory, nn.Module) else factory
    except Exception as exc:
        raise UserError(f"factory {spec!r} failed: {type(exc).__name__}: {exc}") from None
    if not isinstance(module, nn.Module):
        raise UserError(f"factory {spec!r} returned {type(module).__name__}, not a torch nn.Module")
    return module.eval()


def _import(target: str, spec: str):
    if target.endswith(".py"):
        file = Path(target)
        if not file.is_file():
            raise UserError(f"factory {spec!r}: {file} does not exist")
        name = f"datafree_factory_{abs(hash(str(file.resolve())))}"
        loader = importlib.util.spec_from_file_location(name, file)
        mod = importlib.util.module_from_spec(loader)
        sys.modules[name] = mod
        try:
            loader.loader.exec_module(mod)
        except Exception as exc:
            sys.modules.pop(name, None)
            raise UserError(f"factory {spec!r}: {file} failed to import: {type(exc).__name__}: {exc}") from None
        return mod
    cwd = os.getcwd()
    added = cwd not in sys.path and "" not in sys.path
    if added:   # as `python -m` would: modules in the working folder import (console scripts lack it)
        sys.path.insert(0, cwd)
    try:
        return importlib.import_module(target)
    except Exception as exc:
        raise UserError(f"factory {spec!r}: cannot import {target} ({type(exc).__name__}: {exc})") from None
    finally:
        if added and cwd in sys.path:
            sys.path.remove(cwd)
