"""Dynamic precision, graph writing: fixed-precision, upfront-selector and cascade models."""

from __future__ import annotations

import json

import numpy as np
import onnx
import onnx_ir as ir

from datafree.ops import domain, functions, reference, schemas
from datafree.ops.selector import Selector

from ...graph import UniqueNames, add_initializer
from .integer import build_fixed, with_outputs
from .plan import BITS_OUTPUT, METADATA_KEY, DynLayer, Plan, run_values, config_key


# -------------------------------------------------------------- graph writing
def _node(op: str, inputs: list, outputs: list, name: str | None = None, domain_: str = "",
          **attrs) -> ir.Node:
    """A node reading ``inputs`` (values) and making ``outputs`` (values, or names of new
    ones); its attributes in name order, as ``onnx.helper.make_node`` writes them."""
    return ir.Node(domain_, op, inputs, attributes=[ir.convenience.convert_attribute(k, v)
                                                    for k, v in sorted(attrs.items())],
                   outputs=[o if isinstance(o, ir.Value) else ir.Value(name=o) for o in outputs], name=name)


def batch_dim(model: ir.Model) -> int | str:
    """The first input's batch size: its symbol, its fixed size, or ``"N"``."""
    shape = model.graph.inputs[0].shape
    if shape is not None and len(shape):
        d = shape[0]
        if isinstance(d, int) and d:
            return d
        if isinstance(d, ir.SymbolicDim) and d.value:
            return d.value
    return "N"


class _Writer:
    """Edits a copy of the BN-folded float model (an ``ir.Model``) into a quantized one."""

    def __init__(self, plan: Plan, model: ir.Model | None = None):
        self.plan = plan
        self.model = model or ir.serde.deserialize_model(plan.base)
        self.graph = self.model.graph
        self.name = UniqueNames(self.graph)

    def const(self, base: str, array: np.ndarray) -> ir.Value:
        return add_initializer(self.graph, base, np.array(array, order="C"), names=self.name)

    def node_of(self, layer: DynLayer) -> ir.Node:
        return next(n for n in self.graph if n.name == layer.name)

    def value(self, name: str) -> ir.Value:
        return next(v for n in self.graph for v in n.outputs if v.name == name)

    def static_quant(self, layer: DynLayer, bits: int, x: ir.Value) -> list[ir.Node]:
        """Fake-quantize ``x`` (the layer's input) at ``bits`` with standard ops."""
        a = layer.act
        lo, hi = reference.act_grid(bits, a.signed)
        p = f"{layer.name}/aq{bits}"
        s = self.const(p + "/scale", np.float32(a.scale[bits]))
        z = self.const(p + "/zp", np.float32(a.zero_point[bits]))
        qmin, qmax = self.const(p + "/qmin", np.float32(lo)), self.const(p + "/qmax", np.float32(hi))
        t = [self.name(f"{p}/t{i}") for i in range(5)]
        out = self.name(p + "/out")
        steps = [("Div", [s], t[0], "/div"), ("Round", [], t[1], "/round"), ("Add", [z], t[2], "/add"),
                 ("Clip", [qmin, qmax], t[3], "/clip"), ("Sub", [z], t[4], "/sub"), ("Mul", [s], out, "/mul")]
        nodes = []
        for op, rest, o, suffix in steps:
            nodes.append(_node(op, [x, *rest], [o], name=self.name(p + suffix)))
            x = nodes[-1].outputs[0]
        return nodes

    def fixed_layer(self, layer: DynLayer, bits: int, bias: np.ndarray | None = None) -> None:
        node = self.node_of(layer)
        nodes = self.static_quant(layer, bits, node.inputs[0])
        w = self.const(f"{layer.name}/w{bits}", layer.weight(bits) if layer.op == "Conv" else
                       self._gemm_weight(node, layer.weight(bits)))
        node.replace_input_with(0, nodes[-1].outputs[0])
        node.replace_input_with(1, w)
        if bias is not None:
            b = self.const(f"{layer.name}/bias{bits}", bias.astype(np.float32))
            if len(node.inputs) < 3:
                node.resize_inputs(3)
            node.replace_input_with(2, b)
        self.graph.insert_before(node, nodes)

    @staticmethod
    def _gemm_weight(node: ir.Node, w_oc: np.ndarray) -> np.ndarray:
        return w_oc if node.attributes.get_int("transB", 0) else np.ascontiguousarray(w_oc.T)

    def dynamic_layer(self, layer: DynLayer, bits: ir.Value, cache: dict, bias: np.ndarray | None = None) -> None:
        node = self.node_of(layer)
        a, p = layer.act, layer.name
        new = []
        key = (layer.input, layer.group)
        if key not in cache:
            new.append(_node("DynQuant", [node.inputs[0], bits, self.const(p + "/act_scale", a.scale),
                                          self.const(p + "/act_zero_point", a.zero_point)],
                             [self.name(f"{p}/dynquant")], name=self.name(p + "/DynQuant"),
                             domain_=domain.DOMAIN, signed=int(a.signed)))
            cache[key] = new[-1].outputs[0]
        ins = [cache[key], bits, self.const(p + "/w_int", layer.w_int),
               self.const(p + "/w_scale", layer.w_scale), self.const(p + "/scale_table", layer.scale_table),
               self.const(p + "/bias", layer.bias if bias is None else bias.astype(np.float32))]
        op = "DynQConv" if layer.op == "Conv" else "DynQGemm"
        repl = _node(op, ins, [node.outputs[0].name], name=node.name, domain_=domain.DOMAIN,
                     **(layer.attrs if layer.op == "Conv" else {}))
        ir.convenience.replace_nodes_and_values(self.graph, node, [node], new + [repl], node.outputs, repl.outputs)

    def finish(self) -> ir.Model:
        """The model, without the initializers nothing reads any more."""
        for name, v in list(self.graph.initializers.items()):
            if not v.uses() and not v.is_graph_output():
                del self.graph.initializers[name]
        return self.model


def fake_quant_fixed(plan: Plan, config, extra_outputs: list[str] = ()) -> onnx.ModelProto:
    """One configuration fake-quantized in float, as the upfront model's function bodies run it."""
    w = _Writer(plan)
    biases = plan.biases_for(config)
    w.fixed_layer(plan.stem, plan.max_bits, biases.get(plan.stem.name))
    for layer in plan.layers:
        w.fixed_layer(layer, int(config[layer.group]), biases.get(layer.name))
    return with_outputs(w.finish(), extra_outputs)


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
    config = w.name("config")
    sel = _node("BitSelect", [w.value(plan.features), w.const("selector/W1", selector.w1),
                              w.const("selector/b1", selector.b1), w.const("selector/W2", selector.w2),
                              w.const("selector/b2", selector.b2),
                              w.const("selector/bits_table", plan.configs.astype(np.float32))],
                [config, BITS_OUTPUT], name=w.name("selector/BitSelect"), domain_=domain.DOMAIN)
    nodes = [sel]
    for g in range(len(plan.groups)):      # the selector right after the stem's activation
        nodes.append(_node("Gather", [sel.outputs[1], w.const(f"bits/index{g}", np.int64(g))],
                           [w.name(f"bits/group{g}")], name=w.name(f"bits/Gather{g}"), axis=1))
    w.graph.insert_after(w.value(plan.features).producer(), nodes)
    cache: dict = {}
    for layer in plan.layers:
        w.dynamic_layer(layer, nodes[1 + layer.group].outputs[0], cache)
    model = w.finish()
    bits_output(model, sel.outputs[1], len(plan.groups))
    meta = {"candidates": list(plan.candidates), "groups": plan.groups, "group_macs": plan.group_macs.tolist(),
            "configs": plan.configs.astype(int).tolist(), "stem": plan.stem.name, "stem_bits": plan.max_bits,
            "bits_output": BITS_OUTPUT}
    return with_functions(model, plan, meta)


def bits_output(model: ir.Model, bits: ir.Value, n_groups: int) -> None:
    """The selector's bits per group, [batch, groups], as the model's last output."""
    bits.type = ir.TensorType(ir.DataType.FLOAT)
    bits.shape = ir.Shape([batch_dim(model), n_groups])
    model.graph.outputs.append(bits)


def with_functions(model: ir.Model, plan: Plan, meta: dict) -> onnx.ModelProto:
    """``model`` serialized with the ai.datafree opset, the function bodies of its ops
    (:mod:`datafree.ops.functions`, shared with the runtime) and the plan in its metadata."""
    proto = ir.serde.serialize_model(model)
    domain.add_opset_import(proto)
    functions.attach(proto, plan.candidates)
    proto.metadata_props.append(onnx.StringStringEntryProto(key=METADATA_KEY, value=json.dumps(meta)))
    return proto


def confidence_features(logits: np.ndarray) -> np.ndarray:
    """What the cascade's selector reads: the first pass's margin, its largest logit
    minus the second largest, [n, 1] (as TopK, Slice and Sub compute it in the graph)."""
    top = -np.sort(-np.asarray(logits, np.float32), axis=1)
    return top[:, :1] - top[:, 1:2]
