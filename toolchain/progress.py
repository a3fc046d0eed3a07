"""The one progress seam: passes report ``(stage, done, total)``; the CLI draws it."""

from __future__ import annotations

from typing import Callable, Protocol


class Progress(Protocol):
    def __call__(self, stage: str, done: int, total: int) -> None: ...


def silent(stage: str, done: int, total: int) -> None:
    """The default: passes never print."""


ProgressFn = Callable[[str, int, int], None]
