"""Run a dynamic model by grouping each batch by configuration.

A dynamic model is split, in memory, into

* the *selector* model: everything the ``BitSelect`` node needs, ending at its
  outputs (configuration index and bits per image), and
* one *specialised* model per configuration, made only of standard ops: each
  ``DynQuant`` becomes a fixed fake-quantization at that configuration's
  bit-width, each ``DynQConv`` / ``DynQGemm`` a plain Conv / Gemm with the weights
  requantised once at that bit-width (``datafree.ops.reference``), ``BitSelect``
  is gone.

A batch runs the selector, then each configuration's specialised model on its
images only (built on first use and cached).  Every image costs one pass of the
network at its own precision, in onnxruntime's native kernels; the function
bodies instead run every candidate on the whole batch, and the Python kernels pay
a copy of every output through Python.  The stem runs twice (in the selector and
in the specialised model): it is one layer.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import onnx
import onnxruntime as ort
from onnx import helper, numpy_helper

from datafree.ops import domain, reference


def _consts(model: onnx.ModelProto) -> dict[str, np.ndarray]:
    return {t.name: numpy_helper.to_array(t) for t in model.graph.initializer}


def _attr(node: onnx.NodeProto, name: str, default=None):
    for a in node.attribute:
        if a.name == name:
            return helper.get_attribute_value(a)
    return default


def _prune(model: onnx.ModelProto, outputs: list[str]) -> onnx.ModelProto:
    """Keep only the nodes needed for ``outputs``."""
    needed, keep = set(outputs), []
    for node in reversed(model.graph.node):
        if any(o in needed for o in node.output):
            keep.append(node)
            needed.update(i for i in node.input if i)
    keep.reverse()
    out = onnx.ModelProto()
    out.CopyFrom(model)
    del out.graph.node[:]
    out.graph.node.extend(keep)
    inits = [t for t in out.graph.initializer if t.name in needed]
    del out.graph.initializer[:]
    out.graph.initializer.extend(inits)
    return out


def selector_model(model: onnx.ModelProto, extra: tuple[str, ...] = ()) -> tuple[onnx.ModelProto, list[str]]:
    node = next(n for n in model.graph.node if n.domain == domain.DOMAIN and n.op_type == "BitSelect")
    outs = list(node.output) + list(extra)
    m = _prune(model, outs)
    del m.graph.output[:]
    m.graph.output.extend(helper.make_empty_tensor_value_info(o) for o in outs)
    return m, outs


def specialise(model: onnx.ModelProto, config_bits: np.ndarray) -> onnx.ModelProto:
    """The standard-op model of one configuration (bits per group, as in the bits table)."""
    consts = _consts(model)
    group_of: dict[str, int] = {}
    bits_out = None
    for n in model.graph.node:
        if n.domain == domain.DOMAIN and n.op_type == "BitSelect":
            bits_out = n.output[1]
        elif n.op_type == "Gather" and bits_out is not None and n.input[0] == bits_out:
            group_of[n.output[0]] = int(consts[n.input[1]])
    new_nodes, new_inits = [], []

    def const(name: str, value) -> str:
        new_inits.append(numpy_helper.from_array(np.array(value, order="C"), name))
        return name

    for n in model.graph.node:
        if n.domain != domain.DOMAIN:
            if not (n.op_type == "Gather" and n.output[0] in group_of):
                new_nodes.append(n)
            continue
        if n.op_type == "BitSelect":
            continue
        b = int(config_bits[group_of[n.input[1]]])
        p = n.name or n.output[0]
        if n.op_type == "DynQuant":
            signed = bool(_attr(n, "signed", 0))
            lo, hi = reference.act_grid(b, signed)
            s = const(f"{p}/s{b}", np.float32(consts[n.input[2]][b]))
            z = const(f"{p}/z{b}", np.float32(consts[n.input[3]][b]))
            t = [f"{p}/t{i}" for i in range(5)]
            new_nodes += [helper.make_node("Div", [n.input[0], s], [t[0]]),
                          helper.make_node("Round", [t[0]], [t[1]]),
                          helper.make_node("Add", [t[1], z], [t[2]]),
                          helper.make_node("Clip", [t[2], const(f"{p}/lo", np.float32(lo)),
                                                    const(f"{p}/hi", np.float32(hi))], [t[3]]),
                          helper.make_node("Sub", [t[3], z], [t[4]]),
                          helper.make_node("Mul", [t[4], s], [n.output[0]])]
        else:
            w = reference.derive_weight(consts[n.input[2]], consts[n.input[3]], consts[n.input[4]], b)
            ins = [n.input[0], const(f"{p}/w{b}", w), n.input[5]]
            if n.op_type == "DynQConv":
                attrs = {a.name: helper.get_attribute_value(a) for a in n.attribute}
                new_nodes.append(helper.make_node("Conv", ins, [n.output[0]], name=n.name, **attrs))
            else:
                new_nodes.append(helper.make_node("Gemm", ins, [n.output[0]], name=n.name, transB=1))
    out = onnx.ModelProto()
    out.CopyFrom(model)
    del out.graph.node[:]
    out.graph.node.extend(new_nodes)
    out.graph.initializer.extend(new_inits)
    outputs = [o for o in out.graph.output if o.name != bits_out]
    del out.graph.output[:]
    out.graph.output.extend(outputs)
    out = _prune(out, [o.name for o in outputs])
    del out.functions[:]
    opsets = [o for o in out.opset_import if o.domain != domain.DOMAIN]
    del out.opset_import[:]
    out.opset_import.extend(opsets)
    return out


def rerun_model(model: onnx.ModelProto, meta: dict) -> onnx.ModelProto:
    """A cascade's second pass as a model of its own: the graph input goes straight
    into the rerun layers (no gathering), their bits are the selector's, and their
    logits are the output (no scattering).  :func:`specialise` then gives each
    configuration's standard-op network."""
    bits_node = next(n for n in model.graph.node if n.domain == domain.DOMAIN and n.op_type == "BitSelect")
    x_name, out_name = model.graph.input[0].name, model.graph.output[0].name
    rename = {meta["rerun_input"]: x_name, meta["rerun_bits"]: bits_node.output[1]}
    out = onnx.ModelProto()
    out.CopyFrom(model)
    nodes = []
    flat = []
    for n in out.graph.node:              # the rerun branch's nodes, in the main graph
        branch = next((a.g for a in n.attribute if a.name == "then_branch"), None)
        flat.extend(branch.node if n.op_type == "If" and branch is not None else [n])
    for n in flat:
        if any(o in rename or o == out_name for o in n.output):
            continue                      # the gathering and the scattering (which writes the output)
        n.input[:] = [rename.get(i, i) for i in n.input]
        n.output[:] = [out_name if o == meta["rerun_output"] else o for o in n.output]
        nodes.append(n)
    del out.graph.node[:]
    out.graph.node.extend(nodes)
    return out


@dataclass
class ValueInfo:
    """What ``get_outputs()`` reports for a grouped session (as onnxruntime's NodeArg)."""

    name: str
    shape: list
    type: str = "tensor(float)"


def _info(v: onnx.ValueInfoProto) -> ValueInfo:
    dims = [d.dim_param or (d.dim_value if d.HasField("dim_value") else None) for d in v.type.tensor_type.shape.dim]
    return ValueInfo(v.name, dims)


class GroupedRunner:
    """Selector, then each configuration's specialised model on its own images."""

    def __init__(self, model: onnx.ModelProto, options: ort.SessionOptions, providers: list[str], meta: dict):
        self.model = model
        self._options, self._providers = options, providers
        self.cascade = meta.get("mode") == "cascade"
        first = (meta["first_output"],) if self.cascade else ()
        sel, (self._config_name, self._bits_name, *self._first) = selector_model(model, first)
        self._selector = self._session(sel)
        self._network = rerun_model(model, meta) if self.cascade else model
        table_name = next(n for n in model.graph.node if n.op_type == "BitSelect").input[5]
        self.table = next(numpy_helper.to_array(t) for t in model.graph.initializer if t.name == table_name)
        self._per_config: dict[int, ort.InferenceSession] = {}
        self.outputs = [o.name for o in model.graph.output]
        self.output_info = [_info(o) for o in model.graph.output]
        inits = {t.name for t in model.graph.initializer}
        self.input_info = [_info(i) for i in model.graph.input if i.name not in inits]
        self.inputs = [i.name for i in model.graph.input]

    def _session(self, m: onnx.ModelProto) -> ort.InferenceSession:
        return ort.InferenceSession(m.SerializeToString(), self._options, providers=self._providers)

    def config_session(self, k: int) -> ort.InferenceSession:
        if k not in self._per_config:
            self._per_config[k] = self._session(specialise(self._network, self.table[k]))
        return self._per_config[k]

    def run(self, output_names, feeds: dict[str, np.ndarray]) -> list[np.ndarray]:
        config, bits, *first = self._selector.run([self._config_name, self._bits_name, *self._first],
                                                  {k: v for k, v in feeds.items() if k in
                                                   {i.name for i in self._selector.get_inputs()}})
        names = output_names or self.outputs
        rest = [n for n in self.outputs if n != self._bits_name]
        results: dict[str, np.ndarray] = {}
        if self.cascade:                  # configuration 0 keeps the first pass; the others rerun
            results[rest[0]] = first[0].copy()
        for k in np.unique(config):
            if self.cascade and k == 0:
                continue
            idx = np.nonzero(config == k)[0]
            sess = self.config_session(int(k))
            part = sess.run(rest, {name: v[idx] for name, v in feeds.items()})
            for name, val in zip(rest, part):
                if name not in results:
                    results[name] = np.empty((len(config),) + val.shape[1:], dtype=val.dtype)
                results[name][idx] = val
        results[self._bits_name] = bits
        return [results[n] for n in names]
