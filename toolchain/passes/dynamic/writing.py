"""Dynamic precision, graph writing: fixed-precision, upfront-selector and cascade models."""

from __future__ import annotations

import json

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

from datafree.ops import domain, functions, reference, schemas
from datafree.ops.selector import Selector

from ...graph import UniqueNames
from .integer import build_fixed
from .plan import BITS_OUTPUT, METADATA_KEY, DynLayer, Plan, run_values, config_key


# -------------------------------------------------------------- graph writing
def _inputs_used(graph: onnx.GraphProto) -> set[str]:
    """Every value a node of ``graph`` or of its subgraphs (If branches) reads."""
    return {i for n in domain.all_nodes(graph) for i in n.input}


class _Writer:
    """Edits a copy of the BN-folded float model (ModelProto) into a quantized one."""

    def __init__(self, plan: Plan):
        self.plan = plan
        self.model = onnx.ModelProto()
        self.model.CopyFrom(plan.base)
        self.graph = self.model.graph
        self.inits: list[onnx.TensorProto] = []
        taken = {v for n in self.graph.node for v in (*n.input, *n.output)}
        taken |= {i.name for i in self.graph.initializer} | {i.name for i in self.graph.input}
        self.name = UniqueNames.avoiding(taken)

    def const(self, base: str, array: np.ndarray) -> str:
        name = self.name(base)
        self.inits.append(numpy_helper.from_array(np.array(array, order="C"), name))
        return name

    def node_of(self, layer: DynLayer) -> tuple[int, onnx.NodeProto]:
        return next((i, n) for i, n in enumerate(self.graph.node) if n.name == layer.name)

    def static_quant(self, layer: DynLayer, bits: int, x: str | None = None,
                     prefix: str = "") -> tuple[list[onnx.NodeProto], str]:
        """Fake-quantize the layer input (or ``x``) at ``bits`` with standard ops, and use the result."""
        a = layer.act
        lo, hi = reference.act_grid(bits, a.signed)
        p = f"{prefix}{layer.name}/aq{bits}"
        s = self.const(p + "/scale", np.float32(a.scale[bits]))
        z = self.const(p + "/zp", np.float32(a.zero_point[bits]))
        qmin, qmax = self.const(p + "/qmin", np.float32(lo)), self.const(p + "/qmax", np.float32(hi))
        t = [self.name(f"{p}/t{i}") for i in range(5)]
        out = self.name(p + "/out")
        nodes = [helper.make_node("Div", [x or layer.input, s], [t[0]], name=self.name(p + "/div")),
                 helper.make_node("Round", [t[0]], [t[1]], name=self.name(p + "/round")),
                 helper.make_node("Add", [t[1], z], [t[2]], name=self.name(p + "/add")),
                 helper.make_node("Clip", [t[2], qmin, qmax], [t[3]], name=self.name(p + "/clip")),
                 helper.make_node("Sub", [t[3], z], [t[4]], name=self.name(p + "/sub")),
                 helper.make_node("Mul", [t[4], s], [out], name=self.name(p + "/mul"))]
        return nodes, out

    def fixed_layer(self, layer: DynLayer, bits: int, bias: np.ndarray | None = None) -> None:
        idx, node = self.node_of(layer)
        nodes, xq = self.static_quant(layer, bits)
        w = self.const(f"{layer.name}/w{bits}", layer.weight(bits) if layer.op == "Conv" else
                       self._gemm_weight(node, layer.weight(bits)))
        node.input[0], node.input[1] = xq, w
        if bias is not None:
            b = self.const(f"{layer.name}/bias{bits}", bias.astype(np.float32))
            if len(node.input) > 2:
                node.input[2] = b
            else:
                node.input.append(b)
        for k, n in enumerate(nodes):
            self.graph.node.insert(idx + k, n)

    @staticmethod
    def _gemm_weight(node: onnx.NodeProto, w_oc: np.ndarray) -> np.ndarray:
        trans_b = next((a.i for a in node.attribute if a.name == "transB"), 0)
        return w_oc if trans_b else np.ascontiguousarray(w_oc.T)

    def dynamic_layer(self, layer: DynLayer, bits_value: str, cache: dict, bias: np.ndarray | None = None) -> None:
        idx, node = self.node_of(layer)
        a, p = layer.act, layer.name
        new = []
        key = (layer.input, layer.group)
        if key not in cache:
            xq = self.name(f"{p}/dynquant")
            new.append(helper.make_node(
                "DynQuant", [layer.input, bits_value, self.const(p + "/act_scale", a.scale),
                             self.const(p + "/act_zero_point", a.zero_point)],
                [xq], domain=domain.DOMAIN, name=self.name(p + "/DynQuant"), signed=int(a.signed)))
            cache[key] = xq
        ins = [cache[key], bits_value, self.const(p + "/w_int", layer.w_int),
               self.const(p + "/w_scale", layer.w_scale), self.const(p + "/scale_table", layer.scale_table),
               self.const(p + "/bias", layer.bias if bias is None else bias.astype(np.float32))]
        op = "DynQConv" if layer.op == "Conv" else "DynQGemm"
        repl = helper.make_node(op, ins, [node.output[0]], domain=domain.DOMAIN, name=node.name,
                                **(layer.attrs if layer.op == "Conv" else {}))
        del self.graph.node[idx]
        for k, n in enumerate(new + [repl]):
            self.graph.node.insert(idx + k, n)

    def finish(self, extra_outputs: list[str] = ()) -> onnx.ModelProto:
        self.graph.initializer.extend(self.inits)
        used = _inputs_used(self.graph)
        keep = [t for t in self.graph.initializer if t.name in used]
        del self.graph.initializer[:]
        self.graph.initializer.extend(keep)
        for name in extra_outputs:
            self.graph.output.append(helper.make_empty_tensor_value_info(name))
        return self.model


def fake_quant_fixed(plan: Plan, config, extra_outputs: list[str] = ()) -> onnx.ModelProto:
    """One configuration fake-quantized in float, as the upfront model's function bodies run it."""
    w = _Writer(plan)
    biases = plan.biases_for(config)
    w.fixed_layer(plan.stem, plan.max_bits, biases.get(plan.stem.name))
    for layer in plan.layers:
        w.fixed_layer(layer, int(config[layer.group]), biases.get(layer.name))
    return w.finish(extra_outputs)


def correct_biases(plan: Plan, config, images: np.ndarray) -> dict[str, np.ndarray]:
    """Empirical bias correction of one configuration (stored in ``plan.biases``):
    layer by layer in graph order, each bias moves so that the layer's mean output per
    channel on ``images``, in the network quantized at ``config`` with the biases
    corrected so far, equals the float model's.  The bit-widths share one set of
    weights, so rounding and clipping shift each configuration's means differently;
    the shift adds up along the network, and a bias per configuration (a few floats
    per layer) takes it out.  Each layer's mean sees its corrected predecessors, so
    one pass in order is exact for every layer."""
    key = config_key(config)
    order = {n.name: i for i, n in enumerate(plan.base.graph.node)}
    layers = sorted([plan.stem] + plan.layers, key=lambda l: order[l.name])
    outputs = {l.name: next(n for n in plan.base.graph.node if n.name == l.name).output[0] for l in layers}

    def channel_mean(v: np.ndarray) -> np.ndarray:
        return v.reshape(v.shape[0], v.shape[1], -1).mean(axis=(0, 2)).astype(np.float64)

    reference_out = run_values(plan.base, images, list(outputs.values()))
    plan.biases[key] = {}
    for layer in layers:
        name = outputs[layer.name]
        got = run_values(build_fixed(plan, config), images, [name])[name]
        current = plan.biases[key].get(layer.name, layer.bias).astype(np.float64)
        plan.biases[key][layer.name] = (current + channel_mean(reference_out[name]) - channel_mean(got)).astype(np.float32)
    return plan.biases[key]


def build_dynamic(plan: Plan, selector: Selector) -> onnx.ModelProto:
    """The dynamic model: stem, BitSelect, and every other layer at its group's bits."""
    schemas.register()
    w = _Writer(plan)
    w.fixed_layer(plan.stem, plan.max_bits)
    stem_idx, _ = w.node_of(plan.stem)
    # the selector right after the stem's activation
    feat_idx = next(i for i, n in enumerate(w.graph.node) if plan.features in n.output)
    config = w.name("config")
    sel = helper.make_node("BitSelect", [plan.features, w.const("selector/W1", selector.w1),
                                         w.const("selector/b1", selector.b1), w.const("selector/W2", selector.w2),
                                         w.const("selector/b2", selector.b2),
                                         w.const("selector/bits_table", plan.configs.astype(np.float32))],
                           [config, BITS_OUTPUT], domain=domain.DOMAIN, name=w.name("selector/BitSelect"))
    nodes = [sel]
    group_bits = []
    for g in range(len(plan.groups)):
        out = w.name(f"bits/group{g}")
        nodes.append(helper.make_node("Gather", [BITS_OUTPUT, w.const(f"bits/index{g}", np.int64(g))], [out],
                                      axis=1, name=w.name(f"bits/Gather{g}")))
        group_bits.append(out)
    for k, n in enumerate(nodes):
        w.graph.node.insert(feat_idx + 1 + k, n)
    cache: dict = {}
    for layer in plan.layers:
        w.dynamic_layer(layer, group_bits[layer.group], cache)
    model = w.finish()
    model.graph.output.append(helper.make_tensor_value_info(BITS_OUTPUT, TensorProto.FLOAT,
                                                            [_batch_dim(model), len(plan.groups)]))
    domain.add_opset_import(model)
    functions.attach(model, plan.candidates)
    meta = {"candidates": list(plan.candidates), "groups": plan.groups, "group_macs": plan.group_macs.tolist(),
            "configs": plan.configs.astype(int).tolist(), "stem": plan.stem.name, "stem_bits": plan.max_bits,
            "bits_output": BITS_OUTPUT}
    model.metadata_props.append(onnx.StringStringEntryProto(key=METADATA_KEY, value=json.dumps(meta)))
    return model


def confidence_features(logits: np.ndarray) -> np.ndarray:
    """What the cascade's selector reads: the first pass's margin, its largest logit
    minus the second largest, [n, 1] (as TopK, Slice and Sub compute it in the graph)."""
    top = -np.sort(-np.asarray(logits, np.float32), axis=1)
    return top[:, :1] - top[:, 1:2]


def _batch_dim(model: onnx.ModelProto):
    dims = model.graph.input[0].type.tensor_type.shape.dim
    if dims and dims[0].dim_param:
        return dims[0].dim_param
    if dims and dims[0].dim_value:
        return dims[0].dim_value
    return "N"


