"""The closed form, without images: weights rounded to nearest with BN-Gaussian bias
correction (and UDFC's s̃ where asked); activation ranges from BN statistics where known,
else from probe inputs."""

from __future__ import annotations

import numpy as np
import onnx_ir as ir

from .. import graph as G
from ..groups import PruneGroup
from ..progress import ProgressFn
from ..recipe import Recipe
from ..stats import mse_range, output_mean, output_samples
from . import prune, qdq, quantize


def _input_producers(layers: list[G.Layer]) -> dict[int, G.Layer]:
    return {id(l.output): l for l in layers}


def quantize_closed_form(layers: list[G.Layer], recipe: Recipe, moments: dict, progress: ProgressFn,
                         groups: list[PruneGroup] = ()):
    """Round to nearest; bias correction and (if asked) UDFC's s̃ folded into the next layers."""
    producers = _input_producers(layers)
    by_producer = {g.name: g for g in groups if not g.carried}
    weights = {}
    for i, layer in enumerate(layers):
        progress("quantize", i, len(layers))
        eff = recipe.for_layer(layer.name, layer.kind)
        if eff.skip or eff.wbits is None:
            continue
        w0 = layer.w_oc()
        bits, grid = quantize.kernel_grid(eff, recipe, layer.kind)
        weights[layer.name] = quantize.quantize_layer(layer, bits, grid.clip)
        src = producers.get(id(layer.node.inputs[0]))
        if recipe.bias_correction and src is not None and moments.get(src.name) is not None:
            mean = output_mean(src, moments[src.name])
            if mean is not None and len(mean) == layer.in_channels:
                quantize.bias_correction(layer, w0, mean)
        group = by_producer.get(layer.name)
        if recipe.scale_compensation and group is not None:
            s_tilde = quantize.scale_compensation(w0, layer.w_oc(), layer.bias_array().astype(np.float64))
            for c in group.consumers:   # consumers come later in the order: scaled before they are quantized
                w = prune.consumer_in_weight(c)
                prune.set_consumer_in_weight(c, w * s_tilde.reshape((1, -1) + (1,) * (w.ndim - 2)))
    progress("quantize", len(layers), len(layers))
    return weights


def activation_ranges_closed_form(model: ir.Model, layers: list[G.Layer], recipe: Recipe, moments: dict,
                                  probe_images: np.ndarray | None = None):
    """Ranges of quantized layers' inputs: BN Gaussians where known, probe inputs elsewhere
    (``probe_images`` for an image input, seeded random values otherwise)."""
    wanted = qdq.activation_plan(layers, recipe)
    if not wanted:
        return {}
    ranges: dict[str, tuple[float, float]] = {}
    unknown = []
    by_name = {l.output.name: l for l in layers}
    for name, bits in wanted.items():
        src = by_name.get(name)
        if src is not None and moments.get(src.name) is not None:
            samples = output_samples(src, moments[src.name])
            if samples is not None:
                ranges[name] = mse_range(samples, bits)
                continue
        unknown.append(name)
    if unknown:
        captured = probe_activations(model, unknown, n=32, images=probe_images)
        for name in unknown:
            ranges[name] = mse_range(captured[name], wanted[name])
    out = {}
    from ..quant import act_qparams

    for name, (lo, hi) in ranges.items():
        scale, zp, signed = act_qparams(lo, hi, wanted[name])
        out[name] = qdq.ActQuant(bits=wanted[name], scale=scale, zero_point=zp, signed=signed)
    return out


def probe_activations(model: ir.Model, names: list[str], n: int = 32, seed: int = 0,
                      images: np.ndarray | None = None) -> dict[str, np.ndarray]:
    """Values of ``names`` on ``images`` (for the first input), else on seeded standard-normal
    probe inputs (onnxruntime)."""
    import onnxruntime as ort

    proto = ir.serde.serialize_model(model)
    existing = {o.name for o in proto.graph.output}
    import onnx

    for name in names:
        if name not in existing:
            proto.graph.output.append(onnx.helper.make_empty_tensor_value_info(name))
    opts = ort.SessionOptions()
    opts.log_severity_level = 3
    sess = ort.InferenceSession(proto.SerializeToString(), opts, providers=["CPUExecutionProvider"])
    inputs = sess.get_inputs()
    fixed = {d[0] for d in (i.shape for i in inputs) if d and isinstance(d[0], int)}
    batch = min(fixed) if fixed else n            # a fixed batch axis: as many runs as it takes
    rng = np.random.default_rng(seed)
    if images is not None:
        runs = [sess.run(names, {inputs[0].name: images[k:k + batch]}) for k in range(0, len(images), batch)
                if len(images[k:k + batch]) == batch or not fixed]
    else:
        runs = [sess.run(names, {i.name: _probe(i, batch, n, model, rng) for i in inputs})
                for _ in range(max(1, -(-n // batch)))]
    return {name: np.concatenate([r[k] for r in runs]) if runs[0][k].ndim else runs[0][k]
            for k, name in enumerate(names)}


def _probe(inp, batch: int, size: int, model: ir.Model, rng: np.random.Generator) -> np.ndarray:
    """Seeded probe values for one input (``batch`` of them, ``size`` on symbolic axes):
    standard normal for floats; for integers (token ids), ids valid for the table the
    input indexes (``Gather``), else zeros."""
    shape = [batch, *(d if isinstance(d, int) else size for d in inp.shape[1:])] if inp.shape else []
    kind = inp.type[len("tensor("):-1]
    if kind in ("float", "double"):
        return rng.standard_normal(shape).astype(np.float32 if kind == "float" else np.float64)
    value = next((v for v in model.graph.inputs if v.name == inp.name), None)
    high = 1
    for use in (value.uses() if value is not None else ()):
        if use.node.op_type == "Gather" and use.idx == 1:
            table = G.const_array(use.node.inputs[0])
            if table is not None:
                high = max(high, int(table.shape[int(G.attr(use.node, "axis", 0))]))
    dtype = {"int64": np.int64, "int32": np.int32, "bool": np.bool_}.get(kind, np.int64)
    return rng.integers(0, high, size=shape).astype(dtype)
