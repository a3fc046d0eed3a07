"""Dynamic precision, the cascade model: a first pass at one configuration for every
image, a second at a costlier one for the images the first is unsure of.

Both passes are fixed-precision networks written in the integer-kernel form of
:mod:`.integer` and read the same stored integers; ``BitSelect`` on the first pass's
margin (largest logit minus the second) picks, per image, to keep that result
(configuration 0) or to run the network again at the last configuration; the rows to
rerun are gathered, run through the second pass inside an ``If`` (user graphs need not
accept an empty batch) and scattered back into the first pass's logits.
"""

from __future__ import annotations

import numpy as np
import onnx
import onnx_ir as ir

from datafree.ops import domain, schemas
from datafree.ops.selector import Selector

from ...graph import UniqueNames
from .integer import config_model
from .plan import BITS_OUTPUT, Plan
from .writing import _node, _Writer, bits_output, with_functions

FIRST = "first/"


def _rename_first(graph: ir.Graph, keep: set[str]) -> None:
    """Every value and node of the first pass prefixed with ``first/``, but for ``keep``
    (the input and the stored integers both passes read); the initializers keep their order."""
    inits = list(graph.initializers.values())
    for v in [*inits, *(o for n in graph for o in n.outputs)]:
        if v.name not in keep:
            v.name = FIRST + v.name           # a renamed initializer moves to the end of the table
    for v in inits:
        del graph.initializers[v.name]
        graph.register_initializer(v)
    for n in graph:
        if n.name:
            n.name = FIRST + n.name


def _names(first: ir.Graph, second: ir.Graph) -> UniqueNames:
    """Fresh names avoiding every value of both passes."""
    taken = set()
    for g in (first, second):
        taken |= set(g.initializers) | {v.name for v in g.inputs}
        taken |= {v.name for n in g for v in (*n.inputs, *n.outputs) if v is not None}
    return UniqueNames.avoiding(taken)


def _constant_part(nodes: list[ir.Node], constants: set[str]) -> tuple[list, list]:
    """(nodes computing only from constants, the others): the second pass's weights
    derived from the stored integers go in the main graph, where onnxruntime folds
    them at load; inside the If it does not, and the layers would not fuse.  Its
    DequantizeLinear nodes stay with their layers (onnxruntime fuses them, never folds)."""
    known, const, rest = set(constants), [], []
    for n in nodes:
        if n.op_type not in ("QuantizeLinear", "DequantizeLinear") and n.inputs and \
                all(i.name in known for i in n.inputs if i is not None):
            const.append(n)
            known.update(o.name for o in n.outputs)
        else:
            rest.append(n)
    return const, rest


class _Rerun:
    """The cascade's second pass, to be run on the gathered rows."""

    def __init__(self, x2: ir.Value, bits2: str, config: str, out: ir.Value, nodes: list):
        self.x2, self.bits2, self.config, self.out, self.nodes = x2, bits2, config, out, nodes


def _untyped(nodes) -> None:
    """No shapes on the values ``nodes`` make: the rerun's have the rerun's batch, not the input's."""
    for n in nodes:
        for v in n.outputs:
            v.type, v.shape = None, None


def _second_pass(w: _Writer, second: ir.Model, shared: set[str], x2: ir.Value,
                 out_name: str) -> tuple[list, list, ir.Value]:
    """The second pass's nodes moved out of ``second``, reading ``x2`` and the first
    pass's stored integers: (constant nodes, the others, its output, named ``out_name``)."""
    graph, sg = w.graph, second.graph
    constants = set(sg.initializers) | shared
    for name in shared:
        ir.convenience.replace_all_uses_with(sg.initializers[name], graph.initializers[name])
    ir.convenience.replace_all_uses_with(sg.inputs[0], x2)
    out = sg.outputs[0]
    out.name = out_name
    sg.inputs.clear()
    sg.outputs.clear()
    nodes = list(sg)
    sg.remove(nodes)
    for name, v in list(sg.initializers.items()):
        del sg.initializers[name]
        if name not in shared:
            graph.register_initializer(v)
    return *_constant_part(nodes, constants), out


def build_cascade(plan: Plan, selector: Selector) -> onnx.ModelProto:
    """The cascade model (module docstring)."""
    schemas.register()
    first, first_bits, shared = config_model(plan, plan.configs[0])      # each with its own biases
    second, _, _ = config_model(plan, plan.configs[-1])
    graph = first.graph
    x, out = graph.inputs[0], graph.outputs[0]
    x_name, out_name, out_type, out_shape = x.name, out.name, out.type, out.shape
    _rename_first(graph, shared | {x_name})
    w = _Writer(plan, first)
    w.name = _names(graph, second.graph)
    w.name.taken |= {x_name, out_name}
    x2 = ir.Value(name=w.name("rerun/input"))
    bits2, config, rerun_out = w.name("rerun/bits"), w.name("config"), w.name("rerun/" + out_name)
    constant, rerun_nodes, rerun_value = _second_pass(w, second, shared, x2, rerun_out)
    _untyped([*graph, *rerun_nodes])
    r = _Rerun(x2, bits2, config, rerun_value, rerun_nodes)
    graph.outputs.clear()
    graph.extend(constant)
    choose, consts = _choice(w, plan, selector, out, r)
    graph.extend(choose)
    branch = _rerun_branch(w, x, out, r, consts, out_name)
    graph.extend(branch)
    scattered = branch[-1].outputs[0]
    scattered.type, scattered.shape = out_type, out_shape
    graph.outputs.append(scattered)
    model = w.finish()
    bits_output(model, consts["bits"], len(plan.groups))
    meta = {"mode": "cascade", "candidates": list(plan.candidates), "groups": plan.groups,
            "group_macs": plan.group_macs.tolist(), "configs": plan.configs.astype(int).tolist(),
            "config_bops": [int(b) for b in plan.bops(plan.configs)], "stem": plan.stem.name,
            "stem_bits": plan.max_bits, "bits_output": BITS_OUTPUT,
            "first_output": out.name, "first_layers": {FIRST + k: v for k, v in first_bits.items()},
            "rerun_input": r.x2.name, "rerun_bits": r.bits2, "rerun_output": r.out.name}
    return with_functions(model, plan, meta)


def _choice(w: _Writer, plan: Plan, selector: Selector, first_out: ir.Value, r: _Rerun) -> tuple[list, dict]:
    """BitSelect on the margin (largest logit minus the second), and the rows to rerun."""
    top, top1, top2 = w.name("selector/top2"), w.name("selector/top1_logit"), w.name("selector/top2_logit")
    feats, mask, nz, idx = w.name("selector/margin"), w.name("rerun/mask"), w.name("rerun/nonzero"), w.name("rerun/rows")
    i0, i1, i2 = (w.const(f"selector/i{v}", np.array([v], np.int64)) for v in (0, 1, 2))
    zero = w.const("rerun/zero", np.int64(0))
    topk = _node("TopK", [first_out, i2], [top, w.name("selector/top_index")], name=w.name("selector/TopK"), axis=1)
    s1 = _node("Slice", [topk.outputs[0], i0, i1, i1], [top1], name=w.name("selector/Slice1"))
    s2 = _node("Slice", [topk.outputs[0], i1, i2, i1], [top2], name=w.name("selector/Slice2"))
    sub = _node("Sub", [s1.outputs[0], s2.outputs[0]], [feats], name=w.name("selector/margin"))
    select = _node("BitSelect", [sub.outputs[0], w.const("selector/W1", selector.w1),
                                 w.const("selector/b1", selector.b1), w.const("selector/W2", selector.w2),
                                 w.const("selector/b2", selector.b2),
                                 w.const("selector/bits_table", plan.configs.astype(np.float32))],
                   [r.config, BITS_OUTPUT], name=w.name("selector/BitSelect"), domain_=domain.DOMAIN)
    greater = _node("Greater", [select.outputs[0], zero], [mask], name=w.name("rerun/Greater"))
    nonzero = _node("NonZero", [greater.outputs[0]], [nz], name=w.name("rerun/NonZero"))
    rows = _node("Reshape", [nonzero.outputs[0], w.const("rerun/flat", np.array([-1], np.int64))], [idx],
                 name=w.name("rerun/Reshape"))
    return ([topk, s1, s2, sub, select, greater, nonzero, rows],
            {"idx": rows.outputs[0], "i0": i0, "zero": zero, "bits": select.outputs[1]})


def _rerun_branch(w: _Writer, x: ir.Value, first_out: ir.Value, r: _Rerun, c: dict, out_name: str) -> list[ir.Node]:
    """The rerun, only when some row needs it: user graphs need not accept an empty batch
    (a Reshape to [0, -1] of no elements is invalid), so it sits in an If whose other
    branch gives no rows (an empty slice of the first pass: a branch may not return an
    outer value as it is); the scatter of no rows keeps the first pass."""
    idx, i0, zero = c["idx"], c["i0"], c["zero"]
    gather = [_node("Gather", [x, idx], [r.x2], name=w.name("rerun/GatherInput"), axis=0),
              _node("Gather", [c["bits"], idx], [r.bits2], name=w.name("rerun/GatherBits"), axis=0)]
    cond, n_rows, none = w.name("rerun/any"), w.name("rerun/count"), w.name("rerun/no_rows")
    updates, idx_col = w.name("rerun/updates"), w.name("rerun/rows_col")
    r.out.type = ir.TensorType(ir.DataType.FLOAT)
    then_graph = ir.Graph([], [r.out], nodes=[*gather, *r.nodes], name="rerun")
    keep = _node("Slice", [first_out, i0, i0, i0], [none])
    keep.outputs[0].type = ir.TensorType(ir.DataType.FLOAT)
    else_graph = ir.Graph([], [keep.outputs[0]], nodes=[keep], name="keep")
    keep.name = None                           # the branch's one node needs no name (ir.Graph gives one)
    size = _node("Size", [idx], [n_rows], name=w.name("rerun/Size"))
    greater = _node("Greater", [size.outputs[0], zero], [cond], name=w.name("rerun/GreaterCount"))
    branch = _node("If", [greater.outputs[0]], [updates], name=w.name("rerun/If"),
                   then_branch=then_graph, else_branch=else_graph)
    col = _node("Reshape", [idx, w.const("rerun/col", np.array([-1, 1], np.int64))], [idx_col],
                name=w.name("rerun/ReshapeRows"))
    scatter = _node("ScatterND", [first_out, col.outputs[0], branch.outputs[0]], [out_name],
                    name=w.name("rerun/ScatterND"))
    return [size, greater, branch, col, scatter]
