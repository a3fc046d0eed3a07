"""A differentiable torch copy of a normalised ONNX graph.

``TorchGraph(model)`` interprets the graph node by node, in the topological order
``ingest.load`` leaves it in, with torch functional ops.  Initializers become
buffers read fresh from the ``ir.Model`` when the module is built (float types as
float32, integer types kept), so a module built after a pass changed weights sees
the change.  Every floating-point value is float32 inside the module.  The module
lives on the device of the run (:mod:`.device`) when it is built; inputs are moved
there, and the values it makes (constants, shapes) are made there.

Why our own interpreter rather than onnx2torch: it has to run the graphs ingest
produces (dynamo exports with Pad-19, opset 21 Q/DQ with int4) and expose every
intermediate value by its ONNX name, with hooks, so a generator can read BN inputs
and a calibrator can inject activation fake-quant at any value.

QuantizeLinear rounds with a straight-through estimator (the gradient passes the
rounding unchanged, and is cut outside the integer range), so gradients also flow
through compressed Q/DQ models.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass

import numpy as np
import onnx_ir as ir
import torch

from . import device as dev
from .errors import UserError
from .torchops import (  # noqa: F401
    _INT_RANGES,
    _NEEDS_N_OUT,
    _OPS,
    _quantize,
    _to_torch,
    _torch_dtype,
    supported_ops,
)
from .torchops_nn import lstm_refusal

Hook = Callable[[torch.Tensor], torch.Tensor]
Tensor = torch.Tensor


@dataclass
class _Step:
    op: str
    name: str
    fn: Callable
    inputs: list[str | None]
    outputs: list[str]
    attrs: dict


class TorchGraph(torch.nn.Module):
    """Interpret ``model``'s graph with torch ops; see the module docstring."""

    def __init__(self, model: ir.Model, hooks: Mapping[str, Hook] | None = None):
        super().__init__()
        graph = model.graph
        self.input_names = [v.name for v in graph.inputs]
        self.output_names = [v.name for v in graph.outputs]
        self._out_dtypes = {v.name: v.dtype for v in graph.outputs}
        self.hooks: dict[str, Hook] = dict(hooks or {})
        self._const: dict[str, str] = {}
        for i, (name, value) in enumerate(graph.initializers.items()):
            if value.const_value is None:
                continue
            tensor = value.const_value
            buf = f"c{i}"
            self.register_buffer(buf, _to_torch(tensor.numpy(), tensor.dtype), persistent=False)
            self._const[name] = buf
        self._steps: list[_Step] = []
        for node in graph:
            self._steps.append(self._compile(node))
        self._last_use = self._last_uses()
        self.device = dev.current()
        self.to(self.device)

    def _compile(self, node: ir.Node) -> _Step:
        if node.domain not in ("", "ai.onnx") or node.op_type not in _OPS:
            domain = node.domain or "ai.onnx"
            raise UserError(f"cannot build a differentiable copy: op {domain}::{node.op_type} "
                            f"({node.name}) is not supported")
        attrs = {k: a.value for k, a in node.attributes.items()}
        why = lstm_refusal(attrs, list(node.inputs)) if node.op_type == "LSTM" else None
        if why:
            raise UserError(f"cannot build a differentiable copy: LSTM ({node.name}) with {why} is not supported")
        fn = _OPS[node.op_type]
        if node.op_type in _NEEDS_N_OUT:
            base, n_out = fn, len(node.outputs)
            fn = lambda *xs, attrs, _f=base, _n=n_out: _f(*xs, attrs=attrs, n_out=_n)  # noqa: E731
        elif node.op_type == "QuantizeLinear":
            zp = node.inputs[2] if len(node.inputs) > 2 else None
            dt = node.outputs[0].dtype or (zp.dtype if zp is not None else None)
            fn = lambda *xs, attrs, _dt=dt: _quantize(*xs, attrs=attrs, zp_dtype=_dt)  # noqa: E731
        # trailing missing optional inputs are dropped; inner ones stay None
        inputs = [v.name if v is not None else None for v in node.inputs]
        while inputs and inputs[-1] is None:
            inputs.pop()
        outputs = [v.name for v in node.outputs]
        return _Step(node.op_type, node.name, fn, inputs, outputs, attrs)

    def _last_uses(self) -> dict[str, int]:
        last: dict[str, int] = {}
        for i, step in enumerate(self._steps):
            for name in step.inputs:
                if name is not None:
                    last[name] = i
        return last

    # ----------------------------------------------------------------- running
    def bn_nodes(self) -> list[tuple[str, str, Tensor, Tensor]]:
        """(node name, input value name, running mean, running var) of every BatchNormalization
        whose statistics are constants."""
        out = []
        for step in self._steps:
            if step.op == "BatchNormalization" and all(n in self._const for n in step.inputs[3:5]):
                mean, var = (self._value(step.inputs[i], {}) for i in (3, 4))
                out.append((step.name, step.inputs[0], mean, var))
        return out

    def constant(self, name: str) -> Tensor:
        """The buffer holding initializer ``name``."""
        return getattr(self, self._const[name])

    def _value(self, name: str | None, env: dict[str, Tensor]) -> Tensor | None:
        if name is None or name == "":
            return None
        if name in env:
            return env[name]
        buf = self._const.get(name)
        if buf is None:
            raise KeyError(f"value {name!r} is not computed yet")
        return getattr(self, buf)

    def forward(self, *inputs: Tensor):
        result = self.run(dict(zip(self.input_names, inputs)))
        outs = tuple(result[n] for n in self.output_names)
        return outs[0] if len(outs) == 1 else outs

    def run(self, inputs: Mapping[str, Tensor] | Tensor | np.ndarray, capture: Iterable[str] = (),
            stop_after: set[str] | None = None, hooks: Mapping[str, Hook] | None = None) -> dict[str, Tensor]:
        """Captured values (and graph outputs reached) by ONNX value name.

        ``stop_after``: stop as soon as all these values are computed (graph outputs
        then need not be in the result).  ``hooks`` add to (and override) ``self.hooks``.
        """
        if not isinstance(inputs, Mapping):
            inputs = {self.input_names[0]: inputs}
        all_hooks = {**self.hooks, **(hooks or {})}
        keep = set(capture) | set(self.output_names)
        pending = set(stop_after) if stop_after else None
        env: dict[str, Tensor] = {}
        for name, x in inputs.items():
            if name not in self.input_names:
                raise UserError(f"model has no input named {name!r} (inputs: {', '.join(self.input_names)})")
            x = torch.as_tensor(x, device=self.device)
            if x.is_floating_point() and x.dtype != torch.float32:
                x = x.float()
            hook = all_hooks.get(name)
            env[name] = hook(x) if hook is not None else x
            if pending is not None:
                pending.discard(name)
        result = {n: env[n] for n in keep if n in env}
        if pending is not None and not pending:
            return result
        for i, step in enumerate(self._steps):
            args = [self._value(n, env) for n in step.inputs]
            out = step.fn(*args, attrs=step.attrs)
            outs = out if isinstance(out, tuple) else (out,)
            for name, value in zip(step.outputs, outs):
                if not name:
                    continue
                hook = all_hooks.get(name)
                if hook is not None:
                    value = hook(value)
                env[name] = value
                if name in keep:
                    result[name] = self._output_cast(name, value)
                if pending is not None:
                    pending.discard(name)
            if pending is not None and not pending:
                break
            for name in step.inputs:  # free what no later node reads
                if name is not None and self._last_use.get(name) == i and name not in keep:
                    env.pop(name, None)
        return result

    def region(self, feeds: Iterable[str], targets: Iterable[str]) -> list[int]:
        """Indices of the steps computing ``targets`` from the values ``feeds`` (and constants)."""
        fed, wanted = set(feeds), set(targets)
        producer = {o: i for i, s in enumerate(self._steps) for o in s.outputs if o}
        needed, stack = set(), [n for n in wanted if n not in fed]
        while stack:
            name = stack.pop()
            if name in fed or name in self._const:
                continue
            if name not in producer:
                raise KeyError(f"value {name!r} cannot be computed from {sorted(fed)}")
            i = producer[name]
            if i in needed:
                continue
            needed.add(i)
            stack += [n for n in self._steps[i].inputs if n]
        return sorted(needed)

    def run_region(self, feeds: Mapping[str, Tensor], targets: Iterable[str],
                   steps: list[int] | None = None, hooks: Mapping[str, Hook] | None = None) -> dict[str, Tensor]:
        """``targets`` computed from ``feeds``: any values by name, initializers included
        (a fed initializer overrides the stored one, e.g. with a trainable tensor)."""
        targets = list(targets)
        steps = self.region(feeds, targets) if steps is None else steps
        all_hooks = {**self.hooks, **(hooks or {})}
        env = dict(feeds)
        for i in steps:
            step = self._steps[i]
            out = step.fn(*[self._value(n, env) for n in step.inputs], attrs=step.attrs)
            for name, value in zip(step.outputs, out if isinstance(out, tuple) else (out,)):
                if name:
                    hook = all_hooks.get(name)
                    env[name] = hook(value) if hook is not None else value
        return {n: env[n] for n in targets}

    def _output_cast(self, name: str, value: Tensor) -> Tensor:
        dt = self._out_dtypes.get(name)
        if dt in _INT_RANGES and value.is_floating_point():  # QuantizeLinear output
            return value.to(_torch_dtype(dt))
        return value
