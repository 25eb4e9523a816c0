"""What a path given as a tokenizer holds: a SentencePiece model, a byte-level BPE ``tokenizer.json``,
or a plain word list — recognised from the content, so a wrong file gets one clear message."""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from cnllm.core.errors import UsageError
from cnllm.core.files import GGUF_MAGIC
from cnllm.core.tokenizers.hf_export import SPIECE_UNDERLINE
from cnllm.core.tokenizers.spm import PIECE_NORMAL, PIECE_USER_DEFINED, load_proto

SPM, BPE, WORDS = "spm", "bpe", "words"
PAD_PIECE = "<pad>"


@dataclass
class TokenizerSource:
    """A loaded tokenizer input: ``proto`` for SentencePiece, ``spec`` (the parsed JSON) for BPE, ``words`` for lists."""

    path: Path
    kind: str
    proto: Any = None
    spec: dict | None = None
    words: list[str] | None = None
    directory: Path | None = None


def _refuse_gguf(path: Path, head: bytes) -> None:
    if head.startswith(GGUF_MAGIC):
        raise UsageError(f"{path} is a GGUF model file, not a tokenizer; give the tokenizer.model or tokenizer.json it was made from")


def is_byte_level(spec: dict) -> bool:
    """Whether a ``tokenizer.json`` is byte-level BPE (GPT-2 / Llama-3 style)."""
    pre = spec.get("pre_tokenizer") or {}
    steps = pre.get("pretokenizers", [pre]) if pre.get("type") == "Sequence" else [pre]
    return (spec.get("model") or {}).get("type") == "BPE" and any(step.get("type") == "ByteLevel" for step in steps if step)


def load_tokenizer_json(path: Path) -> dict:
    """Parse a ``tokenizer.json`` and check that ``tokenizers`` accepts it."""
    from tokenizers import Tokenizer

    try:
        text = path.read_text(encoding="utf-8")
        spec = json.loads(text)
    except (UnicodeDecodeError, json.JSONDecodeError):
        raise UsageError(f"{path} is not a tokenizer.json (not valid JSON)") from None
    if not isinstance(spec, dict) or not isinstance(spec.get("model"), dict):
        raise UsageError(f"{path} is not a tokenizer.json (no 'model' section)")
    try:
        Tokenizer.from_str(text)
    except Exception as exc:  # tokenizers raises a bare Exception on bad files
        raise UsageError(f"{path} is not a valid tokenizer.json: {exc}") from None
    return spec


def _read_words(path: Path, data: bytes) -> list[str]:
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError:
        raise UsageError(
            f"{path} is not a tokenizer: not a SentencePiece model, a tokenizer.json or a UTF-8 word list"
        ) from None
    if "\x00" in text:
        raise UsageError(f"{path} is not a tokenizer: not a SentencePiece model, a tokenizer.json or a word list")
    seen: dict[str, None] = {}
    for line in text.splitlines():
        word = line.rstrip("\r")
        if word.strip():
            seen.setdefault(word, None)
    if not seen:
        raise UsageError(f"{path} is an empty word list")
    return list(seen)


def load_source(path: Path | str, *, allow_words: bool = False) -> TokenizerSource:
    """Recognise ``path``: a directory (its ``tokenizer.model`` first, else ``tokenizer.json``), a
    SentencePiece model file, a ``tokenizer.json``, or — when ``allow_words`` — a word list."""
    path = Path(path)
    if path.is_dir():
        if (path / "tokenizer.model").is_file():
            source = load_source(path / "tokenizer.model")
        elif (path / "tokenizer.json").is_file():
            source = load_source(path / "tokenizer.json")
        else:
            raise UsageError(f"{path} holds no tokenizer.model or tokenizer.json")
        source.directory = path
        return source
    if not path.is_file():
        raise UsageError(f"tokenizer {path} does not exist")
    try:
        data = path.read_bytes()
    except OSError as exc:
        raise UsageError(f"cannot read {path}: {exc.strerror}") from exc
    _refuse_gguf(path, data[:4])
    if data.lstrip()[:1] == b"{":
        spec = load_tokenizer_json(path)
        return TokenizerSource(path, BPE, spec=spec, directory=path.parent)
    try:
        proto = load_proto(path)
    except UsageError:
        if allow_words:
            return TokenizerSource(path, WORDS, words=_read_words(path, data))
        raise UsageError(f"{path} is not a tokenizer: not a SentencePiece model or a tokenizer.json") from None
    return TokenizerSource(path, SPM, proto=proto, directory=path.parent if path.name == "tokenizer.model" else None)


def spm_candidates(source: TokenizerSource) -> tuple[list[str], int]:
    """Pieces ADD offers to a SentencePiece base, in ADD's order, and how many were not mergeable (bytes, control)."""
    if source.kind == WORDS:
        assert source.words is not None  # a word list's source carries its words
        return [word.replace(" ", SPIECE_UNDERLINE) for word in source.words], 0
    pieces = [p.piece for p in source.proto.pieces if p.type in (PIECE_NORMAL, PIECE_USER_DEFINED)]
    return pieces, len(source.proto.pieces) - len(pieces)


def padded_size(size: int, multiple: int | None) -> int:
    return size if not multiple else int(math.ceil(size / multiple) * multiple)
