"""Getting models in and out: torch export, the export-and-compress pipeline, atomic writes.

Names load on first use, so ``datafree.exporters.writer`` does not pull in torch.
"""

from __future__ import annotations

import importlib

import datafree.toolchain  # noqa: F401  (OpenMP spin cap, before torch loads)

_NAMES = {
    "export": "datafree.exporters.torch_export",
    "load_factory": "datafree.exporters.torch_export",
    "load_torchscript": "datafree.exporters.torch_export",
    "compress_module": "datafree.exporters.pipeline",
    "save": "datafree.exporters.writer",
}
__all__ = list(_NAMES)


def __getattr__(name: str):
    if name in _NAMES:
        return getattr(importlib.import_module(_NAMES[name]), name)
    raise AttributeError(f"module 'datafree.exporters' has no attribute {name!r}")
