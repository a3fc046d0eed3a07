"""Latency of a model under onnxruntime: warmup, repeats, several batch sizes.

    from datafree.runtime.bench import measure
    rows = measure("model.onnx", batch_sizes=(1, 32))   # [{"batch", "median_ms", "p90_ms", ...}]

Inputs are random normal of the model's input shape (symbolic dims other than the
batch must be given through ``shape``).  Used by the benchmarks and ``report --measure``.
"""

from __future__ import annotations

import time
from collections.abc import Sequence

import numpy as np

from datafree.ops.errors import UserError

from .session import InferenceSession


def _shape(session: InferenceSession, batch: int, shape: Sequence[int] | None) -> tuple[int, ...]:
    if shape is not None:
        return (batch, *shape[1:])
    dims = session.get_inputs()[0].shape
    rest = dims[1:]
    if not all(isinstance(d, int) and d > 0 for d in rest):
        raise UserError(f"input shape {dims} has unknown dimensions: give shape=")
    return (batch, *rest)


def measure(model, *, batch_sizes: Sequence[int] = (1, 8, 32), warmup: int = 3, repeats: int = 20,
            threads: int | None = None, use_kernels: bool = True, shape: Sequence[int] | None = None,
            seed: int = 0) -> list[dict[str, float]]:
    """Median and p90 wall time per batch (ms) and per image, for each batch size."""
    session = model if isinstance(model, InferenceSession) else \
        InferenceSession(model, threads=threads, use_kernels=use_kernels)
    name = session.input_names[0]
    rng = np.random.default_rng(seed)
    rows = []
    for batch in batch_sizes:
        x = rng.standard_normal(_shape(session, batch, shape)).astype(np.float32)
        for _ in range(warmup):
            session.run(None, {name: x})
        times = []
        for _ in range(max(1, repeats)):
            t0 = time.perf_counter()
            session.run(None, {name: x})
            times.append((time.perf_counter() - t0) * 1e3)
        t = np.asarray(times)
        rows.append({"batch": int(batch), "median_ms": float(np.median(t)), "p90_ms": float(np.percentile(t, 90)),
                     "per_image_ms": float(np.median(t) / batch), "repeats": len(t)})
    return rows
