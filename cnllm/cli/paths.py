"""The path rule, applied once where a command's arguments arrive.

A path typed on the command line is relative to the current directory: every ``Path`` a command
receives (options, arguments, lists of them) is made absolute here, before the command runs, so
core only ever sees absolute paths and no later step can re-anchor a relative one elsewhere.
Paths inside a ``--config`` file or a recipe are relative to that file's folder (see
``cnllm.core.config`` and ``cnllm.core.pipeline``).
"""

from __future__ import annotations

import functools
import os
from pathlib import Path
from typing import Any

import click

STDIN = Path("-")


def absolute(value: Any) -> Any:
    """``value`` with every relative ``Path`` in it made absolute against the current directory."""
    if isinstance(value, Path):
        return value if value == STDIN else Path(os.path.abspath(value))
    if isinstance(value, (list, tuple)):
        return type(value)(absolute(v) for v in value)
    return value


def apply_path_rule(command: click.Command) -> click.Command:
    """Wrap ``command`` (and its subcommands) so its callback receives absolute paths."""
    callback = command.callback
    if callback is not None and not getattr(callback, "_absolute_paths", False):

        @functools.wraps(callback)
        def with_absolute_paths(*args: Any, **kwargs: Any) -> Any:
            return callback(*args, **{name: absolute(value) for name, value in kwargs.items()})

        with_absolute_paths._absolute_paths = True  # type: ignore[attr-defined]
        command.callback = with_absolute_paths
    for sub in getattr(command, "commands", {}).values():
        apply_path_rule(sub)
    return command
