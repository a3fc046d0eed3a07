"""``datafree compress`` and ``datafree convert-and-compress``: parse, call, print."""

from __future__ import annotations

import json
from pathlib import Path

import click

from .errors import UserError
from .recipe import BUDGETS, CRITERIA, FLOAT, SCOPES, SYNTHETIC_ROUTES, Recipe

_RANGES = ("0..1", "0..255", "-1..1", "imagenet", "caffe")   # inputs.CONVENTIONS, without importing numpy here

# CLI option name -> recipe field
_FIELDS = {
    "prune": "prune", "latency": "latency", "prune_scope": "prune_scope", "criterion": "criterion",
    "joint_steps": "joint_steps", "augment": "augment", "fit_budget": "fit_budget", "time_budget": "time_budget",
    "channel_multiple": "channel_multiple", "wbits": "wbits", "abits": "abits", "clip": "clip",
    "depthwise_wbits": "depthwise_wbits",
    "compensation": "compensation", "bias_correction": "bias_correction",
    "scale_compensation": "scale_compensation", "synthetic": "synthetic",
    "synthetic_steps": "synthetic_steps", "seed": "seed", "int4": "int4",
    "integer_kernels": "integer_kernels", "reduce_range": "reduce_range", "input_range": "input_range",
    "synthetic_route": "synthetic_route", "max_activation_loss": "max_activation_loss",
}


def _bits(ctx, param, value):
    if value is None:
        return None
    if str(value).lower() in (FLOAT, "none", "fp32", "32"):
        return FLOAT
    try:
        return int(value)
    except ValueError:
        raise click.BadParameter(f"expected 2..8 or 'float', got {value!r}") from None


def _multiple(ctx, param, value):
    if str(value).lower() == "auto":
        return "auto"
    try:
        return int(value)
    except ValueError:
        raise click.BadParameter(f"expected 'auto' or a positive integer, got {value!r}") from None


def _loss_db(ctx, param, value):
    if value is None or str(value).lower() in ("off", "none"):
        return None
    try:
        db = float(value)
    except ValueError:
        raise click.BadParameter(f"expected a number of dB or 'off', got {value!r}") from None
    if not db >= 0:
        raise click.BadParameter(f"expected a non-negative number of dB or 'off', got {value!r}")
    return db


def _what_options() -> list:
    """What to do to the model."""
    return [
        click.argument("model", type=str),
        click.option("-o", "--output", type=click.Path(dir_okay=False, path_type=Path),
                     help="Where to write the compressed model."),
        click.option("--recipe", "recipe_file", type=click.Path(path_type=Path),
                     help="Recipe file (TOML or JSON); options given on the command line override it."),
        click.option("--prune", type=float, default=0.0, show_default=True,
                     help="Ratio of each prunable layer's channels to remove, in [0, 1) (global scope: as "
                          "many MACs, taken where they cost least)."),
        click.option("--latency", type=float, default=None,
                     help="Instead of --prune: keep at most this fraction of the float model's time, measured "
                          "here in a plain onnxruntime session (batch 1 and a large batch); the smallest prune "
                          "ratio that does is chosen."),
        click.option("--prune-scope", type=click.Choice(list(SCOPES)), default=Recipe.prune_scope, show_default=True,
                     help="global: remove the MACs --prune would remove from every layer, where they cost least; "
                          "layer: the same ratio in every layer (auto: global when channels are chosen by output "
                          "error, else layer)."),
        click.option("--criterion", type=click.Choice(list(CRITERIA)), default=Recipe.criterion,
                     show_default=True,
                     help="Channel importance; output = error it causes on synthetic images (auto: output "
                          "when synthetic images are made, else l1)."),
        click.option("--channel-multiple", callback=_multiple, default="auto", show_default=True,
                     help="Keep pruned channel counts at a multiple of this; auto: 8 in layers of 128 channels "
                          "and more, else 4 (2 or 1 under 32), the blocks CPU convolution kernels run in. "
                          "1: any count."),
        click.option("--wbits", callback=_bits, default="8", show_default=True, help="Weight bits (2..8 or 'float')."),
        click.option("--depthwise-wbits", callback=_bits, default=str(Recipe.depthwise_wbits), show_default=True,
                     help="At least these bits for depthwise weights when --wbits is lower ('float': as --wbits)."),
        click.option("--abits", callback=_bits, default=None, help="Activation bits (2..8); default: float."),
        click.option("--clip", type=click.Choice(["max", "mse"]), default="max", show_default=True),
        click.option("--compensation/--no-compensation", default=True, show_default=True,
                     help="Rebuild pruned channels from the kept ones in the next layer."),
        click.option("--bias-correction/--no-bias-correction", default=True, show_default=True),
        click.option("--scale-compensation/--no-scale-compensation", default=False, show_default=True),
        click.option("--synthetic", type=int, default=Recipe.synthetic, show_default=True,
                     help="Synthetic images generated from the model to fit on (0: closed form only)."),
        click.option("--synthetic-steps", type=int, default=Recipe.synthetic_steps, show_default=True),
        click.option("--synthetic-route", type=click.Choice(list(SYNTHETIC_ROUTES)), default=Recipe.synthetic_route,
                     show_default=True,
                     help="How synthetic images are made: bn-statistics (match the model's BatchNormalization "
                          "statistics), output-only (optimised toward its classes), natural (procedural "
                          "photographs in the input's range); auto: the first the model allows."),
        click.option("--joint-steps", type=int, default=Recipe.joint_steps, show_default=True,
                     help="Steps fitting each pruned layer jointly with its consumers (0: least squares only)."),
        click.option("--fit-budget", type=click.Choice(list(BUDGETS)), default=Recipe.fit_budget, show_default=True,
                     help="auto: for models costlier per image than a CIFAR ResNet-56, fewer synthetic images "
                          "and joint steps in proportion (at least 32 and 50), so compression takes minutes, "
                          "not hours; full: --synthetic and --joint-steps as given."),
        click.option("--time-budget", default=None, metavar="DURATION",
                     help="Finish in about this long (90s, 5m, 1h): synthetic images, generator steps and joint "
                          "steps are scaled down to fit, from this model's measured cost here; the summary says "
                          "what was given up. Replaces --fit-budget's scaling."),
        click.option("--augment/--no-augment", default=Recipe.augment, show_default=True,
                     help="Also fit on mirrored and shifted copies of the synthetic images."),
        click.option("--max-activation-loss", callback=_loss_db, default=str(Recipe.max_activation_loss),
                     show_default=True,
                     help="dB of output SQNR (measured on held-out synthetic inputs) quantized activations may "
                          "cost beyond the weights' own loss, unless the result stays at 30 dB or better; the "
                          "tensors that cost most stay float. 'off': every activation quantized as asked."),
    ]


def _how_options() -> list:
    """Dynamic precision, the input, and how to run and report."""
    return [
        click.option("--seed", type=int, default=0, show_default=True),
        click.option("--device", default="auto", show_default=True, metavar="auto|cpu|cuda",
                     help="Where torch makes the synthetic images and fits (cuda:N for one GPU of several); "
                          "auto: a CUDA GPU when torch finds one, else the CPU. The same results up to float "
                          "rounding."),
        click.option("--int4/--no-int4", default=True, show_default=True,
                     help="Store <= 4-bit weights packed as INT4 (opset 21): half the size, the same "
                          "integer kernels in onnxruntime; --no-int4 stores the same values as INT8 (opset 13+)."),
        click.option("--integer-kernels/--no-integer-kernels", default=True, show_default=True,
                     help="Also quantize (8-bit) a layer's output before an activation onnxruntime has no "
                          "integer kernel with (SiLU, HardSwish, a sigmoid gate), so the layer runs on one: "
                          "faster; --no-integer-kernels: those layers run in float, one rounding fewer."),
        click.option("--reduce-range/--no-reduce-range", default=True, show_default=True,
                     help="8-bit weights of layers on integer kernels keep to +-63: x86 CPUs without VNNI "
                          "(AVX2) saturate larger u8 x s8 pair sums in onnxruntime; --no-reduce-range: the full "
                          "+-127, for ARM and VNNI targets only."),
        click.option("--dynamic", is_flag=True, help="Insert a bit selector: precision chosen per input."),
        click.option("--bits", "dyn_bits", type=str, default=None, help="Candidate bits for --dynamic, e.g. 4,6,8."),
        click.option("--target-bits", type=float, default=None, help="Average bits the selector aims at."),
        click.option("--dynamic-mode", type=click.Choice(["cascade", "upfront"]), default=None,
                     help="cascade (default): run at low bits, rerun the images the model is unsure of at "
                          "higher bits; upfront: choose the bits from the first layer's output."),
        click.option("--input-shape", type=str, default=None,
                     help="Input shape for torch inputs or symbolic sizes, e.g. 1,3,224,224 (default: the "
                          "model's, or chosen from its metadata and stride where symbolic)."),
        click.option("--input-range", type=click.Choice(list(_RANGES)), default=None,
                     help="The values the model expects: 0..1, 0..255, -1..1, imagenet (mean/std normalised) "
                          "or caffe (0..255 minus the mean); default: inferred from the model's first layers."),
        click.option("-v", "--verbose", is_flag=True, help="Also print the per-layer table."),
        click.option("--dry-run", is_flag=True, help="Plan only: predicted size and MACs, nothing written."),
        click.option("--measure/--no-measure", default=True, show_default=True,
                     help="Time the float and the compressed model in a plain onnxruntime session on this "
                          "machine (batch 1 and a large batch, a few seconds) and print the ratio."),
        click.option("--json", "as_json", is_flag=True, help="Print the summary as JSON."),
        click.option("--external-data/--no-external-data", default=None,
                     help="Write weights to <output>.data (default: only when the model is over 1.8 GB)."),
    ]


def compress_options(f):
    for opt in reversed(_what_options() + _how_options()):
        f = opt(f)
    return f


def build_recipe(ctx: click.Context, params: dict) -> Recipe:
    """The recipe file, then every option the user actually gave."""
    from click.core import ParameterSource

    base = Recipe.from_file(params["recipe_file"]).to_dict() if params["recipe_file"] else Recipe().to_dict()
    for opt, fld in _FIELDS.items():
        given = ctx.get_parameter_source(opt) not in (ParameterSource.DEFAULT, None)
        if given or not params["recipe_file"]:
            value = params[opt]
            base[fld] = None if value == FLOAT else value
    if params["dynamic"] or params["dyn_bits"] or params["target_bits"] is not None or params["dynamic_mode"]:
        dyn = base.get("dynamic") or {}
        if params["dyn_bits"]:
            try:
                dyn["bits"] = [int(b) for b in params["dyn_bits"].split(",")]
            except ValueError:
                raise UserError(f"--bits must be a comma-separated list of integers, got {params['dyn_bits']!r}") from None
        if params["target_bits"] is not None:
            dyn["target_bits"] = params["target_bits"]
        if params["dynamic_mode"]:
            dyn["mode"] = params["dynamic_mode"]
        base["dynamic"] = dyn
    return Recipe.from_dict(base)


def _check_paths(model: str, output: Path | None, dry_run: bool) -> None:
    if output is None and not dry_run:
        raise UserError("missing -o/--output (or use --dry-run)")
    if output is not None and Path(model).exists() and output.exists() and output.resolve() == Path(model).resolve():
        raise UserError(f"output {output} is the input file: choose another path")
    if output is not None and not output.parent.exists():
        raise UserError(f"output folder {output.parent} does not exist")


def run_compress(ctx: click.Context, params: dict, source) -> None:
    from datafree.exporters.writer import save

    from .compress import compress
    from .render import print_summary, progress_bar
    from .sources import parse_shape

    recipe = build_recipe(ctx, params)
    input_shape = parse_shape(params["input_shape"])
    _check_paths(params["model"], params["output"], params["dry_run"])
    if params["dry_run"]:
        recipe = recipe.replace(synthetic=0, dynamic=None)
    with progress_bar(quiet=params["as_json"]) as progress:
        result = compress(source, recipe, progress=progress, input_shape=input_shape, measure=params["measure"],
                          device=params["device"])
        extra = result.summary.dynamic
    if not params["dry_run"]:
        save(result.model, params["output"], external_data=params["external_data"])
    if params["as_json"]:
        out = result.summary.to_dict() | {"recipe": result.recipe.to_dict(), "output": str(params["output"] or "")}
        click.echo(json.dumps(out, indent=2, default=_jsonable))
    else:
        print_summary(result.summary, params["output"], dry_run=params["dry_run"], dynamic=extra,
                      verbose=params["verbose"])


def _jsonable(x):
    import numpy as np

    if isinstance(x, np.generic):
        return x.item()
    if isinstance(x, np.ndarray):
        return x.tolist()
    return str(x)


@click.command()
@compress_options
@click.pass_context
def compress(ctx: click.Context, **params) -> None:
    """Prune and quantize an ONNX MODEL without data."""
    run_compress(ctx, params, params["model"])


@click.command("convert-and-compress")
@compress_options
@click.pass_context
def convert_and_compress(ctx: click.Context, **params) -> None:
    """Like compress, but MODEL may also be a TorchScript file or package.module:factory."""
    from .sources import resolve_source

    source = resolve_source(params["model"], params["input_shape"])
    run_compress(ctx, params, source)
