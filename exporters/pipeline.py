"""One call from a torch module to a compressed ONNX file: export, compress, write.

    from datafree.exporters import compress_module
    from datafree.toolchain.recipe import Recipe
    compress_module(model, torch.zeros(1, 3, 224, 224), Recipe(prune=0.3, wbits=4, abits=8),
                    path="model_small.onnx")

The recipe is written into the output's ``metadata_props`` by ``compress``, so the
file says how it was made.
"""

from __future__ import annotations

import os
import tempfile
from pathlib import Path

import onnx_ir as ir
from torch import nn

from datafree.exporters.torch_export import Inputs, export
from datafree.exporters.writer import save
from datafree.toolchain.progress import ProgressFn, silent
from datafree.toolchain.recipe import Recipe


def compress_module(module: nn.Module, example_inputs: Inputs, recipe: Recipe | None = None,
                    path: str | os.PathLike | None = None, *, external_data: bool | None = None,
                    progress: ProgressFn = silent, device: str = "auto", **export_kwargs) -> Path | ir.Model:
    """Export ``module``, compress it as ``recipe`` says (default ``Recipe()``), and save it.

    With ``path`` the compressed model is written there (atomically) and the path is
    returned; without, the ``onnx_ir.Model`` is returned.  ``export_kwargs`` go to
    ``export`` (``opset``, ``dynamic_batch``, ``input_names``, ``output_names``); ``device``:
    where torch generates images and fits (``auto``: a CUDA GPU when there is one).
    """
    from datafree.toolchain.compress import compress

    recipe = recipe if recipe is not None else Recipe()
    with tempfile.TemporaryDirectory(prefix="datafree-pipeline-") as tmp:
        exported = export(module, example_inputs, Path(tmp) / "exported.onnx", **export_kwargs)
        result = compress(exported, recipe, progress=progress, device=device)
        if path is None:
            # weights may still be read lazily from the temporary export: load them now
            return ir.external_data.load_to_model(result.model)
        return save(result.model, path, external_data=external_data)
