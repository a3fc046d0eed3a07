"""The custom op domain of dynamic-precision models, defined once.

Every node the dynamic pass writes (``BitSelect``, ``DynQuant``, ``DynQConv``,
``DynQGemm``) lives in :data:`DOMAIN` at :data:`VERSION`.  The schemas, the ONNX
function bodies, the onnxruntime-extensions kernels, the writer and the runtime all
import the name from here.
"""

from __future__ import annotations

import json
from collections.abc import Mapping

import numpy as np
import onnx

DOMAIN = "ai.datafree"
VERSION = 1
# onnxruntime-extensions runs Python kernels registered with @onnx_op in this domain.
KERNEL_DOMAIN = "ai.onnx.contrib"

OP_TYPES = ("BitSelect", "DynQuant", "DynQConv", "DynQGemm")
# Model metadata of a dynamic model: groups, their MACs, the configurations, the mode.
METADATA_KEY = "datafree.dynamic"


def dynamic_metadata(metadata: Mapping[str, str]) -> dict:
    """A model's ``datafree.dynamic`` metadata from its metadata properties ({} when
    absent or unreadable)."""
    try:
        meta = json.loads(metadata.get(METADATA_KEY) or "{}")
    except ValueError:
        return {}
    return meta if isinstance(meta, dict) else {}


def all_nodes(graph: onnx.GraphProto):
    """The nodes of ``graph`` and of its subgraphs (a cascade's rerun sits in an If)."""
    for node in graph.node:
        yield node
        for a in node.attribute:
            if a.type == onnx.AttributeProto.GRAPH:
                yield from all_nodes(a.g)


def config_label(bits, first=None) -> str:
    """A configuration as people read it, ``"4/6/8"`` (bits per group); in a cascade an
    image rerun after ``first`` ran both: ``"4/4/4 then 8/6/8"``."""
    label = "/".join(str(int(b)) for b in bits)
    if first is None or list(map(int, first)) == list(map(int, bits)):
        return label
    return f"{config_label(first)} then {label}"


def image_bits(meta: dict, bits) -> np.ndarray:
    """Average bits each image cost, from the ``bits`` output [N, G] and the model's
    metadata: the MAC-weighted mean over the groups; in a cascade, an image whose
    configuration is not the first ran twice and costs both passes."""
    b = np.asarray(bits, np.float64).reshape(len(bits), -1)
    w = np.asarray(meta.get("group_macs") or np.ones(b.shape[1]), np.float64)
    if len(w) != b.shape[1]:
        w = np.ones(b.shape[1])
    avg = b @ w / w.sum()
    if meta.get("mode") == "cascade":
        first = np.asarray(meta["configs"][0], np.float64)
        avg = avg + np.any(b != first, axis=1) * float(first @ w / w.sum())
    return avg


def opset_import() -> onnx.OperatorSetIdProto:
    """The ``opset_import`` entry a model (or function) using our ops needs."""
    return onnx.helper.make_opsetid(DOMAIN, VERSION)


def add_opset_import(model: onnx.ModelProto) -> onnx.ModelProto:
    """Declare :data:`DOMAIN` in ``model`` (idempotent); returns the model."""
    for entry in model.opset_import:
        if entry.domain == DOMAIN:
            entry.version = VERSION
            return model
    model.opset_import.append(opset_import())
    return model


def uses_domain(model: onnx.ModelProto) -> bool:
    """True when any node of the model (subgraphs included) is one of our ops."""
    return any(n.domain == DOMAIN for n in all_nodes(model.graph))
