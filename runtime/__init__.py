"""Run any model the toolchain writes: sessions with the custom ops, batched inference, latency."""

import datafree.toolchain  # noqa: F401  (OpenMP spin cap, before torch loads)

from .session import InferenceSession

__all__ = ["InferenceSession"]
