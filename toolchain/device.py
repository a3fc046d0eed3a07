"""Where torch runs the generator and the fitting passes: a CUDA device when there is one.

Contract: :func:`resolve` turns the user's choice (``auto``, ``cpu``, ``cuda``, ``cuda:N``)
into a ``torch.device``, or raises :class:`~.errors.UserError` naming what is missing;
``auto`` takes CUDA when torch finds a device, else the CPU.  :func:`using` makes it the
device of the run: every tensor the toolchain makes goes there (:func:`tensor`,
:func:`current`), and every tensor it hands back to numpy comes back (:func:`numpy`).
Random draws are made on the CPU and then moved, so a seed gives the same images
wherever they are optimised; results differ between devices only by float rounding.
The device is not part of the recipe: it changes where the work is done, not what.
"""

from __future__ import annotations

import contextvars
import os
from collections.abc import Iterator
from contextlib import contextmanager

import numpy as np
import torch

from .errors import UserError

CHOICES = ("auto", "cpu", "cuda")
_current: contextvars.ContextVar[torch.device] = contextvars.ContextVar("datafree_device", default=torch.device("cpu"))


def resolve(name: str | torch.device | None = "auto") -> torch.device:
    """The device ``name`` asks for; ``auto`` (or None): CUDA when torch finds one, else CPU."""
    if isinstance(name, torch.device):
        name = str(name)
    text = (name or "auto").strip().lower()
    if text == "auto":
        return _cuda_ready(torch.device("cuda")) if torch.cuda.is_available() else torch.device("cpu")
    try:
        dev = torch.device(text)
    except RuntimeError:
        raise UserError(f"device must be one of {', '.join(CHOICES)} (or cuda:N), got {name!r}") from None
    if dev.type == "cpu":
        return dev
    if dev.type != "cuda":
        raise UserError(f"device must be one of {', '.join(CHOICES)} (or cuda:N), got {name!r}")
    if not torch.cuda.is_available():
        build = "a CPU-only build" if torch.version.cuda is None else f"built for CUDA {torch.version.cuda}"
        raise UserError(f"device {text!r}: torch finds no CUDA device (torch {torch.__version__}, {build})")
    if dev.index is not None and dev.index >= torch.cuda.device_count():
        raise UserError(f"device {text!r}: torch finds {torch.cuda.device_count()} CUDA device(s)")
    return _cuda_ready(dev)


def _cuda_ready(dev: torch.device) -> torch.device:
    """The generator runs with deterministic algorithms, which cuBLAS gives only with a
    fixed workspace; the setting must be in place before cuBLAS starts."""
    os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
    return dev


def describe(dev: torch.device) -> str:
    """``dev`` for the summary: the GPU's name, or the CPU threads torch uses."""
    if dev.type == "cuda":
        return f"{dev} ({torch.cuda.get_device_name(dev)})"
    return f"cpu ({torch.get_num_threads()} threads)"


@contextmanager
def using(dev: torch.device) -> Iterator[torch.device]:
    """Make ``dev`` the device of the run within; a GPU running out of memory there is a
    :class:`~.errors.UserError` that says what to do instead."""
    token = _current.set(dev)
    try:
        yield dev
    except torch.OutOfMemoryError:
        if dev.type != "cuda":
            raise
        raise UserError(f"out of memory on {dev}: compress on the CPU (device 'cpu') or with fewer "
                        "synthetic images") from None
    finally:
        _current.reset(token)


def current() -> torch.device:
    """The device of the run (the CPU outside :func:`using`)."""
    return _current.get()


def tensor(array, dtype: torch.dtype | None = None) -> torch.Tensor:
    """``array`` (numpy or tensor) on the device of the run; no copy where it is there already."""
    return torch.as_tensor(array, dtype=dtype, device=current())


def numpy(t: torch.Tensor) -> np.ndarray:
    """``t`` as a numpy array (from the device, detached from autograd)."""
    return t.detach().cpu().numpy()
