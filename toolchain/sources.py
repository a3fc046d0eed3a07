"""What ``convert-and-compress`` accepts: an ONNX file, a TorchScript file, or ``pkg.module:factory``."""

from __future__ import annotations

import tempfile
from pathlib import Path

import onnx_ir as ir

from .errors import UserError

TORCHSCRIPT_SUFFIXES = (".pt", ".pth", ".ts", ".torchscript", ".jit")


def parse_shape(text: str | None) -> tuple[int, ...] | None:
    if text is None:
        return None
    try:
        shape = tuple(int(s) for s in text.replace("x", ",").split(","))
    except ValueError:
        raise UserError(f"--input-shape must look like 1,3,224,224, got {text!r}") from None
    if not shape or any(d <= 0 for d in shape):
        raise UserError(f"--input-shape must be positive integers, got {text!r}")
    return shape


def resolve_source(model: str, input_shape: str | None):
    """An ONNX path as is; a torch model exported to ONNX (BN kept) first."""
    path = Path(model)
    if path.suffix.lower() == ".onnx" or (path.exists() and path.suffix.lower() not in TORCHSCRIPT_SUFFIXES):
        return model
    from datafree.exporters import torch_export

    shape = parse_shape(input_shape)
    if path.suffix.lower() in TORCHSCRIPT_SUFFIXES:
        module = torch_export.load_torchscript(path)
    elif ":" in model:
        module = torch_export.load_factory(model)
    else:
        raise UserError(f"{model}: not an ONNX file, a TorchScript file ({', '.join(TORCHSCRIPT_SUFFIXES)}) "
                        f"or a package.module:factory")
    if shape is None:
        raise UserError("--input-shape is needed to export a torch model, e.g. --input-shape 1,3,224,224")
    import torch

    example = torch.zeros(shape)
    with tempfile.TemporaryDirectory() as tmp:
        out = torch_export.export(module, (example,), Path(tmp) / "model.onnx")
        return _load_detached(out)


def _load_detached(path: Path) -> ir.Model:
    from .ingest import to_ir

    return to_ir(path)
