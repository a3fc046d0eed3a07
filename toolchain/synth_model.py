"""What the synthetic-image generator reads from the model: the route it can take
(BN statistics, procedural photographs, class scores), the classifier layer and the
similarity of its classes, and the convolutions whose pre-activations carry BN
statistics."""

from __future__ import annotations

import numpy as np
import onnx_ir as ir
import torch
import torch.nn.functional as F

from . import device as dev
from .errors import CannotSynthesise, UserError
from .graph import analyse
from .recipe import SYNTHETIC_ROUTES

ROUTES = SYNTHETIC_ROUTES


class RouteRefused(UserError):
    """The route asked for cannot make images for this model (an impossible option, not a fall-back)."""


def _route(asked: str, has_bn: bool, classifier: bool, image: bool) -> str:
    """How images are made: BN statistics where the model keeps them; else procedural
    photographs for an image input (a classifier with BN folded gets more from them than
    from images optimised toward its classes: benchmarks/results/compress_folded*.md); else, for a
    classifier of other inputs, images optimised toward its classes."""
    possible = {"bn-statistics": (has_bn, "the model has no BatchNormalization statistics"),
                "output-only": (classifier, "the model's output is not one score per class"),
                "natural": (image, "the input is not an image")}
    if asked != "auto":
        if asked not in possible:
            raise RouteRefused(f"synthetic_route must be one of {', '.join(ROUTES)}, got {asked!r}")
        ok, why = possible[asked]
        if not ok:
            raise RouteRefused(f"synthetic route {asked!r} cannot be used: {why}")
        return asked
    for route in ("bn-statistics", "natural", "output-only"):
        if possible[route][0]:
            return route
    raise CannotSynthesise("cannot make synthetic inputs: the model has no BatchNormalization statistics, its "
                           "output is not one score per class and its input is not an image")


# ------------------------------------------------------------------ model reading
def _logits_value(model: ir.Model) -> str:
    """The graph output, or the input of a final Softmax/LogSoftmax (so CE sees logits)."""
    out = model.graph.outputs[0]
    node = out.producer()
    if node is not None and node.op_type in ("Softmax", "LogSoftmax"):
        return node.inputs[0].name
    return out.name


def _classifier(model: ir.Model):
    """The last linear layer feeding the first output, walking back through shape-only ops."""
    layers = analyse(model).layers
    by_node = {id(l.node): l for l in layers}
    value = model.graph.outputs[0]
    passthrough = {"Softmax", "LogSoftmax", "Flatten", "Reshape", "Squeeze", "Identity", "Transpose",
                   "GlobalAveragePool", "ReduceMean", "Relu", "Add", "BatchNormalization", "Sigmoid"}
    for _ in range(16):
        node = value.producer()
        if node is None:
            break
        if id(node) in by_node:
            return by_node[id(node)]
        if node.op_type not in passthrough or not node.inputs or node.inputs[0] is None:
            break
        value = node.inputs[0]
    return layers[-1] if layers else None


def _class_similarity(model: ir.Model) -> tuple[torch.Tensor, int]:
    """Cosine similarity of the classifier's rows, K x K (identity when there is none)."""
    out = model.graph.outputs[0]
    k = out.shape[-1] if out.shape is not None and len(out.shape) >= 1 else None
    layer = _classifier(model)
    if layer is not None:
        w = layer.w_oc()
        w = dev.tensor(w.reshape(w.shape[0], -1).astype(np.float32))
        if not isinstance(k, int) or k == w.shape[0]:
            w = F.normalize(w, dim=1)
            return w @ w.T, w.shape[0]
    if not isinstance(k, int):
        raise CannotSynthesise("cannot tell the number of classes: the first output has no static last axis")
    return torch.eye(k, device=dev.current()), k


def _conv_outputs(model: ir.Model) -> list[str]:
    """Pre-activation values of the convolutions (all but a final classifier conv)."""
    head = _classifier(model)
    head_node = head.node if head is not None else None
    return [l.node.outputs[0].name for l in analyse(model).layers
            if l.op in ("Conv", "ConvTranspose") and l.node is not head_node]
