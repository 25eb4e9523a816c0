"""Where things are printed: results on stdout, progress/logs/warnings on stderr.

``--json`` commands call :func:`print_json` once and print nothing else on stdout.
"""

from __future__ import annotations

import json
import sys
import threading
import time
from functools import lru_cache
from typing import TYPE_CHECKING, Any, Iterable, Sequence

from rich.console import Console
from rich.markup import escape
from rich.text import Text

from cnllm.core.tensors import human_bytes  # noqa: F401 - commands format sizes through output

if TYPE_CHECKING:
    from rich.progress import Progress as RichProgress, TaskID


@lru_cache(maxsize=None)
def stdout() -> Console:
    return Console(soft_wrap=True)


@lru_cache(maxsize=None)
def stderr() -> Console:
    return Console(stderr=True, soft_wrap=True)


def print_json(document: Any) -> None:
    sys.stdout.write(json.dumps(document, ensure_ascii=False, indent=2) + "\n")
    sys.stdout.flush()


def print_error(message: str) -> None:
    # The message is text, not markup: "[...]" in it (SentencePiece's checks, file names) must print as written.
    stderr().print(f"[bold red]error:[/] {escape(message)}", markup=True, highlight=False, soft_wrap=True)


def print_warning(message: str) -> None:
    stderr().print(f"[yellow]warning:[/] {escape(message)}", markup=True, highlight=False)


def print_note(message: str) -> None:
    stderr().print(message, markup=False, highlight=False)


PIPE_WIDTH = 100_000  # wide enough for any path: a table printed off a terminal never cuts a value


def emphasis(value: str) -> Text:
    """A table cell shown bold (a total row)."""
    return Text(value, style="bold")


def print_table(title: str | None, columns: Sequence[str], rows: Iterable[Sequence[Any]]) -> None:
    from rich.table import Table

    table = Table(title=title, title_justify="left", header_style="bold")
    for column in columns:
        table.add_column(column)
    for row in rows:  # values are text, not markup (a file may be called "[draft].txt"); emphasis() marks a cell bold
        table.add_row(*(cell if isinstance(cell, Text) else Text(str(cell)) for cell in row))
    console = stdout()
    if console.is_terminal:
        console.print(table)
        return
    # Off a terminal (a pipe, a CI log) nothing sets a width: the table is as wide as its values, none cut.
    width = console.width
    console.width = PIPE_WIDTH
    try:
        console.print(table)
    finally:
        console.width = width




class CliProgress:
    """The :class:`cnllm.core.progress.Progress` renderer of the CLI.

    On a terminal: a Rich bar on stderr. Otherwise (CI logs, pipes): a plain line every
    ``interval`` seconds, and a closing line for tasks long enough to have printed one.
    Safe to advance from several threads.
    """

    def __init__(self, console: Console | None = None, *, interval: float = 10.0):
        self.console = console or stderr()
        self.interval = interval
        self._lock = threading.Lock()
        self._rich: RichProgress | None = None
        self._task: TaskID | None = None

    def start(self, total: float | None, description: str, unit: str = "it") -> None:
        self.total, self.description, self.unit = total, description, unit
        self.done = 0.0
        self.started = self.last_print = time.monotonic()
        self.printed = False
        self.fields: dict[str, object] = {}
        if self.console.is_terminal:
            from rich.progress import (
                BarColumn,
                DownloadColumn,
                MofNCompleteColumn,
                Progress,
                TextColumn,
                TimeRemainingColumn,
                TransferSpeedColumn,
            )

            columns = [TextColumn("[bold]{task.description}"), BarColumn()]
            if unit == "B":
                columns += [DownloadColumn(), TransferSpeedColumn()]
            else:
                columns += [MofNCompleteColumn()]
            columns += [TimeRemainingColumn(), TextColumn("{task.fields[extra]}")]
            self._rich = Progress(*columns, console=self.console, transient=False)
            self._rich.start()
            self._task = self._rich.add_task(description, total=total, extra="")

    def advance(self, amount: float = 1, **fields: object) -> None:
        with self._lock:
            self.done += amount
            if fields:
                self.fields.update(fields)
            if self._rich is not None and self._task is not None:  # set together by start()
                extra = "  ".join(f"{k}={_fmt(v)}" for k, v in self.fields.items())
                self._rich.update(self._task, advance=amount, extra=extra)
                return
            now = time.monotonic()
            if now - self.last_print >= self.interval:
                self.last_print = now
                self.printed = True
                self.console.print(self._plain_line(now), markup=False, highlight=False)

    def _plain_line(self, now: float) -> str:
        done = human_bytes(self.done) if self.unit == "B" else f"{self.done:g}"
        parts = [f"{self.description}: {done}"]
        if self.total:
            total = human_bytes(self.total) if self.unit == "B" else f"{self.total:g}"
            parts.append(f"of {total} ({100 * self.done / self.total:.0f}%)")
        parts.append(f"{now - self.started:.0f}s")
        parts += [f"{k}={_fmt(v)}" for k, v in self.fields.items()]
        return " ".join(parts)

    def finish(self) -> None:
        with self._lock:
            if self._rich is not None:
                self._rich.stop()
                self._rich = None
            elif self.printed:
                self.console.print(f"{self.description}: done in {time.monotonic() - self.started:.1f}s", markup=False, highlight=False)

    def log(self, message: str) -> None:
        self.console.print(message, markup=False, highlight=False)


def _fmt(value: object) -> str:
    return f"{value:.4g}" if isinstance(value, float) else str(value)
