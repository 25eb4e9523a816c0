"""The small progress protocol that core code reports through.

Core never prints: it calls ``start``/``advance``/``finish`` on the object it is given.
The CLI passes a renderer (a Rich bar on a terminal, periodic plain lines otherwise);
library users get :data:`NULL_PROGRESS` by default.
"""

from __future__ import annotations

from typing import Protocol


class Progress(Protocol):
    def start(self, total: float | None, description: str, unit: str = "it") -> None:
        """Begin a task of ``total`` units (``None`` when unknown); ``unit`` is e.g. "B" or "step"."""

    def advance(self, amount: float = 1, **fields: object) -> None:
        """Record ``amount`` more units done; ``fields`` are extra figures to show (loss, lr …)."""

    def finish(self) -> None:
        """End the current task."""

    def log(self, message: str) -> None:
        """A one-line note for the user (stderr in the CLI)."""


class NullProgress:
    """Progress that reports nothing: the default for library calls."""

    def start(self, total: float | None, description: str, unit: str = "it") -> None:
        pass

    def advance(self, amount: float = 1, **fields: object) -> None:
        pass

    def finish(self) -> None:
        pass

    def log(self, message: str) -> None:
        pass


NULL_PROGRESS = NullProgress()
