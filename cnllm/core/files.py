"""Reading the files users hand in, with one clear error naming the file: the JSON files of model, adapter and
tokenizer folders, and GGUF recognised by its magic. It imports only :mod:`cnllm.core.errors`, so tokenizers,
GGUF and model folders, on different floors, share it."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from cnllm.core.errors import UsageError

GGUF_MAGIC = b"GGUF"


def read_json(path: Path | str) -> object:
    """Any JSON document; a usage error naming the file when it is not JSON."""
    try:
        return json.loads(Path(path).read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError):
        raise UsageError(f"{path} is not valid JSON") from None
    except RecursionError:  # Python's parser recurses once per level: a hostile file nests 100,000 deep
        raise UsageError(f"{path} is nested too deeply to be a settings file") from None


def read_json_object(path: Path | str, *, what: str | None = None) -> dict[str, Any]:
    """A JSON file holding one object (a model, adapter or tokenizer folder's config files); a usage error otherwise,
    saying ``what`` the object should have been when given."""
    document = read_json(path)
    if not isinstance(document, dict):
        raise UsageError(f"{path} is not a JSON object" + (f" ({what})" if what else ""))
    return document


def is_gguf(path: Path | str) -> bool:
    """Whether ``path`` is a file that starts with the GGUF magic (cheap: reads four bytes)."""
    try:
        with open(path, "rb") as handle:
            return handle.read(4) == GGUF_MAGIC
    except OSError:
        return False
