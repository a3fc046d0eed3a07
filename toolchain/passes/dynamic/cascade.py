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

import json

import numpy as np
import onnx
from onnx import TensorProto, helper

from datafree.ops import domain, functions, schemas
from datafree.ops.selector import Selector

from ...graph import UniqueNames
from .integer import config_proto
from .plan import BITS_OUTPUT, METADATA_KEY, Plan
from .writing import _batch_dim, _Writer

FIRST = "first/"


def _renamed(proto: onnx.ModelProto, rename) -> tuple[list, list]:
    """The graph's nodes and initializers with every value renamed by ``rename``."""
    nodes, inits = [], []
    for n in proto.graph.node:
        m = onnx.NodeProto()
        m.CopyFrom(n)
        m.input[:] = [rename(i) if i else i for i in m.input]
        m.output[:] = [rename(o) for o in m.output]
        nodes.append(m)
    for t in proto.graph.initializer:
        c = onnx.TensorProto()
        c.CopyFrom(t)
        c.name = rename(t.name)
        inits.append(c)
    return nodes, inits


def _constant_part(nodes: list, constants: set[str]) -> tuple[list, list]:
    """(nodes computing only from constants, the others): the second pass's weights
    derived from the stored integers go in the main graph, where onnxruntime folds
    them at load; inside the If it does not, and the layers would not fuse.  Its
    DequantizeLinear nodes stay with their layers (onnxruntime fuses them, never folds)."""
    known, const, rest = set(constants), [], []
    for n in nodes:
        if n.op_type not in ("QuantizeLinear", "DequantizeLinear") and n.input and \
                all(i in known for i in n.input if i):
            const.append(n)
            known.update(n.output)
        else:
            rest.append(n)
    return const, rest


class _Rerun:
    """The cascade's second pass, to be run on the gathered rows."""

    def __init__(self, x2: str, bits2: str, config: str, out: str, nodes: list):
        self.x2, self.bits2, self.config, self.out, self.nodes = x2, bits2, config, out, nodes
        self.group_bits: list[str] = []          # a fixed configuration reads no per-image bits


def build_cascade(plan: Plan, selector: Selector) -> onnx.ModelProto:
    """The cascade model (module docstring)."""
    schemas.register()
    x_name, out_name = plan.base.graph.input[0].name, plan.base.graph.output[0].name
    first, first_bits, shared = config_proto(plan, plan.configs[0])      # each with its own biases
    second, _, _ = config_proto(plan, plan.configs[-1])
    keep = shared | {x_name}
    first_nodes, first_inits = _renamed(first, lambda v: v if v in keep else FIRST + v)
    for n in first_nodes:
        n.name = FIRST + n.name if n.name else ""
    w = _Writer(plan)
    taken = {v for n in first_nodes for v in (*n.input, *n.output)} | {t.name for t in first_inits}
    taken |= {v for n in second.graph.node for v in (*n.input, *n.output)} | {t.name for t in second.graph.initializer}
    w.name = UniqueNames.avoiding(taken | {x_name, out_name})
    x2, bits2, config, rerun_out = w.name("rerun/input"), w.name("rerun/bits"), w.name("config"), \
        w.name("rerun/" + out_name)
    rerun_nodes, rerun_inits = _renamed(second, lambda v: {x_name: x2, out_name: rerun_out}.get(v, v))
    constant, rerun_nodes = _constant_part(rerun_nodes, {t.name for t in rerun_inits} | shared)
    r = _Rerun(x2, bits2, config, rerun_out, rerun_nodes)
    first_out = FIRST + out_name
    choose, consts = _choice(w, plan, selector, first_out, r)
    branch = _rerun_branch(w, x_name, out_name, first_out, r, consts)
    del w.graph.node[:]
    w.graph.node.extend(first_nodes + constant + choose + branch)
    del w.graph.initializer[:]
    w.graph.initializer.extend(first_inits + [t for t in rerun_inits if t.name not in shared])
    del w.graph.value_info[:]          # the rerun's values have the rerun's batch, not the input's
    model = w.finish()
    model.graph.output.append(helper.make_tensor_value_info(BITS_OUTPUT, TensorProto.FLOAT,
                                                            [_batch_dim(model), len(plan.groups)]))
    del model.opset_import[:]
    model.opset_import.extend(first.opset_import)
    domain.add_opset_import(model)
    functions.attach(model, plan.candidates)
    meta = {"mode": "cascade", "candidates": list(plan.candidates), "groups": plan.groups,
            "group_macs": plan.group_macs.tolist(), "configs": plan.configs.astype(int).tolist(),
            "config_bops": [int(b) for b in plan.bops(plan.configs)], "stem": plan.stem.name,
            "stem_bits": plan.max_bits, "bits_output": BITS_OUTPUT,
            "first_output": first_out, "first_layers": {FIRST + k: v for k, v in first_bits.items()},
            "rerun_input": r.x2, "rerun_bits": r.bits2, "rerun_output": r.out}
    model.metadata_props.append(onnx.StringStringEntryProto(key=METADATA_KEY, value=json.dumps(meta)))
    return model


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


