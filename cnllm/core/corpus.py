"""Reading text corpora: plain text (one document or paragraph per line) or JSONL with a ``text`` field.

Directories are walked (sorted). Lines that are not valid UTF-8 are skipped and counted,
never a crash; the caller reports the counts.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterable, Iterator

from cnllm.core.errors import UsageError

TEXT_SUFFIXES = {".txt", ".text", ".md", ".jsonl", ".json", ""}


@dataclass
class CorpusStats:
    files: int = 0
    lines: int = 0
    characters: int = 0
    bytes: int = 0
    invalid_utf8_lines: int = 0
    invalid_json_lines: int = 0
    skipped_files: list[str] = field(default_factory=list)


def corpus_files(paths: Iterable[Path | str]) -> list[Path]:
    """The files named, plus the text-like files under each directory; missing paths are a usage error."""
    files: list[Path] = []
    for raw in paths:
        path = Path(raw)
        if path.is_dir():
            files.extend(sorted(p for p in path.rglob("*") if p.is_file() and p.suffix.lower() in TEXT_SUFFIXES and not p.name.startswith(".")))
        elif path.is_file():
            files.append(path)
        else:
            raise UsageError(f"corpus file {path} does not exist")
    return files


def _is_jsonl(path: Path) -> bool:
    return path.suffix.lower() == ".jsonl"


def iter_documents(paths: Iterable[Path | str], stats: CorpusStats | None = None, *, text_field: str = "text") -> Iterator[str]:
    """Yield each non-empty document (a text line, or a JSONL record's ``text_field``)."""
    stats = stats if stats is not None else CorpusStats()
    for path in corpus_files(paths):
        stats.files += 1
        jsonl = _is_jsonl(path)
        try:
            handle = open(path, "rb")
        except OSError as exc:
            raise UsageError(f"cannot read corpus file {path}: {exc.strerror}") from exc
        with handle:
            for raw in handle:
                stats.bytes += len(raw)
                try:
                    line = raw.decode("utf-8")
                except UnicodeDecodeError:
                    stats.invalid_utf8_lines += 1
                    continue
                line = line.rstrip("\r\n")
                if jsonl:
                    if not line.strip():
                        continue
                    try:
                        record = json.loads(line)
                        text = record[text_field] if isinstance(record, dict) else None
                    except (json.JSONDecodeError, KeyError):
                        text = None
                    if not isinstance(text, str):
                        stats.invalid_json_lines += 1
                        continue
                    line = text
                if not line.strip():
                    continue
                stats.lines += 1
                stats.characters += len(line)
                yield line
