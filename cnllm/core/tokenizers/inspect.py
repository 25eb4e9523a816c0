"""``vocab inspect``: what a tokenizer is and what it costs on a text (tokens, characters per token,
byte-fallback and unknown rates, round trip) — how users see what a vocabulary merge bought them.

SentencePiece tokenizers are measured with sentencepiece itself (the reference every other
runtime must match); ``tokenizer.json`` files with the ``tokenizers`` library.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Protocol

from cnllm.core.corpus import CorpusStats, iter_documents
from cnllm.core.errors import UsageError
from cnllm.core.tokenizers import sources
from cnllm.core.tokenizers.spm import PIECE_CONTROL, PIECE_UNKNOWN

CJK = re.compile("[\u3400-\u4dbf\u4e00-\u9fff\uf900-\ufaff\U00020000-\U0003134f]")
BYTE_PIECE = re.compile(r"^<0x[0-9A-Fa-f]{2}>$")
SPM_MODEL_TYPES = {1: "unigram", 2: "bpe", 3: "word", 4: "char"}


@dataclass
class TextStats:
    lines: int
    characters: int
    cjk_characters: int
    tokens: int
    byte_tokens: int
    unknown_tokens: int
    roundtrip_failures: int
    invalid_utf8_lines: int

    @property
    def chars_per_token(self) -> float:
        return self.characters / self.tokens if self.tokens else 0.0

    @property
    def cjk_per_token(self) -> float:
        return self.cjk_characters / self.tokens if self.tokens else 0.0

    @property
    def byte_rate(self) -> float:
        return self.byte_tokens / self.tokens if self.tokens else 0.0

    @property
    def unknown_rate(self) -> float:
        return self.unknown_tokens / self.tokens if self.tokens else 0.0

    def to_dict(self) -> dict:
        return {
            **vars(self),
            "chars_per_token": round(self.chars_per_token, 4),
            "cjk_chars_per_token": round(self.cjk_per_token, 4),
            "byte_token_rate": round(self.byte_rate, 6),
            "unknown_rate": round(self.unknown_rate, 6),
            "roundtrip_ok": self.roundtrip_failures == 0,
        }


@dataclass
class Inspection:
    path: Path
    kind: str
    vocab_size: int
    special_tokens: dict[str, int]
    text: TextStats | None = None
    extra: dict = field(default_factory=dict)

    def to_dict(self) -> dict:
        return {
            "path": str(self.path),
            "type": self.kind,
            "vocab_size": self.vocab_size,
            "special_tokens": self.special_tokens,
            **self.extra,
            "text": self.text.to_dict() if self.text else None,
        }


class _Encoder(Protocol):
    """The few operations measured, over sentencepiece or ``tokenizers``."""

    def encode(self, text: str) -> list[int]: ...
    def decode(self, ids: list[int]) -> str: ...
    def is_byte(self, token_id: int) -> bool: ...
    def is_unknown(self, token_id: int) -> bool: ...


class _SpmEncoder:
    def __init__(self, proto):
        import sentencepiece as spm

        self.processor = spm.SentencePieceProcessor(model_proto=proto.SerializeToString())

    def encode(self, text: str) -> list[int]:
        return self.processor.encode(text)

    def decode(self, ids: list[int]) -> str:
        return self.processor.decode(ids)

    def is_byte(self, token_id: int) -> bool:
        return self.processor.is_byte(token_id)

    def is_unknown(self, token_id: int) -> bool:
        return self.processor.is_unknown(token_id)


class _JsonEncoder:
    def __init__(self, spec: dict):
        import json

        from tokenizers import Tokenizer

        self.tokenizer = Tokenizer.from_str(json.dumps(spec))
        model = spec["model"]
        self.unk_id = self.tokenizer.token_to_id(model["unk_token"]) if model.get("unk_token") else None
        self.byte_level = sources.is_byte_level(spec)
        self.partial: dict[int, bool] = {}

    def encode(self, text: str) -> list[int]:
        return self.tokenizer.encode(text, add_special_tokens=False).ids

    def decode(self, ids: list[int]) -> str:
        return self.tokenizer.decode(ids, skip_special_tokens=False)

    def is_byte(self, token_id: int) -> bool:
        """A byte-fallback piece (``<0xE4>``) or, in byte-level BPE, a token that is not whole characters."""
        if token_id not in self.partial:
            token = self.tokenizer.id_to_token(token_id) or ""
            partial = bool(BYTE_PIECE.match(token))
            if self.byte_level and not partial:
                # Alone, a token holding part of a character decodes to U+FFFD.
                partial = "\ufffd" in self.tokenizer.decode([token_id], skip_special_tokens=False)
            self.partial[token_id] = partial
        return self.partial[token_id]

    def is_unknown(self, token_id: int) -> bool:
        return token_id == self.unk_id


def _describe(source: sources.TokenizerSource) -> tuple[str, int, dict[str, int], dict, _Encoder]:
    if source.kind == sources.SPM:
        proto = source.proto
        kind = f"SentencePiece ({SPM_MODEL_TYPES.get(proto.trainer_spec.model_type, 'unknown')})"
        specials = {p.piece: i for i, p in enumerate(proto.pieces) if p.type in (PIECE_CONTROL, PIECE_UNKNOWN)}
        extra = {"byte_fallback": proto.trainer_spec.byte_fallback, "normalizer": proto.normalizer_spec.name or "custom"}
        return kind, len(proto.pieces), specials, extra, _SpmEncoder(proto)
    spec = source.spec
    assert spec is not None  # not SentencePiece: a tokenizer.json, parsed
    encoder = _JsonEncoder(spec)
    model_type = spec["model"].get("type", "unknown")
    kind = "byte-level BPE" if encoder.byte_level else f"tokenizer.json ({model_type})"
    specials = {t["content"]: t["id"] for t in spec.get("added_tokens", []) if t.get("special")}
    size = encoder.tokenizer.get_vocab_size(with_added_tokens=True)
    return kind, size, specials, {"merges": len(spec["model"].get("merges", []))}, encoder


def measure(encoder: _Encoder, text_path: Path) -> TextStats:
    corpus = CorpusStats()
    tokens = byte_tokens = unknown = failures = cjk = 0
    for line in iter_documents([text_path], corpus):
        ids = encoder.encode(line)
        tokens += len(ids)
        byte_tokens += sum(1 for i in ids if encoder.is_byte(i))
        unknown += sum(1 for i in ids if encoder.is_unknown(i))
        cjk += len(CJK.findall(line))
        failures += encoder.decode(ids) != line
    if corpus.lines == 0:
        raise UsageError(f"--text {text_path} has no text lines")
    return TextStats(corpus.lines, corpus.characters, cjk, tokens, byte_tokens, unknown, failures, corpus.invalid_utf8_lines)


def inspect_tokenizer(path: Path | str, text: Path | str | None = None) -> Inspection:
    """Describe the tokenizer at ``path`` (a directory, ``tokenizer.model`` or ``tokenizer.json``); measure it on ``text``."""
    source = sources.load_source(path)
    kind, size, specials, extra, encoder = _describe(source)
    stats = measure(encoder, Path(text)) if text is not None else None
    return Inspection(Path(path), kind, size, specials, stats, extra)


def token_ratio(tokenizer: Inspection, other: Inspection) -> float | None:
    """Tokens ``tokenizer`` needs for the text per token ``other`` needs (below 1: shorter sequences)."""
    if not (tokenizer.text and other.text and other.text.tokens):
        return None
    return tokenizer.text.tokens / other.text.tokens
