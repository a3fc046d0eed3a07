"""The measure pass: float and compressed model timed in a plain onnxruntime session
(:mod:`..passes.speed`)."""

from __future__ import annotations

import onnx_ir as ir

from ..compress import Context


def measure_speed(ctx: Context) -> None:
    """Float and compressed model timed in a plain onnxruntime session (passes/speed.py):
    the ratios go into the headline and ``summary.speed``; why not, where they cannot be had."""
    if not ctx.measure:
        return
    if ctx.float_bytes is None or len(ctx.model.graph.inputs) != 1:
        reason = ("the model's input is not one float tensor of known size" if ctx.spec is None
                  or len(ctx.model.graph.inputs) != 1 else f"over {MEASURE_BYTES >> 20} MiB of weights")
        ctx.summary.notes.append(f"speed not measured: {reason}")
        return
    from ..passes import speed

    ctx.progress("measure", 0, 1)
    value = ctx.model.graph.inputs[0]
    batch = value.shape[0] if value.shape is not None and len(value.shape) else None
    try:
        result = speed.measure(ctx.float_bytes, ir.to_proto(ctx.model).SerializeToString(), ctx.spec.shape,
                               fixed_batch=batch if isinstance(batch, int) else None)
    except Exception as exc:  # noqa: BLE001 -- onnxruntime refusing to time a model is a note, not a failure
        ctx.summary.notes.append(f"speed not measured: onnxruntime could not run the models here "
                                 f"({str(exc).strip().splitlines()[0][:160]})")
    else:
        ctx.summary.speed = result.to_dict()
        ctx.summary.headline.append(result.line())
        slower = _slower_note(result.ratios(), ctx.recipe)
        if slower:
            ctx.summary.headline.append(slower)
    ctx.float_bytes = None
    ctx.progress("measure", 1, 1)


MEASURE_BYTES = 1 << 30   # larger models are not timed: two sessions of them would not fit many machines


def _slower_note(ratios: dict[int, float], recipe) -> str:
    """What to do when the compressed model runs slower than the float one at every batch
    measured: with activations quantized, onnxruntime's integer kernels do not pay on this
    machine for this model (depthwise-heavy networks on x86, layout changes around the
    layers it cannot fuse); weight-only quantization runs at the float model's speed and
    keeps the size, pruning saves time."""
    if not ratios or min(ratios.values()) <= 1.05:
        return ""
    worst = max(ratios.values())
    if recipe.abits is not None:
        return (f"slower than the float model here (up to {worst:.2f}x): onnxruntime's integer kernels do not pay "
                "for this model on this machine; weight-only quantization (no --abits) keeps the size at the float "
                "model's speed, pruning (--prune, --latency) saves time")
    return f"slower than the float model here (up to {worst:.2f}x)"
