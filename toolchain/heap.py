"""Freed memory kept for reuse while compressing (glibc), instead of handed back to the system.

Why: glibc's malloc serves blocks above its mmap threshold (at most 32 MiB) with fresh
``mmap`` pages and unmaps them on ``free``.  The synthetic-image generator and the
fitting passes allocate and free activations of that size on every step, so each step
pays again for the kernel zeroing new pages; on large inputs that can cost more than the
arithmetic, and a large batch then costs more per image than a small one
(``benchmarks/results/heap.md``).  PyTorch's own CPU launcher
answers this by preloading jemalloc or tcmalloc, which a library cannot do for the
process it runs in; ``mallopt`` can, from inside it.

Contract: within :func:`reused`, blocks up to ``THRESHOLD`` come from the heap and
stay there when freed (no ``mmap``, no trimming), so the next step reuses warm pages.
Nothing computed changes: only where memory comes from.  On leaving, the thresholds
go to glibc's own dynamic maxima (32 MiB for mmap, twice that for trimming: where a
process that has ever freed a large block already sits) and ``malloc_trim`` returns the
free heap to the system.  It does nothing where the C library is not glibc, where the
user set ``MALLOC_MMAP_THRESHOLD_`` or ``MALLOC_TRIM_THRESHOLD_`` (their choice stands),
or inside another :func:`reused`.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import functools
import os
import threading
from collections.abc import Iterator
from contextlib import contextmanager

M_TRIM_THRESHOLD = -1
M_MMAP_THRESHOLD = -3
THRESHOLD = 1 << 30                 # blocks up to 1 GiB from the heap while compressing
DYNAMIC_MMAP_MAX = 32 << 20         # glibc's DEFAULT_MMAP_THRESHOLD_MAX on 64-bit systems
USER_SETTINGS = ("MALLOC_MMAP_THRESHOLD_", "MALLOC_TRIM_THRESHOLD_")

_lock = threading.Lock()
_depth = 0


@functools.cache
def _glibc():
    """The C library when it is glibc (it has ``gnu_get_libc_version``), else None; looked up once."""
    if os.name != "posix":
        return None
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        libc.gnu_get_libc_version  # noqa: B018  (raises AttributeError elsewhere: musl, macOS)
        libc.mallopt.argtypes = [ctypes.c_int, ctypes.c_int]
        libc.malloc_trim.argtypes = [ctypes.c_size_t]
        return libc
    except (OSError, AttributeError):
        return None


def applies() -> bool:
    """Whether :func:`reused` changes anything here."""
    return _glibc() is not None and not any(k in os.environ for k in USER_SETTINGS)


@contextmanager
def reused() -> Iterator[None]:
    """Freed blocks up to ``THRESHOLD`` stay in the heap for reuse (module docstring)."""
    global _depth
    libc = _glibc() if applies() else None
    with _lock:
        outer = _depth == 0
        _depth += 1
        if libc is not None and outer:
            libc.mallopt(M_MMAP_THRESHOLD, THRESHOLD)
            libc.mallopt(M_TRIM_THRESHOLD, THRESHOLD)
    try:
        yield
    finally:
        with _lock:
            _depth -= 1
            if libc is not None and outer:
                libc.mallopt(M_MMAP_THRESHOLD, DYNAMIC_MMAP_MAX)
                libc.mallopt(M_TRIM_THRESHOLD, 2 * DYNAMIC_MMAP_MAX)
                libc.malloc_trim(0)


__all__ = ["applies", "reused"]
