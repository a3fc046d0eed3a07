"""Write models atomically: nothing at the destination until the whole file is there.

A model (and its external-data file, when there is one) is written to temporary
files beside the destination and renamed into place, so a crash or an error never
leaves a partial output, and the input is never touched.

What an exporter records on each node and value about where it came from (torch's
``pkg.torch.onnx.stack_trace`` with the build machine's file paths, module names,
FX nodes, rewrite rule names) is left out of every file written; the model's own
``metadata_props`` (the recipe) stay.
"""

from __future__ import annotations

import os
import tempfile
from contextlib import contextmanager
from pathlib import Path

import onnx_ir as ir

from datafree.toolchain.errors import UserError

# protobuf cannot serialise a message over 2 GiB: past this, weights go to a .data file
EXTERNAL_DATA_THRESHOLD = 1_800_000_000


def _tensor_bytes(model: ir.Model) -> int:
    return sum(v.const_value.nbytes for v in model.graph.initializers.values() if v.const_value is not None)


@contextmanager
def _lean(model: ir.Model):
    """Leave redundant entries out of ``value_info`` while ``model`` is serialised.

    Initializers carry their own type and shape, a QuantizeLinear / DequantizeLinear
    output has its input's shape, and so do the Cast and Mul that turn stored integer
    weights into float ones: onnx_ir would still write a value_info entry for each
    (7 % of a quantized ResNet-20's file).
    """
    graph = model.graph
    kept = {id(v) for v in (*graph.inputs, *graph.outputs)}
    values = [v for v in graph.initializers.values() if v.const_value is not None]
    values += [o for n in graph if n.domain == "" and n.op_type in ("QuantizeLinear", "DequantizeLinear")
               for o in n.outputs]
    values += [o for n in graph if _of_constants(n) for o in n.outputs]
    saved = [(v, v.type, v.shape) for v in values if id(v) not in kept]
    for v, _, _ in saved:
        v.type, v.shape = None, None
    try:
        yield model
    finally:
        for v, type_, shape in saved:
            v.type, v.shape = type_, shape


def _annotated(model: ir.Model):
    """Every node and value of ``model`` (subgraphs and functions included), once each."""
    seen: set[int] = set()
    graphs = [model.graph, *model.functions.values()]
    values = [v for g in graphs for v in (*g.inputs, *g.outputs)] + list(model.graph.initializers.values())
    for g in graphs:
        for node in ir.traversal.RecursiveGraphIterator(g):
            values += [*node.inputs, *node.outputs]
            if id(node) not in seen:
                seen.add(id(node))
                yield node
    for v in values:
        if v is not None and id(v) not in seen:
            seen.add(id(v))
            yield v


@contextmanager
def _without_provenance(model: ir.Model):
    """Leave each node's and value's ``metadata_props`` out while ``model`` is
    serialised (see the module doc); the model in memory keeps them."""
    saved = [(item, dict(item.metadata_props)) for item in _annotated(model) if item.metadata_props]
    for item, _ in saved:
        item.metadata_props.clear()
    try:
        yield model
    finally:
        for item, props in saved:
            item.metadata_props.update(props)


def _of_constants(node: ir.Node) -> bool:
    """A Cast of a constant, or a Mul of such a Cast and a constant (a weight's dequantization)."""
    if node.domain != "" or node.op_type not in ("Cast", "Mul"):
        return False
    inputs = [v for v in node.inputs if v is not None]

    def cast_of_constant(v: ir.Value) -> bool:
        p = v.producer()
        return p is not None and p.op_type == "Cast" and p.domain == "" and p.inputs[0].const_value is not None

    if node.op_type == "Cast":
        return len(inputs) == 1 and inputs[0].const_value is not None
    return len(inputs) == 2 and all(v.const_value is not None or cast_of_constant(v) for v in inputs)


def save(model: ir.Model, path: str | os.PathLike, *, external_data: bool | None = None,
         metadata: dict[str, str] | None = None) -> Path:
    """Save ``model`` to ``path`` atomically.

    ``external_data``: True writes weights to ``<path>.data`` beside the model, False
    embeds them, None decides by size (external past ~1.8 GB).
    """
    path = Path(path)
    if not path.parent.exists():
        raise UserError(f"{path.parent}: output folder does not exist")
    for key, value in (metadata or {}).items():
        model.metadata_props[key] = value
    if external_data is None:
        external_data = _tensor_bytes(model) > EXTERNAL_DATA_THRESHOLD
    data_name = path.name + ".data"
    with tempfile.TemporaryDirectory(dir=path.parent, prefix=".datafree-") as tmp:
        tmp_model = Path(tmp) / path.name
        with _lean(model), _without_provenance(model):
            if external_data:
                ir.save(model, tmp_model, external_data=data_name, size_threshold_bytes=1024)
            else:
                ir.save(model, tmp_model)
        if external_data:
            os.replace(Path(tmp) / data_name, path.parent / data_name)
        os.replace(tmp_model, path)
    return path


def to_bytes(model: ir.Model) -> bytes:
    """The serialised model (for onnxruntime sessions held in memory)."""
    with _lean(model):
        return ir.serde.serialize_model(model).SerializeToString()
