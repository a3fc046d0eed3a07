"""A floor under activation quantization: what costs too much stays float.

Contract: given the compressed model before its Q/DQ are written (weights already
replaced by their dequantized values), the float model, the activation quantizers
chosen and held-out synthetic inputs, return the quantizers to keep such that
quantizing activations costs at most ``loss_db`` of output SQNR on those inputs
beyond what the weights alone cost, unless the whole result stays at ``enough_db``
or better.  The rest stay float, and the result says which and why.

Why: activation ranges come from synthetic inputs.  Where they miss (a head whose
values real inputs take far outside what synthetic ones reach, a tensor whose few
large values decide the output), an 8-bit activation grid can wreck a model whose
8-bit weights alone lose next to nothing.  Keeping such a tensor float costs that
one layer its integer kernel and keeps the output where the weights put it.

What is enough depends on what the output is read for.  Class scores (a Softmax, or one
score vector per input: ``[N, C]``) are read by their largest entry, which an error well
under the gaps between scores leaves alone: ``ENOUGH_CLASS_DB`` suffices there, and
keeping more float would cost integer kernels (speed, the reason to quantize
activations at all) for nothing a user sees.  Boxes, maps and embeddings are read by
value: ``ENOUGH_DB``.

Where the weights alone already keep less than ``TRUSTED_DB`` of the output on those
inputs, their outputs are too weak to judge by (a text detector's map on images where
it finds no text): nothing is dropped, and the note says so.

How: the output SQNR (each output's error energy over its own energy, averaged over
the outputs, in dB: detectors' box and score outputs count alike; an output made by a
Sigmoid or Softmax is scored at its logits) with weights only,
then with every activation quantized.  Below target by more than one standard error of
the mean error over the held-out inputs (a smaller shortfall is within their scatter,
and each tensor kept float costs integer kernels and the layout changes around them),
the quantized tensors are ranked by the output error each causes alone (on a few of
the inputs, one run each), and the
fewest of the worst that must stay float for the output to reach the target are found
by doubling, then bisection: about 2 log2(tensors) runs on all the held-out inputs.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import numpy as np
import onnx_ir as ir
import torch

from .. import device as dev
from ..graph import Layer
from .qdq import ActQuant

CHUNK = 16
RANK_IMAGES = 4     # held-out inputs the tensors are ranked on (one run each)
TRUSTED_DB = 15.0   # below this output SQNR with the weights alone, the held-out inputs cannot judge activations
ENOUGH_DB = 30.0    # output SQNR that needs no tensor kept float: outputs read by value (boxes, maps)
ENOUGH_CLASS_DB = 20.0   # ... class scores, read by their largest entry


@dataclass
class FloorResult:
    acts: dict[str, ActQuant]
    kept_float: list[str] = field(default_factory=list)   # layer inputs left float, most damaging first
    weights_db: float = math.inf      # output SQNR with the weights quantized, activations float
    before_db: float = math.inf       # ... and every activation quantized as fitted
    after_db: float = math.inf        # ... and only the activations kept
    target_db: float = math.inf
    class_scores: bool = False        # every output is class scores (enough: ENOUGH_CLASS_DB)
    untrusted: bool = False           # the weights alone already lose too much there to judge by

    def note(self) -> str | None:
        if self.untrusted:
            return (f"activation floor not applied: on held-out procedural photographs the weights alone keep "
                    f"only {self.weights_db:.1f} dB of the output (below {TRUSTED_DB:.0f}: outputs such inputs "
                    "barely excite, e.g. a text map with no text found), too little to judge activations by")
        if not self.kept_float:
            return None
        shown = ", ".join(repr(n) for n in self.kept_float[:4]) + (", ..." if len(self.kept_float) > 4 else "")
        return (f"{len(self.kept_float)} activation tensors stay float ({shown}): on held-out synthetic inputs "
                f"quantizing them took the output SQNR from {self.weights_db:.1f} dB (weights only) to "
                f"{self.before_db:.1f} dB; without them {self.after_db:.1f} dB (target {self.target_db:.1f}"
                f"{', class scores' if self.class_scores else ''}; "
                "max_activation_loss in a recipe, --max-activation-loss, to change it)")


def _units(layers: list[Layer], acts: dict[str, ActQuant]) -> dict[str, list[str]]:
    """Per quantized layer input: that tensor and the outputs of the layers reading it that
    are quantized only so the layer runs as an integer kernel (useless once its input is float)."""
    inputs = {l.node.inputs[0].name for l in layers}
    units: dict[str, list[str]] = {}
    for layer in layers:
        v = layer.node.inputs[0].name
        if v not in acts:
            continue
        unit = units.setdefault(v, [v])
        out = layer.output.name
        if out in acts and out not in inputs and out not in unit:
            unit.append(out)
    return units


LAYOUT_OPS = ("Reshape", "Transpose", "Squeeze", "Unsqueeze", "Flatten", "Identity")


def _maker(value: ir.Value) -> ir.Node | None:
    """The node that computes an output's values, looking through layout-only nodes (an
    exporter writes a Softmax over an inner axis as Reshape → Softmax → Reshape)."""
    node = value.producer()
    while node is not None and node.op_type in LAYOUT_OPS and node.domain in ("", "ai.onnx") and node.inputs:
        node = node.inputs[0].producer()
    return node


def _scored(value: ir.Value) -> str:
    """The value an output is scored at: a Sigmoid's or Softmax's input (the logits) where
    the output is one, since a saturated map or distribution hides its errors (a text map
    on images where no text is found is all near zero); else the output itself."""
    node = _maker(value)
    if node is not None and node.op_type in ("Sigmoid", "Softmax") and node.domain in ("", "ai.onnx"):
        return node.inputs[0].name
    return value.name


def _class_scores(value: ir.Value) -> bool:
    """Whether an output is class scores, read by its largest entry: a Softmax's (or
    LogSoftmax's) output, or one score vector per input (``[N, C]``, C > 1 where known)."""
    node = _maker(value)
    if node is not None and node.op_type in ("Softmax", "LogSoftmax") and node.domain in ("", "ai.onnx"):
        return True
    shape = value.shape
    if shape is None or len(shape) != 2:
        return False
    return not isinstance(shape[1], int) or shape[1] > 1


def _db(e: float) -> float:
    return math.inf if e <= 0 else -10.0 * math.log10(e)


def _errors(ref: list[torch.Tensor], out: list[torch.Tensor]) -> np.ndarray:
    """Per input, the output error energy over the outputs' mean energy per input, averaged
    over the outputs: its mean is the error ratio the SQNR is made of."""
    per = []
    for r, o in zip(ref, out):
        r64, o64 = r.double(), o.double()
        energy = float((r64 ** 2).sum())
        if energy <= 0:
            continue
        n = r64.shape[0]
        per.append(dev.numpy(((r64 - o64) ** 2).reshape(n, -1).sum(1)) / (energy / n))
    return np.mean(per, axis=0) if per else np.zeros(1)


def _sqnr(ref: list[torch.Tensor], out: list[torch.Tensor]) -> float:
    return _db(float(_errors(ref, out).mean()))


def _sqnr_upper(ref: list[torch.Tensor], out: list[torch.Tensor]) -> float:
    """The SQNR one standard error of the mean error above the measured one: a shortfall
    smaller than this is within what the held-out inputs scatter by."""
    e = _errors(ref, out)
    se = float(e.std(ddof=1)) / math.sqrt(len(e)) if len(e) > 1 else 0.0
    return _db(max(float(e.mean()) - se, 0.0))


class _Evaluator:
    def __init__(self, model: ir.Model, reference: ir.Model, images: np.ndarray):
        from ..torchgraph import TorchGraph

        self.graph = TorchGraph(model).eval()
        ref_graph = TorchGraph(reference).eval()
        self.x = dev.tensor(np.ascontiguousarray(images, dtype=np.float32))
        self.names = [_scored(v) for v in model.graph.outputs]
        self.class_scores = all(_class_scores(v) for v in model.graph.outputs)
        self.chunk = CHUNK
        with torch.no_grad():
            probe = ref_graph.run(self.x[:2], capture=self.names)
        if len(self.x) > 1 and any(v.ndim == 0 or v.shape[0] != 2 for v in probe.values() if v.is_floating_point()):
            self.chunk = 1     # outputs not batched along their first axis (a fixed-batch detector's [1, N*boxes, k])
        self.ref = self._outputs(ref_graph, {})

    def _outputs(self, graph, hooks, n: int | None = None) -> list[torch.Tensor]:
        x, c = self.x[:n], self.chunk
        with torch.no_grad():
            parts = [graph.run(x[s:s + c], capture=self.names, hooks=hooks) for s in range(0, len(x), c)]
        names = [k for k in self.names if parts[0][k].is_floating_point()]
        if c == 1:
            return [torch.stack([p[k] for p in parts]) for k in names]     # one image each, stacked on a new axis
        return [torch.cat([p[k] for p in parts]) for k in names]

    def rank(self, units: dict[str, list[str]], acts: dict[str, ActQuant], progress=None) -> list[str]:
        """Units by the output error each causes alone (weights quantized, only that unit's
        tensors quantized), measured on the first ``RANK_IMAGES`` inputs: the worst first."""
        damage = {}
        for i, (v, names) in enumerate(units.items()):
            if progress is not None:
                progress("activation floor", i, 2 * len(units))
            damage[v] = -self.sqnr({n: acts[n] for n in names}, n=RANK_IMAGES)
        return sorted(damage, key=lambda v: -damage[v])

    def sqnr(self, acts: dict[str, ActQuant], n: int | None = None, upper: bool = False) -> float:
        """Output SQNR with ``acts`` fake-quantized, on the first ``n`` inputs (all: None);
        ``upper``: one standard error above it (:func:`_sqnr_upper`)."""
        from .fit import _fake_quant_hook

        hooks = {k: _fake_quant_hook(a.scale, a.zero_point, a.bits, a.signed) for k, a in acts.items()}
        return (_sqnr_upper if upper else _sqnr)([r[:n] for r in self.ref], self._outputs(self.graph, hooks, n))


def activation_floor(model: ir.Model, reference: ir.Model, layers: list[Layer], acts: dict[str, ActQuant],
                     images: np.ndarray, *, loss_db: float = 3.0, enough_db: float | None = None,
                     progress=None) -> FloorResult:
    """The activation quantizers to keep (module docstring); ``enough_db`` None: by what the
    outputs are (``ENOUGH_CLASS_DB`` for class scores, else ``ENOUGH_DB``)."""
    if not acts:
        return FloorResult(acts=acts)
    ev = _Evaluator(model, reference, images)
    res = FloorResult(acts=dict(acts), class_scores=ev.class_scores)
    if enough_db is None:
        enough_db = ENOUGH_CLASS_DB if ev.class_scores else ENOUGH_DB
    res.weights_db = ev.sqnr({})
    res.before_db = res.after_db = ev.sqnr(acts)
    before_upper = ev.sqnr(acts, upper=True)
    res.target_db = min(enough_db, res.weights_db - loss_db)
    if res.weights_db < TRUSTED_DB:       # outputs too weak on these inputs to judge by: nothing dropped
        res.untrusted = True
        return res
    if before_upper >= res.target_db:  # short by less than the inputs scatter: no kernel given up for it
        return res
    units = _units(layers, acts)
    order = ev.rank(units, acts, progress)

    def without(n_dropped: int) -> dict[str, ActQuant]:
        out = dict(acts)
        for v in order[:n_dropped]:
            for n in units[v]:
                out.pop(n, None)
        return out

    good, bad = len(order), 0          # dropping `good` meets the target (all float does), `bad` does not
    n = 1
    while n < good:                    # doubling, then bisection: about 2 log2(units) runs
        if progress is not None:
            progress("activation floor", len(order) + n, 2 * len(order))
        if ev.sqnr(without(n)) >= res.target_db:
            good = n
            break
        bad, n = n, 2 * n
    while good - bad > 1:
        mid = (good + bad) // 2
        if ev.sqnr(without(mid)) >= res.target_db:
            good = mid
        else:
            bad = mid
    kept, dropped = without(good), order[:good]
    res.after_db = ev.sqnr(kept)
    if progress is not None:
        progress("activation floor", 2 * len(order), 2 * len(order))
    res.acts, res.kept_float = kept, dropped
    return res
