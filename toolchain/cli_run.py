"""``datafree run``: predictions (and, for dynamic models, the bits per image) over an image set."""

from __future__ import annotations

import json
from pathlib import Path

import click
import numpy as np


@click.command()
@click.argument("model", type=click.Path(dir_okay=False))
@click.option("--images", "images", required=True, type=click.Path(),
              help=".npz (images uint8 NHWC [+ mean/std, labels] or x float NCHW) or a folder of PNG/JPEG.")
@click.option("--batch", default=64, show_default=True, type=click.IntRange(min=1), help="Images per run.")
@click.option("--threads", default=None, type=click.IntRange(min=1), help="onnxruntime intra-op threads.")
@click.option("--no-kernels", is_flag=True, help="Run dynamic models as a stock onnxruntime does: ONNX function bodies only.")
@click.option("--json", "as_json", is_flag=True, help="Print one JSON object instead of text.")
def run(model: str, images: str, batch: int, threads: int | None, no_kernels: bool, as_json: bool) -> None:
    """Run MODEL over an image set: prediction per image, accuracy when labels are given,
    and the bit-widths a dynamic model chose for each image."""
    from datafree.ops.domain import config_label
    from datafree.runtime.infer import run_file

    result = run_file(model, images, batch=batch, threads=threads, use_kernels=not no_kernels)
    if as_json:
        click.echo(json.dumps(result.to_json()))
        return
    names = result.names or [str(i) for i in range(len(result.predictions))]
    for i, name in enumerate(names):
        line = f"{name}\tpred {int(result.predictions[i])}"
        if result.labels is not None:
            line += f"\tlabel {int(result.labels[i])}"
        if result.bits is not None:
            line += f"\tbits {config_label(result.bits[i], result.first)}\tavg {result.avg_bits[i]:.2f}"
        click.echo(line)
    summary = [f"{len(result.predictions)} images"]
    if result.accuracy is not None:
        summary.append(f"accuracy {100 * result.accuracy:.2f} %")
    if result.bits is not None:
        summary.append(f"mean bits {float(np.mean(result.avg_bits)):.2f}")
        summary.append("configurations " + ", ".join(f"{k}: {v}" for k, v in result.bits_histogram().items()))
    click.echo(" | ".join(summary))


@click.command()
@click.argument("model", type=click.Path(dir_okay=False))
@click.option("--images", "images", required=True, type=click.Path(),
              help="Inputs the model will see (labels, if any, are not used): .npz or a folder of PNG/JPEG.")
@click.option("--target-bits", required=True, type=float, help="Average bits these images should cost.")
@click.option("-o", "--output", required=True, type=click.Path(dir_okay=False, path_type=Path),
              help="Where to write the retargeted model (the input file is left as it is).")
@click.option("--json", "as_json", is_flag=True, help="Print one JSON object instead of text.")
def retarget(model: str, images: str, target_bits: float, output: Path, as_json: bool) -> None:
    """Re-price the bit selector of a dynamic MODEL so that the given inputs cost
    --target-bits on average: no labels, no refitting; only the selector's price moves."""
    import onnx_ir as ir

    from datafree.exporters.writer import save
    from datafree.runtime.retarget import retarget_file

    from .cli_compress import _check_paths

    _check_paths(model, output, dry_run=False)
    held, info = retarget_file(model, images, target_bits)
    save(ir.serde.deserialize_model(held), output)
    if as_json:
        click.echo(json.dumps(info | {"output": str(output)}))
        return
    click.echo(f"{info['images']} images: mean bits {info['bits_before']:.2f} -> {info['bits_after']:.2f} "
               f"(target {info['target_bits']:g}); wrote {output}")
