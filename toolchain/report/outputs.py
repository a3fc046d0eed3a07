"""Output SQNR of a compressed model against its reference, layer by layer and end to end.

Layers are matched by node name (the compressor keeps the names of Conv/Gemm
nodes; Q/DQ nodes are inserted around them, BN may be folded).  Each layer is
compared at its *output*: the value after any BatchNormalization, activation
and Quantize/DequantizeLinear that directly follow it, so a folded and an
unfolded BN land on the same tensor.  Pruned layers have fewer channels and are
not comparable there; they are listed, and the end-to-end output always is.
"""

from __future__ import annotations

import numpy as np
import onnx_ir as ir

from datafree.toolchain import graph
from datafree.toolchain.errors import UserError
from datafree.toolchain.quant import sqnr_db

from .probes import input_signature, run_model

_FOLLOW = {"BatchNormalization", "QuantizeLinear", "DequantizeLinear"} | graph.UNARY_ACTS


def check_same_inputs(model: ir.Model, reference: ir.Model) -> None:
    a = [(d, s) for _, d, s in input_signature(model)]
    b = [(d, s) for _, d, s in input_signature(reference)]
    if len(a) != len(b) or any(da != db or len(sa) != len(sb) or
                               any(x is not None and y is not None and x != y for x, y in zip(sa, sb))
                               for (da, sa), (db, sb) in zip(a, b)):
        raise UserError(f"the reference's inputs {_fmt(input_signature(reference))} differ from the model's "
                        f"{_fmt(input_signature(model))}: it is not the model this one was made from")


def _fmt(sig) -> str:
    return ", ".join(f"{n}:{d.lower()}[{','.join('?' if x is None else str(x) for x in s)}]" for n, d, s in sig)


def layer_output(node: ir.Node) -> ir.Value:
    """The tensor after the BN / activation / Q-DQ chain that directly follows ``node``."""
    value = node.outputs[0]
    while True:
        nxt = graph.single_consumer(value)
        if nxt is None or nxt.op_type not in _FOLLOW or nxt.inputs[0] is not value:
            return value
        value = nxt.outputs[0]


def _layer_nodes(model: ir.Model) -> dict[str, ir.Node]:
    return {n.name: n for n in model.graph if n.op_type in graph.LAYER_OPS and n.name}


def output_sqnr(model: ir.Model, reference: ir.Model, x: np.ndarray) -> dict:
    """Per-layer and end-to-end output SQNR on probes ``x`` (the report's ``output_sqnr`` section)."""
    check_same_inputs(model, reference)
    ours, theirs = _layer_nodes(model), _layer_nodes(reference)
    common = [name for name in theirs if name in ours]
    pairs = {name: (layer_output(ours[name]).name, layer_output(theirs[name]).name) for name in common}
    got = run_model(model, x, [a for a, _ in pairs.values()])
    want = run_model(reference, x, [b for _, b in pairs.values()])
    rows, skipped = [], {}
    for name in theirs:
        if name not in ours:
            skipped[name] = "not in the compressed model (removed or renamed)"
            continue
        a, b = got[pairs[name][0]], want[pairs[name][1]]
        if a.shape != b.shape:
            ch_a = a.shape[1] if a.ndim > 1 else a.shape
            ch_b = b.shape[1] if b.ndim > 1 else b.shape
            skipped[name] = f"pruned: {ch_a} of {ch_b} channels, not comparable channel by channel"
            continue
        rows.append({"layer": name, "channels": int(b.shape[1]) if b.ndim > 1 else 1,
                     "compared_at": pairs[name][1], "sqnr_db": _finite(sqnr_db(b, a))})
    out_a, out_b = got[model.graph.outputs[0].name], want[reference.graph.outputs[0].name]
    end = {"output": reference.graph.outputs[0].name, "sqnr_db": None, "top1_agreement": None}
    if out_a.shape == out_b.shape:
        end["sqnr_db"] = _finite(sqnr_db(out_b, out_a))
        if out_b.ndim == 2 and out_b.shape[1] > 1:
            end["top1_agreement"] = float(np.mean(out_a.argmax(1) == out_b.argmax(1)))
    return {"compared_at": "each layer's output after its BN, activation and Q/DQ; pruned layers "
                           "(fewer channels) only through the end-to-end output",
            "layers": rows, "skipped": skipped, "end_to_end": end}


def _finite(v: float) -> float | None:
    return None if not np.isfinite(v) else round(float(v), 4)
