"""compress(): the library entry point behind ``datafree compress`` and the export pipeline.

    from datafree.toolchain.compress import compress
    from datafree.toolchain.recipe import Recipe
    result = compress("model.onnx", Recipe(prune=0.3, wbits=4, abits=8))
    result.model      # onnx_ir.Model, ready for exporters.writer.save
    result.summary    # per-layer table, totals, skipped layers with reasons
"""

from __future__ import annotations

from dataclasses import dataclass, field

import onnx_ir as ir

from .progress import ProgressFn, silent
from .recipe import Recipe


@dataclass
class LayerRow:
    name: str
    op: str
    kind: str
    channels_before: int
    channels_after: int
    wbits: int | None
    abits: int | None
    macs_before: int | None
    macs_after: int | None
    params_before: int
    params_after: int
    note: str = ""


@dataclass
class Summary:
    rows: list[LayerRow] = field(default_factory=list)
    skipped: dict[str, str] = field(default_factory=dict)      # layer -> why it was not pruned/quantized
    totals: dict[str, float] = field(default_factory=dict)     # params/macs/bytes before and after
    timings: dict[str, float] = field(default_factory=dict)


@dataclass
class CompressResult:
    model: ir.Model
    summary: Summary
    recipe: Recipe


def compress(source, recipe: Recipe | None = None, *, progress: ProgressFn = silent) -> CompressResult:
    """Compress ``source`` (path, ModelProto or ir.Model; never modified) as ``recipe`` says."""
    raise NotImplementedError
