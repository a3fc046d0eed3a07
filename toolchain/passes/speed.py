"""The speed-up measured where the compressor runs: float and compressed model, one plain session each.

Contract: given the float model and the compressed one (serialized) and the shape of
one input sample, time both in a plain ``onnxruntime.InferenceSession`` with default
options (what a user's deployment code opens), at batch 1 and at a large batch, and
return each as a ratio to the float model.  Nothing in either model changes.

MACs say what a device could save; what onnxruntime on a CPU actually saves depends
on its kernels (channel counts its convolutions run in whole blocks, layers it runs on
integer kernels, layout changes between float and integer layers), so the summary
prints the measured ratio beside the MACs.

How: the runs of the two models alternate (float, compressed, float, ...) so that a
load change on a shared machine hits both alike; each ratio is the ratio of medians.
The large batch is 64, or less where one float run at 64 would take longer than
``LARGE_RUN_S`` (estimated from batch 1); each batch size gets at most half of
``BUDGET_S`` and at least ``MIN_PAIRS`` pairs of runs.  A model whose batch is fixed
is timed at that batch only.  Inputs are uniform in [0, 1]:
speed does not depend on the values.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field

import numpy as np

BUDGET_S = 4.0       # wall time for all the timed runs
LARGE_BATCH = 64
LARGE_RUN_S = 0.5    # the large batch shrinks so that one float run stays near this
MIN_PAIRS = 3
MAX_PAIRS = 50


@dataclass
class Speed:
    batches: dict[int, tuple[float, float]] = field(default_factory=dict)   # batch -> (float ms, compressed ms)
    onnxruntime: str = ""

    def ratios(self) -> dict[int, float]:
        return {b: c / f for b, (f, c) in self.batches.items()}

    def line(self) -> str:
        parts = [f"{r:.2f}x the float model's at batch {b}" if i == 0 else f"{r:.2f}x at batch {b}"
                 for i, (b, r) in enumerate(self.ratios().items())]
        return f"time on this machine, plain onnxruntime {self.onnxruntime} session: " + ", ".join(parts)

    def to_dict(self) -> dict:
        return {"onnxruntime": self.onnxruntime,
                "batches": {str(b): {"float_ms": _sig(f), "compressed_ms": _sig(c), "ratio": round(c / f, 4)}
                            for b, (f, c) in self.batches.items()}}


def _sig(ms: float) -> float:
    """``ms`` to six significant digits: a small model's batch-1 time is hundredths of a
    millisecond, where a fixed number of decimals would lose the precision of its ratio."""
    return float(f"{ms:.6g}")


def _session(model: bytes):
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.log_severity_level = 3
    return ort.InferenceSession(model, options, providers=["CPUExecutionProvider"])


def _rounds(sessions, x: np.ndarray, budget_s: float) -> list[float]:
    """Median ms of each session on ``x``, their runs alternating."""
    feeds = [{s.get_inputs()[0].name: x} for s in sessions]
    for s, f in zip(sessions, feeds):      # warm-up: first runs allocate and pick kernels
        s.run(None, f)
    times: list[list[float]] = [[] for _ in sessions]
    start = time.perf_counter()
    while len(times[0]) < MAX_PAIRS and (len(times[0]) < MIN_PAIRS or time.perf_counter() - start < budget_s):
        for i, (s, f) in enumerate(zip(sessions, feeds)):
            t = time.perf_counter()
            s.run(None, f)
            times[i].append((time.perf_counter() - t) * 1e3)
    return [float(np.median(t)) for t in times]


def timings(models: list[bytes], sample_shape: tuple[int, ...], *, fixed_batch: int | None = None,
            seed: int = 0) -> dict[int, list[float]]:
    """Median ms of each model (the first sets the large batch) at batch 1 and at a large
    batch (module docstring); at ``fixed_batch`` only, where the model's batch is fixed."""
    sessions = [_session(m) for m in models]
    rng = np.random.default_rng(seed)
    first = fixed_batch or 1
    out = {first: _rounds(sessions, rng.random((first, *sample_shape), dtype=np.float32), BUDGET_S / 2)}
    if fixed_batch is not None:
        return out
    per_image_s = out[1][0] / 1e3
    large = LARGE_BATCH
    while large > 2 and large * per_image_s > LARGE_RUN_S:
        large //= 2
    out[large] = _rounds(sessions, rng.random((large, *sample_shape), dtype=np.float32), BUDGET_S / 2)
    return out


def measure(float_model: bytes, compressed: bytes, sample_shape: tuple[int, ...], *,
            fixed_batch: int | None = None, seed: int = 0) -> Speed:
    """Median ms of each model at batch 1 and at a large batch (module docstring); at
    ``fixed_batch`` only, where the model's batch is fixed."""
    import onnxruntime as ort

    got = timings([float_model, compressed], sample_shape, fixed_batch=fixed_batch, seed=seed)
    return Speed(batches={b: (t[0], t[1]) for b, t in got.items()}, onnxruntime=ort.__version__)
