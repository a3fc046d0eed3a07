"""Load any ONNX model and bring it to the one normal form every pass expects.

Normal form: an ``onnx_ir.Model`` at opset >= 13 whose weights are graph
initializers (Constant nodes and constant subgraphs folded away), with no
Identity/Dropout noise, unique node names, inferred shapes and topological order.
Ops we do not know pass through untouched.
"""

from __future__ import annotations

import os

import onnx
import onnx_ir as ir
import onnx_ir.passes.common as common

from datafree.runtime.model_file import load_proto

from .errors import UserError

MIN_OPSET = 13
# Folding these would destroy information (quantized weights) or randomness.
_NEVER_FOLD = {"QuantizeLinear", "DequantizeLinear", "DynamicQuantizeLinear",
               "RandomNormal", "RandomNormalLike", "RandomUniform", "RandomUniformLike",
               "Multinomial", "Bernoulli"}
QUANTIZED_OPS = {"QuantizeLinear", "DequantizeLinear", "QLinearConv", "QLinearMatMul",
                 "ConvInteger", "MatMulInteger", "DynamicQuantizeLinear", "MatMulNBits"}
# integer types quantized weights are stored in: a Cast of such a constant is a quantized
# weight (``Cast → Mul(scale)`` or ``Cast → DequantizeLinear``), never folded either
STORED_INTEGERS = {ir.DataType.INT8, ir.DataType.UINT8, ir.DataType.INT4, ir.DataType.UINT4}


def opset_of(model: ir.Model) -> int:
    return model.opset_imports.get("", model.opset_imports.get("ai.onnx", 0))


def upgrade_opset(proto: onnx.ModelProto, target: int) -> onnx.ModelProto:
    """Convert the default domain to ``target`` with onnx's version converter."""
    from onnx import version_converter

    try:
        return version_converter.convert_version(proto, target)
    except Exception as exc:
        raise UserError(f"cannot convert model from opset {_proto_opset(proto)} to {target}: {exc}") from None


def _proto_opset(proto: onnx.ModelProto) -> int:
    return next((o.version for o in proto.opset_import if o.domain in ("", "ai.onnx")), 0)


def to_ir(source: str | os.PathLike | onnx.ModelProto | ir.Model) -> ir.Model:
    """Any accepted source to an ``ir.Model`` (a copy: the source is never modified)."""
    if isinstance(source, ir.Model):
        return ir.serde.deserialize_model(ir.serde.serialize_model(source))
    if isinstance(source, onnx.ModelProto):
        proto = onnx.ModelProto()
        proto.CopyFrom(source)
    else:
        proto = load_proto(source)
    if _proto_opset(proto) < MIN_OPSET:
        proto = upgrade_opset(proto, MIN_OPSET)
    try:
        return ir.serde.deserialize_model(proto)
    except Exception as exc:
        raise UserError(f"model could not be read: {exc}") from None


def _should_fold(node: ir.Node) -> bool | None:
    if node.op_type in _NEVER_FOLD or node.domain not in ("", "ai.onnx") or _casts_stored_integers(node):
        return False
    return True


def _casts_stored_integers(node: ir.Node) -> bool:
    """A Cast of a constant held in a quantized weight's integer type, into that weight's
    dequantization (a DequantizeLinear, or a Mul by its scale): the forms the writer uses.
    Other arithmetic on such integers (a dynamic model's weights derived from them) folds."""
    x = node.inputs[0] if node.op_type == "Cast" and node.domain in ("", "ai.onnx") and node.inputs else None
    if x is None or x.const_value is None or x.const_value.dtype not in STORED_INTEGERS:
        return False
    return any(u.node.op_type == "DequantizeLinear" or
               (u.node.op_type == "Mul" and all(v is not None and (v.const_value is not None or v is node.outputs[0])
                                               for v in u.node.inputs))
               for u in node.outputs[0].uses())


class RemoveInferenceNoOpsPass(ir.passes.InPlacePass):
    """Dropout in inference mode is the identity: bypass it."""

    def call(self, model: ir.Model) -> ir.passes.PassResult:
        modified = False
        for node in list(model.graph):
            if node.op_type == "Dropout" and node.domain in ("", "ai.onnx"):
                out = node.outputs[0]
                if out.is_graph_output():
                    continue
                ir.convenience.replace_all_uses_with(out, node.inputs[0])
                model.graph.remove(node, safe=False)
                modified = True
        return ir.passes.PassResult(model, modified)


class UntieSharedWeightsPass(ir.passes.InPlacePass):
    """A weight, bias or BN parameter read by several layers gets a copy per layer.

    Compression changes each layer's tensors on their own (BN folding, pruning,
    quantization): a module applied twice (tied weights) would otherwise have both of
    its uses rewritten through one initializer and compute wrong outputs.
    """

    def call(self, model: ir.Model) -> ir.passes.PassResult:
        from .graph import LAYER_OPS, UniqueNames, add_initializer

        graph, names, modified = model.graph, None, False
        for node in list(graph):
            if node.domain not in ("", "ai.onnx"):
                continue
            if node.op_type in LAYER_OPS:
                slots = (1, 2)
            elif node.op_type == "BatchNormalization":
                slots = (1, 2, 3, 4)
            else:
                continue
            for i in slots:
                value = node.inputs[i] if i < len(node.inputs) else None
                if value is None or value.const_value is None or not value.is_initializer() or \
                        len(list(value.uses())) < 2 or value.is_graph_output():
                    continue
                names = names or UniqueNames(graph)
                copy = add_initializer(graph, f"{value.name}_{node.name}", value.const_value.numpy().copy(),
                                       names=names)
                node.replace_input_with(i, copy)
                modified = True
        return ir.passes.PassResult(model, modified)


class FoldConstantsPass(ir.passes.InPlacePass):
    """Fold constant subgraphs (shape arithmetic, weights computed from constants)."""

    def call(self, model: ir.Model) -> ir.passes.PassResult:
        from onnxscript.optimizer import fold_constants

        result = fold_constants(model, input_size_limit=1 << 28, output_size_limit=1 << 28,
                                should_fold=_should_fold)
        return ir.passes.PassResult(model, bool(result.modified))


class SymbolicNegativeDimsPass(ir.passes.InPlacePass):
    """A graph input or output dim written as -1 (paddle2onnx does, for "any") becomes a
    symbolic dim, which is what it means: nothing downstream takes it for a size."""

    def call(self, model: ir.Model) -> ir.passes.PassResult:
        modified = False
        for value in (*model.graph.inputs, *model.graph.outputs):
            if value.shape is not None and any(isinstance(d, int) and d < 0 for d in value.shape):
                value.shape = ir.Shape([None if isinstance(d, int) and d < 0 else d for d in value.shape])
                modified = True
        return ir.passes.PassResult(model, modified)


def normalize(model: ir.Model) -> ir.Model:
    """Bring ``model`` (in place) to the normal form; returns it."""
    passes = ir.passes.PassManager([
        SymbolicNegativeDimsPass(),
        common.LiftConstantsToInitializersPass(lift_all_constants=True, size_limit=0),
        common.RemoveInitializersFromInputsPass(),
        FoldConstantsPass(),
        common.LiftConstantsToInitializersPass(lift_all_constants=True, size_limit=0),
        RemoveInferenceNoOpsPass(),
        common.IdentityEliminationPass(),
        common.RemoveUnusedNodesPass(),
        UntieSharedWeightsPass(),
        common.NameFixPass(),
        common.TopologicalSortPass(),
    ])
    passes(model)
    infer_shapes(model)
    return model


def infer_shapes(model: ir.Model) -> None:
    """Shape inference that never fails the run (unknown custom ops just stay unknown)."""
    try:
        common.ShapeInferencePass()(model)
    except Exception:  # shape inference is best effort: unknown domains may refuse it
        pass


def load(source: str | os.PathLike | onnx.ModelProto | ir.Model) -> ir.Model:
    """Load and normalise: the entry point of every command and pipeline."""
    return normalize(to_ir(source))


def is_quantized(model: ir.Model) -> bool:
    return any(n.op_type in QUANTIZED_OPS or _casts_stored_integers(n) for n in model.graph)
