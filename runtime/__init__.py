"""Run any model the toolchain writes: sessions with the custom ops, batched inference, latency.

Imports only onnx, onnxruntime and numpy (onnxruntime-extensions when it is there and
a model asks for its kernels): a device installs these, not the compressor.
"""

from .session import InferenceSession

__all__ = ["InferenceSession"]
