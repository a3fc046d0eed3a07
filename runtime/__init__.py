"""Run any model the toolchain writes: sessions with the custom ops, batched inference, latency."""

from .session import InferenceSession

__all__ = ["InferenceSession"]
