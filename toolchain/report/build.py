"""build_report(): every number of ``datafree report`` in one JSON-ready document.

    from datafree.toolchain.report import build_report, write_report
    rep = build_report("model.onnx", target="cortex-a55", bits=(8, 6, 4))
    write_report(rep, "report/")        # report.md, report.json, plots (PNG + SVG)

Without a reference the report answers "what would each choice cost?" (weight
SQNR of quantization against equal-size pruning, cost and latency per uniform
bit-width); with one it answers "what did it cost?" (output SQNR on probes, cost
as stored).  The document's layout is versioned by ``SCHEMA``.
"""

from __future__ import annotations

import json
import os
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import onnx_ir as ir

from datafree.ops import domain
from datafree.toolchain import ingest
from datafree.toolchain.errors import UserError
from datafree.toolchain.progress import ProgressFn, silent
from datafree.toolchain.recipe import METADATA_KEY as RECIPE_KEY

from . import bounds as bounds_mod
from . import cost, outputs, probes as probes_mod, sqnr, targets

SCHEMA = "datafree.report/1"


@dataclass
class Report:
    doc: dict
    timings: dict[str, float] = field(default_factory=dict)

    def to_json(self) -> str:
        return json.dumps(self.doc, indent=2, sort_keys=False, allow_nan=False)


def _load(source, what: str) -> tuple[ir.Model, str]:
    if isinstance(source, ir.Model):
        return ingest.load(source), f"<{what}>"
    return ingest.load(source), str(source)


def parse_bits(text: str | tuple | list) -> tuple[int, ...]:
    """``"8,6,4"`` -> (8, 6, 4); every entry an integer in 2..8."""
    items = [t for t in (text.split(",") if isinstance(text, str) else text)]
    try:
        bits = tuple(int(str(t).strip()) for t in items if str(t).strip())
    except ValueError:
        raise UserError(f"--bits must be integers separated by commas, got {text!r}") from None
    if not bits or any(not 2 <= b <= 8 for b in bits):
        raise UserError(f"--bits must list bit-widths in 2..8, got {text!r}")
    return tuple(dict.fromkeys(bits))


def build_report(model, *, reference=None, target: str | os.PathLike = "cortex-a55",
                 bits=(8, 6, 4), abits: int = 8, images: str | os.PathLike | None = None,
                 n_probes: int = 16, synth_steps: int = 50, seed: int = 0, measure: bool = False,
                 bounds: bool = False, bounds_budget: float = 60.0, bounds_max_n: int = 64,
                 progress: ProgressFn = silent) -> Report:
    """Analyse ``model`` (and what it cost against ``reference``) for ``target``."""
    bits = parse_bits(bits)
    if not 2 <= abits <= 16:
        raise UserError(f"abits must be in 2..16, got {abits}")
    if n_probes < 1:
        raise UserError(f"n_probes must be at least 1, got {n_probes}")
    t = {}
    clock = time.perf_counter()
    prof = targets.load_target(target)
    m, m_path = _load(model, "model")
    ref, ref_path = (None, None) if reference is None else _load(reference, "reference")
    warnings = []
    if ref is not None:
        outputs.check_same_inputs(m, ref)
        warnings += _unrelated(m, ref)
    float_model = ref if ref is not None else m
    t["load"] = time.perf_counter() - clock

    clock = time.perf_counter()
    costs = cost.layer_costs(m)
    if not costs:
        raise UserError(f"{m_path}: no Conv/Gemm/MatMul layers with constant weights to report on")
    est = targets.estimate(prof, costs)
    choices, per_layer_choices = _choices(costs, prof, bits, abits, None if ref is None else cost.layer_costs(ref))
    t["cost"] = time.perf_counter() - clock

    clock = time.perf_counter()
    float_layers = cost.compute_layers(float_model)
    progress("weight SQNR", 0, len(float_layers))
    wrows = []
    for i, layer in enumerate(float_layers):
        wrows += sqnr.weight_rows([layer], bits)
        progress("weight SQNR", i + 1, len(float_layers))
    t["weight_sqnr"] = time.perf_counter() - clock

    doc = _document(m, m_path, ref, ref_path, prof, costs, est, choices, per_layer_choices, wrows, bits,
                    float_layers, t, warnings)
    _probed_sections(doc, t, m, ref, float_model, costs, bits, images=images, n_probes=n_probes,
                     synth_steps=synth_steps, seed=seed, bounds=bounds, bounds_budget=bounds_budget,
                     bounds_max_n=bounds_max_n, progress=progress)
    if measure:
        clock = time.perf_counter()
        progress("measure", 0, 1)
        doc["measured"] = _measured(m, ref, prof, est, costs)
        progress("measure", 1, 1)
        t["measure"] = time.perf_counter() - clock
    return Report(_finite_only(doc), t)


def _measured(m, ref, prof, est, costs) -> dict:
    """Time in a plain onnxruntime session at batch 1 and a large batch (as a ratio to the
    reference, timed in the same run, when there is one); on ``--target host`` also the
    estimate checked against onnxruntime's per-layer profile."""
    import platform

    import onnxruntime as ort

    from ..passes import speed
    from .host import check, node_times

    shape = probes_mod.probe_shape(m, 1)[1:]
    dims = probes_mod.input_signature(m)[0][2]
    fixed = dims[0] if dims and isinstance(dims[0], int) and dims[0] > 1 else None
    proto = ir.serde.serialize_model(m)
    models = ([ir.serde.serialize_model(ref).SerializeToString()] if ref is not None else []) + \
        [proto.SerializeToString()]
    got = speed.timings(models, shape, fixed_batch=fixed)
    out = {"machine": f"{platform.machine()} ({os.cpu_count()} cores), onnxruntime {ort.__version__} CPU, "
                      f"plain session",
           "batches": {str(b): {"ms": t[-1], **({"reference_ms": t[0], "ratio": t[-1] / t[0]} if ref is not None else {})}
                       for b, t in got.items()}}
    if prof.name == "host":
        out["estimate_check"] = check(est, node_times(proto, [c.name for c in costs], shape))
    return out


def _document(m, m_path, ref, ref_path, prof, costs, est, choices, per_layer_choices, wrows, bits, float_layers,
              t: dict, warnings: list) -> dict:
    """The report's sections that need no probe inputs; the others start empty (None)."""
    return {
        "schema": SCHEMA,
        "mode": "after" if ref is not None else "before",
        "model": _describe(m, m_path),
        "reference": None if ref is None else _describe(ref, ref_path),
        "target": prof.to_dict(),
        "assumptions": _ASSUMPTIONS,
        "probes": None,
        "layers": [_layer_row(c, e, per_layer_choices.get(c.name, {})) for c, e in zip(costs, est.layers)],
        "totals": {**cost.totals(costs), "latency_s": est.latency_s, "energy_j": est.energy_j,
                   "fp32_bops": sum(cost.bops(c.macs, 32, 32) for c in costs),
                   "not_native": [e.name for e in est.not_native]},
        "choices": choices,
        "weight_sqnr": [{**asdict(r), "winner": r.winner} for r in wrows],
        "weight_sqnr_summary": _sqnr_summary(wrows, bits),
        "weight_sqnr_actual": None if ref is None else _actual_weight_sqnr(m, float_layers),
        "output_sqnr": None,
        "dynamic": None,
        "measured": None,
        "bounds": None,
        "timings": t,
        "warnings": warnings,
    }


def _probed_sections(doc: dict, t: dict, m, ref, float_model, costs, bits, *, images, n_probes: int,
                     synth_steps: int, seed: int, bounds: bool, bounds_budget: float, bounds_max_n: int,
                     progress: ProgressFn) -> None:
    """The sections that run the models on probe inputs (real images if given, else
    synthetic): output SQNR against the reference, a dynamic model's bits, the bounds."""
    if not (ref is not None or bounds or _is_dynamic(m)):
        return
    clock = time.perf_counter()
    pr = probes_mod.make_probes(float_model, n_probes, images=images, steps=synth_steps, seed=seed,
                                progress=progress)
    doc["probes"] = {"source": pr.source, "count": int(len(pr.x))}
    t["probes"] = time.perf_counter() - clock
    if ref is not None:
        clock = time.perf_counter()
        progress("output SQNR", 0, 1)
        doc["output_sqnr"] = outputs.output_sqnr(m, ref, pr.x)
        progress("output SQNR", 1, 1)
        t["output_sqnr"] = time.perf_counter() - clock
    if _is_dynamic(m):
        doc["dynamic"] = _dynamic(m, pr.x)
    if bounds:
        clock = time.perf_counter()
        doc["bounds"] = _bounds(float_model, costs, bits, pr, bounds_budget, bounds_max_n, ref is not None,
                                progress, seed)
        t["bounds"] = time.perf_counter() - clock


def _finite_only(x):
    """The document with every inf/nan (an exact SQNR, an empty mean) as null: JSON has neither."""
    if isinstance(x, dict):
        return {k: _finite_only(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [_finite_only(v) for v in x]
    if isinstance(x, (float, np.floating)):
        return float(x) if np.isfinite(x) else None
    if isinstance(x, np.integer):
        return int(x)
    return x


_ASSUMPTIONS = [
    "BOPs = MACs x weight bits x activation bits; float layers count 32 x 32.",
    "Latency per layer = max(MACs / peak MAC rate at the precision the target runs it at, "
    "bytes moved / bandwidth); layers run one after another.",
    "Bytes moved = weights at their stored precision, plus input and output activations "
    "when those do not fit in on-chip memory.",
    "Energy = MACs x energy per MAC + bytes moved x energy per byte.",
    "Weight SQNR compares per-channel symmetric quantization at b bits with unstructured "
    "magnitude pruning at the same size against FP16 (sparsity 1 - b/16).",
]


def _describe(m: ir.Model, path: str) -> dict:
    recipe = m.metadata_props.get(RECIPE_KEY)
    return {"path": path, "name": Path(path).name,
            "inputs": [{"name": n, "dtype": d, "shape": list(s)} for n, d, s in probes_mod.input_signature(m)],
            "opset": ingest.opset_of(m), "quantized": ingest.is_quantized(m),
            "recipe": json.loads(recipe) if recipe else None}


def _layer_row(c: cost.LayerCost, e: targets.LayerEstimate, choices: dict) -> dict:
    return {"name": c.name, "op": c.op, "kind": c.kind, "macs": c.macs, "params": c.params,
            "weight_bytes": c.weight_bytes, "wbits": c.wbits, "abits": c.abits, "bits_from": c.bits_from,
            "precision": c.precision, "bops": c.bops, "runs_as": e.runs_as, "native": e.native,
            "bound": e.bound, "latency_s": e.latency_s, "energy_j": e.energy_j, "choices": choices}


def _choices(costs, prof, bits, abits, ref_costs) -> tuple[list[dict], dict[str, dict]]:
    """Cost on the target, per model and per layer: of each uniform choice (FP32 and
    W{b}A{abits}) before compressing; of the reference and the model as stored after."""
    if ref_costs is not None:
        options = [("reference", ref_costs), ("compressed", costs)]
    else:
        base = [c.with_bits(32, 32) for c in costs]
        options = [("FP32", base)] + [(f"W{b}A{abits}", cost.assume_bits(base, b, abits)) for b in bits]
    out, per_layer = [], {}
    for label, cs in options:
        e = targets.estimate(prof, cs)
        tot = cost.totals(cs)
        out.append({"choice": label, "bops": tot["bops"], "weight_bytes": tot["weight_bytes"],
                    "latency_s": e.latency_s, "energy_j": e.energy_j,
                    "not_native": {l.name: f"{l.requested} runs as {l.runs_as}" for l in e.not_native}})
        for c, le in zip(cs, e.layers):
            per_layer.setdefault(c.name, {})[label] = {"bops": c.bops, "latency_s": le.latency_s,
                                                       "runs_as": le.runs_as, "native": le.native}
    return out, per_layer


def _unrelated(m: ir.Model, ref: ir.Model) -> list[str]:
    """A warning when the reference shares no layer with the model (by name): the
    per-layer comparisons are then empty, and it may not be the model this one was made from."""
    ours = {l.name for l in cost.compute_layers(m)}
    theirs = {l.name for l in cost.compute_layers(ref)}
    if not theirs or ours & theirs:
        return []
    return [f"the reference shares no layer name with the model ({len(theirs)} layers against {len(ours)}): "
            "if it is not the model this one was compressed from, the output SQNR compares unrelated "
            "models; per-layer weight SQNR is left empty"]


def _actual_weight_sqnr(m: ir.Model, ref_layers) -> dict[str, float | None]:
    """SQNR of the compressed model's (dequantized) weights against the reference's, same-shape layers."""
    ours = {l.name: l for l in cost.compute_layers(m)}
    out = {}
    for r in ref_layers:
        l = ours.get(r.name)
        if l is None or l.w_oc().shape != r.w_oc().shape:
            continue
        w = r.w_oc().astype(np.float64)
        bn = r.bn_params()
        if bn is not None and l.bn is None:          # the compressor folded the BN into the weights
            w = w * (bn["gamma"] / np.sqrt(bn["var"] + bn["eps"])).reshape((-1,) + (1,) * (w.ndim - 1))
        out[r.name] = _f(sqnr.sqnr_db(w, l.w_oc()))
    return out


def _sqnr_summary(rows, bits) -> dict:
    out = {}
    for b in bits:
        rs = [r for r in rows if r.bits == b]
        out[str(b)] = {"layers": len(rs), "prune_wins": sum(r.winner == "prune" for r in rs),
                       "sparsity": sqnr.equal_compression_sparsity(b),
                       "mean_quant_db": float(np.mean([r.quant_db for r in rs])) if rs else None,
                       "mean_prune_db": float(np.mean([r.prune_db for r in rs])) if rs else None}
    return out


def _is_dynamic(m: ir.Model) -> bool:
    return any(n.domain == domain.DOMAIN for n in m.graph)


def _dynamic(m: ir.Model, x: np.ndarray) -> dict:
    try:
        d = cost.dynamic_costs(m, x)
    except UserError as exc:
        return {"skipped": f"could not run the dynamic model: {exc}"}
    return None if d is None else asdict(d)


def _bounds(float_model, costs, bits, pr, budget, max_n, after, progress, seed) -> dict:
    layers = cost.compute_layers(float_model)
    if after:
        stored = {c.name: c.wbits for c in costs if c.wbits < cost.FLOAT_BITS}
        want = {l.name: stored[l.name] for l in layers if l.name in stored}
    else:
        want = {l.name: min(bits) for l in layers}
    small = [l for l in layers if l.name in want and l.w_oc()[0].size <= max_n]
    run = probes_mod.run_model(float_model, pr.x, [l.node.inputs[0].name for l in small]) if small else {}
    run.update({v.name: pr.x for v in float_model.graph.inputs[:1]})
    inputs = {l.name: run[l.node.inputs[0].name] for l in small if l.node.inputs[0].name in run}
    by_output = {id(l.output): l for l in layers}
    moments = {l.name: by_output.get(id(l.node.inputs[0])) for l in layers}
    done, skipped = bounds_mod.layer_bounds(layers, inputs, want, budget_s=budget, max_n=max_n,
                                            moments=moments, progress=progress, seed=seed)
    rows = []
    for lb in done:
        rows.append({"layer": lb.layer, "bits": lb.bits, "n": lb.n, "channels": len(lb.channels),
                     "out_channels": lb.out_channels, "gram": lb.gram, "rtn_db": _f(lb.rtn_db),
                     "best_db": _f(lb.best_db), "limit_db": _f(lb.limit_db), "seconds": lb.seconds,
                     "samples": lb.samples, "note": lb.note,
                     "prune": lb.prune, "prune_note": lb.prune_note})
    return {"budget_s": budget, "max_n": max_n, "layers": rows, "skipped": skipped}


def _f(v: float) -> float | None:
    return None if not np.isfinite(v) else float(v)
