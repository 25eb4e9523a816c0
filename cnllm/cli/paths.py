"""The path rule, applied once where a command's arguments arrive.

A path typed on the command line is relative to the current directory: every path parameter of a
command (``click.Path`` options and arguments, lists of them) is made absolute here, before the
command runs, so core only ever sees absolute paths and no later step can re-anchor a relative one
elsewhere. Where a model is expected (:data:`MODEL_PARAMETERS`, or the names a command's function lists in
``model_parameters``: the training commands' options declared ``model=True``), a Hugging Face id that is no
local path becomes its snapshot folder in the local cache (:mod:`cnllm.core.hub`). Paths inside a
``--config`` file or a recipe are relative to that file's folder (see ``cnllm.core.config`` and
``cnllm.core.pipeline``).
"""

from __future__ import annotations

import functools
import os
from pathlib import Path
from typing import Any

import click

STDIN = "-"
# Parameters that name a model, an adapter or a tokenizer: there a Hugging Face id (org/name) that is
# not a local path resolves to its snapshot in the local cache.
MODEL_PARAMETERS = frozenset({"model", "model_dir", "base", "lora", "diff", "tuned", "reference", "draft_model", "tokenizer", "compare"})


class Downloads:
    """Whether a model id missing from the cache may be downloaded (the root ``--allow-download`` flag)."""

    allowed = False


def absolute(value: Any) -> Any:
    """``value`` (a path as click passes it, ``str`` or ``Path``, or a list of them) made absolute against the current directory."""
    if isinstance(value, (list, tuple)):
        return type(value)(absolute(v) for v in value)
    if isinstance(value, (str, Path)) and str(value) != STDIN:
        return type(value)(os.path.abspath(value))
    return value


def model_path(value: Any) -> Any:
    """Like :func:`absolute`, but a cached Hugging Face model id (not an existing local path) becomes its snapshot folder."""
    if isinstance(value, (list, tuple)):
        return type(value)(model_path(v) for v in value)
    if isinstance(value, (str, Path)) and not os.path.isabs(value) and not os.path.exists(value):
        from cnllm.core.hub import looks_like_repo_id, resolve_model_id

        text = Path(value).as_posix()
        if looks_like_repo_id(text):
            return type(value)(resolve_model_id(text, allow_download=Downloads.allowed))
    return absolute(value)


def apply_path_rule(command: click.Command) -> click.Command:
    """Wrap ``command`` (and its subcommands) so its callback receives absolute paths."""
    callback = command.callback
    if callback is not None and not getattr(callback, "_absolute_paths", False):
        models = MODEL_PARAMETERS | getattr(callback, "model_parameters", frozenset())
        rules = {p.name: model_path if p.name in models else absolute for p in command.params if isinstance(p.type, click.Path)}

        @functools.wraps(callback)
        def with_absolute_paths(*args: Any, **kwargs: Any) -> Any:
            return callback(*args, **{name: rules[name](value) if name in rules else value for name, value in kwargs.items()})

        with_absolute_paths._absolute_paths = True  # type: ignore[attr-defined]  # mypy has no function attributes
        command.callback = with_absolute_paths
    for sub in getattr(command, "commands", {}).values():
        apply_path_rule(sub)
    return command
