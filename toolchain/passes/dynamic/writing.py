"""Dynamic precision, graph writing: fixed-precision, upfront-selector and cascade models."""

from __future__ import annotations

import json
from dataclasses import dataclass

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

from datafree.ops import domain, functions, reference, schemas
from datafree.ops.selector import Selector

from ...graph import UniqueNames
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


def build_fixed(plan: Plan, config, extra_outputs: list[str] = ()) -> onnx.ModelProto:
    """The fixed-precision model of one configuration (bit-width per group), standard ops only."""
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


def _derived_weight(w: _Writer, layer: DynLayer, bits: int, w_int: str, prefix: str) -> tuple[list, str]:
    """Standard ops computing the layer's weight at ``bits`` from its stored integers
    (``reference.derive_weight``, same operations in the same order); every input is
    a constant, so onnxruntime folds them once at load and nothing is stored twice."""
    p = f"{prefix}{layer.name}/w{bits}"
    o = layer.w_int.shape[0]
    col = lambda name, v: w.const(f"{p}/{name}", np.asarray(v, np.float32).reshape(o, 1))  # noqa: E731
    ws, sc = col("w_scale", layer.w_scale), col("scale", layer.scale_table[bits])
    qmax = reference.weight_qmax(bits)
    t = [w.name(f"{p}/t{i}") for i in range(7)]
    out = w.name(p)
    mk = lambda op, ins, outs, **kw: helper.make_node(op, ins, outs, name=w.name(f"{p}/{op.lower()}"), **kw)  # noqa: E731
    nodes = [mk("Cast", [w_int], [t[0]], to=TensorProto.FLOAT),
             mk("Reshape", [t[0], w.const(f"{p}/flat", np.array([o, -1], np.int64))], [t[1]]),
             mk("Mul", [t[1], ws], [t[2]]),
             mk("Div", [t[2], sc], [t[3]]),
             mk("Round", [t[3]], [t[4]]),
             mk("Clip", [t[4], w.const(f"{p}/qmin", np.float32(-qmax)), w.const(f"{p}/qmax", np.float32(qmax))], [t[5]]),
             mk("Mul", [t[5], sc], [t[6]]),
             mk("Reshape", [t[6], w.const(f"{p}/shape", np.array(layer.w_int.shape, np.int64))], [out])]
    return nodes, out


def build_cascade(plan: Plan, selector: Selector) -> onnx.ModelProto:
    """The cascade model: the whole network at ``plan.configs[0]`` for every image, then
    ``BitSelect`` on the first pass's confidence picks, per image, to keep that result
    (configuration 0) or to run the network again at configuration k; the rows to
    rerun are gathered, run through the dynamic layers at their own bits, and
    scattered back into the first pass's logits.  Both passes read the same stored
    integers."""
    schemas.register()
    w = _Writer(plan)
    x_name, out_name = w.graph.input[0].name, w.graph.output[0].name
    orig = [onnx.NodeProto() for _ in w.graph.node]
    for dst, src in zip(orig, w.graph.node):
        dst.CopyFrom(src)
    first_biases = plan.biases_for(plan.configs[0])
    # every rerun row runs at the last configuration (fit_cascade keeps two): its biases
    rerun_biases = plan.biases_for(plan.configs[-1]) if len(plan.configs) == 2 else {}
    r = _rerun_pass(w, plan, x_name, out_name, rerun_biases)
    first, first_bits, first_out = _first_pass(w, plan, orig, out_name, first_biases, rerun_biases, r)
    choose, consts = _choice(w, plan, selector, first_out, r)
    branch = _rerun_branch(w, x_name, out_name, first_out, r, consts)
    del w.graph.node[:]
    w.graph.node.extend(first + choose + branch)
    del w.graph.value_info[:]          # the rerun's values have the rerun's batch, not the input's
    model = w.finish()
    model.graph.output.append(helper.make_tensor_value_info(BITS_OUTPUT, TensorProto.FLOAT,
                                                            [_batch_dim(model), len(plan.groups)]))
    domain.add_opset_import(model)
    functions.attach(model, plan.candidates)
    meta = {"mode": "cascade", "candidates": list(plan.candidates), "groups": plan.groups,
            "group_macs": plan.group_macs.tolist(), "configs": plan.configs.astype(int).tolist(),
            "config_bops": [int(b) for b in plan.bops(plan.configs)], "stem": plan.stem.name,
            "stem_bits": plan.max_bits, "bits_output": BITS_OUTPUT,
            "first_output": first_out, "first_layers": first_bits, "rerun_input": r.x2, "rerun_bits": r.bits2,
            "rerun_output": r.out}
    model.metadata_props.append(onnx.StringStringEntryProto(key=METADATA_KEY, value=json.dumps(meta)))
    return model


@dataclass
class _Rerun:
    """The cascade's second pass, written in place over the graph's nodes."""
    x2: str                       # the gathered rows' input
    bits2: str                    # their bits
    config: str                   # BitSelect's configuration per image
    stem_w: str                   # the stem's stored weight, shared by both passes
    group_bits: list[str]
    w_ints: dict[str, str]        # dynamic layer -> its stored integer weight
    biases: dict[str, str]        # dynamic layer -> its bias
    out: str
    nodes: list


def _rerun_pass(w: _Writer, plan: Plan, x_name: str, out_name: str, rerun_biases: dict) -> _Rerun:
    """The rerun: the network at per-image bits, on the gathered rows (built in place)."""
    x2, bits2, config = w.name("rerun/input"), w.name("rerun/bits"), w.name("config")
    w.fixed_layer(plan.stem, plan.max_bits, rerun_biases.get(plan.stem.name))
    stem_w = w.node_of(plan.stem)[1].input[1]
    group_bits = [w.name(f"bits/group{g}") for g in range(len(plan.groups))]
    cache: dict = {}
    for layer in plan.layers:
        w.dynamic_layer(layer, group_bits[layer.group], cache, rerun_biases.get(layer.name))
    w_ints = {n.name: n.input[2] for n in w.graph.node if n.op_type in ("DynQConv", "DynQGemm")}
    biases = {n.name: n.input[5] for n in w.graph.node if n.op_type in ("DynQConv", "DynQGemm")}
    rerun_out = w.name("rerun/" + out_name)
    rerun = []
    for n in w.graph.node:
        m = onnx.NodeProto()
        m.CopyFrom(n)
        m.input[:] = [x2 if i == x_name else i for i in m.input]
        m.output[:] = [rerun_out if o == out_name else o for o in m.output]
        rerun.append(m)
    return _Rerun(x2, bits2, config, stem_w, group_bits, w_ints, biases, rerun_out, rerun)


def _first_pass(w: _Writer, plan: Plan, orig: list, out_name: str, first_biases: dict, rerun_biases: dict,
                r: _Rerun) -> tuple[list, dict[str, int], str]:
    """A renamed copy of the float graph at the first configuration: its nodes, each
    layer's bits (weights and input), and its output's name."""
    first_cfg = plan.configs[0]
    layers = {l.name: l for l in [plan.stem] + plan.layers}
    rename: dict[str, str] = {}
    first: list[onnx.NodeProto] = []
    first_bits: dict[str, int] = {}
    for n in orig:
        ins = [rename.get(i, i) for i in n.input]
        for o in n.output:
            rename[o] = w.name("first/" + o)
        outs = [rename[o] for o in n.output]
        layer = layers.get(n.name)
        if layer is None:
            m = onnx.NodeProto()
            m.CopyFrom(n)
            m.name = w.name("first/" + n.name) if n.name else ""
            m.input[:], m.output[:] = ins, outs
            first.append(m)
            continue
        bits = plan.max_bits if layer is plan.stem else int(first_cfg[layer.group])
        layer_name = w.name("first/" + n.name)
        first_bits[layer_name] = bits
        q_nodes, xq = w.static_quant(layer, bits, x=ins[0], prefix="first/")
        first += q_nodes
        bias = None                        # None: the stored bias, which the rerun's layer reads too
        if layer.name in first_biases or (layer.name in rerun_biases and layer is not plan.stem):
            bias = w.const(f"first/{layer.name}/bias", first_biases.get(layer.name, layer.bias))
        if layer is plan.stem:
            m = onnx.NodeProto()
            m.CopyFrom(n)
            m.input[0], m.input[1] = xq, r.stem_w
            m.input[2:] = [bias] if bias is not None else ins[2:]
            m.name, m.output[:] = layer_name, outs
            first.append(m)
            continue
        w_nodes, wq = _derived_weight(w, layer, bits, r.w_ints[layer.name], "first/")
        first += w_nodes
        op_ins = [xq, wq, bias or r.biases[layer.name]]
        if layer.op == "Conv":
            first.append(helper.make_node("Conv", op_ins, outs, name=layer_name, **layer.attrs))
        else:
            first.append(helper.make_node("Gemm", op_ins, outs, name=layer_name, transB=1))
    return first, first_bits, rename[out_name]


def _choice(w: _Writer, plan: Plan, selector: Selector, first_out: str, r: _Rerun) -> tuple[list, dict]:
    """BitSelect on the margin (largest logit minus the second), and the rows to rerun."""
    top, top1, top2 = w.name("selector/top2"), w.name("selector/top1_logit"), w.name("selector/top2_logit")
    feats, mask, nz, idx = w.name("selector/margin"), w.name("rerun/mask"), w.name("rerun/nonzero"), w.name("rerun/rows")
    i0, i1, i2 = (w.const(f"selector/i{v}", np.array([v], np.int64)) for v in (0, 1, 2))
    zero = w.const("rerun/zero", np.int64(0))
    choose = [helper.make_node("TopK", [first_out, i2], [top, w.name("selector/top_index")], axis=1,
                               name=w.name("selector/TopK")),
              helper.make_node("Slice", [top, i0, i1, i1], [top1], name=w.name("selector/Slice1")),
              helper.make_node("Slice", [top, i1, i2, i1], [top2], name=w.name("selector/Slice2")),
              helper.make_node("Sub", [top1, top2], [feats], name=w.name("selector/margin")),
              helper.make_node("BitSelect", [feats, w.const("selector/W1", selector.w1),
                                             w.const("selector/b1", selector.b1), w.const("selector/W2", selector.w2),
                                             w.const("selector/b2", selector.b2),
                                             w.const("selector/bits_table", plan.configs.astype(np.float32))],
                               [r.config, BITS_OUTPUT], domain=domain.DOMAIN, name=w.name("selector/BitSelect")),
              helper.make_node("Greater", [r.config, zero], [mask], name=w.name("rerun/Greater")),
              helper.make_node("NonZero", [mask], [nz], name=w.name("rerun/NonZero")),
              helper.make_node("Reshape", [nz, w.const("rerun/flat", np.array([-1], np.int64))], [idx],
                               name=w.name("rerun/Reshape"))]
    return choose, {"idx": idx, "i0": i0, "zero": zero}


def _rerun_branch(w: _Writer, x_name: str, out_name: str, first_out: str, r: _Rerun, c: dict) -> list:
    """The rerun, only when some row needs it: user graphs need not accept an empty batch
    (a Reshape to [0, -1] of no elements is invalid), so it sits in an If whose other
    branch gives no rows (an empty slice of the first pass: a branch may not return an
    outer value as it is); the scatter of no rows keeps the first pass."""
    idx, i0, zero = c["idx"], c["i0"], c["zero"]
    gather = [helper.make_node("Gather", [x_name, idx], [r.x2], axis=0, name=w.name("rerun/GatherInput")),
              helper.make_node("Gather", [BITS_OUTPUT, idx], [r.bits2], axis=0, name=w.name("rerun/GatherBits"))]
    gather += [helper.make_node("Gather", [r.bits2, w.const(f"bits/index{g}", np.int64(g))], [gb], axis=1,
                                name=w.name(f"bits/Gather{g}")) for g, gb in enumerate(r.group_bits)]
    cond, n_rows, none = w.name("rerun/any"), w.name("rerun/count"), w.name("rerun/no_rows")
    updates, idx_col = w.name("rerun/updates"), w.name("rerun/rows_col")
    then_graph = helper.make_graph(gather + r.nodes, "rerun", [],
                                   [helper.make_tensor_value_info(r.out, TensorProto.FLOAT, None)])
    else_graph = helper.make_graph([helper.make_node("Slice", [first_out, i0, i0, i0], [none])], "keep", [],
                                   [helper.make_tensor_value_info(none, TensorProto.FLOAT, None)])
    return [helper.make_node("Size", [idx], [n_rows], name=w.name("rerun/Size")),
            helper.make_node("Greater", [n_rows, zero], [cond], name=w.name("rerun/GreaterCount")),
            helper.make_node("If", [cond], [updates], then_branch=then_graph, else_branch=else_graph,
                             name=w.name("rerun/If")),
            helper.make_node("Reshape", [idx, w.const("rerun/col", np.array([-1, 1], np.int64))], [idx_col],
                             name=w.name("rerun/ReshapeRows")),
            helper.make_node("ScatterND", [first_out, idx_col, updates], [out_name],
                             name=w.name("rerun/ScatterND"))]


def _batch_dim(model: onnx.ModelProto):
    dims = model.graph.input[0].type.tensor_type.shape.dim
    if dims and dims[0].dim_param:
        return dims[0].dim_param
    if dims and dims[0].dim_value:
        return dims[0].dim_value
    return "N"


