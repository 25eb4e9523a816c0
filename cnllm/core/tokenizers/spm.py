"""SentencePiece models: train with LLaMA's settings, read and write ``ModelProto`` files."""

from __future__ import annotations

import io
import re
from pathlib import Path
from typing import Any, Iterable

from cnllm.core.errors import UsageError

# The settings LLaMA's tokenizer was trained with (its trainer/normalizer specs), which a
# vocabulary meant to be merged into it should share.
LLAMA_TRAINER_SETTINGS = dict(
    model_type="bpe",
    byte_fallback=True,
    split_digits=True,
    normalization_rule_name="identity",
    add_dummy_prefix=True,
    remove_extra_whitespaces=False,
    allow_whitespace_only_pieces=True,
    unk_id=0,
    bos_id=1,
    eos_id=2,
    pad_id=-1,
    max_sentence_length=1 << 16,
)

PIECE_NORMAL, PIECE_UNKNOWN, PIECE_CONTROL, PIECE_USER_DEFINED, PIECE_UNUSED, PIECE_BYTE = 1, 2, 3, 4, 5, 6


def model_proto_class():
    from sentencepiece import sentencepiece_model_pb2

    return sentencepiece_model_pb2.ModelProto  # type: ignore[attr-defined]  # made by protobuf's builder at import time


def proto_from_pieces(pieces: list[str], scores: list[float], types: list[int], *, special_ids: dict[str, int], add_dummy_prefix: bool):
    """A BPE ``tokenizer.model`` (LLaMA's kind) from a vocabulary's pieces, scores and types (SentencePiece's type
    numbers, which GGUF shares): all that llama.cpp and the slow tokenizer use of the model a GGUF was made from.
    ``special_ids``: ``unk_id``, ``bos_id``, ``eos_id``, ``pad_id`` (-1 or absent: none)."""
    proto = model_proto_class()()
    trainer = proto.trainer_spec
    trainer.model_type = trainer.BPE
    trainer.vocab_size = len(pieces)
    trainer.byte_fallback = PIECE_BYTE in types
    for name in ("unk_id", "bos_id", "eos_id", "pad_id"):
        setattr(trainer, name, special_ids.get(name, -1))
    normalizer = proto.normalizer_spec
    normalizer.name, normalizer.add_dummy_prefix = "identity", add_dummy_prefix
    normalizer.remove_extra_whitespaces, normalizer.escape_whitespaces = False, True
    for piece, score, kind in zip(pieces, scores, types):
        proto.pieces.add(piece=piece, score=score, type=kind if PIECE_NORMAL <= kind <= PIECE_BYTE else PIECE_NORMAL)
    if 0 <= trainer.unk_id < len(pieces):  # converters mark every special token control; SentencePiece needs its unk
        proto.pieces[trainer.unk_id].type = PIECE_UNKNOWN
    return proto


def load_proto(path: Path | str):
    """Parse a ``tokenizer.model``; a file that is not one is a usage error naming it."""
    from google.protobuf.message import DecodeError

    path = Path(path)
    try:
        data = path.read_bytes()
    except OSError as exc:
        raise UsageError(f"cannot read {path}: {exc.strerror}") from exc
    proto = model_proto_class()()
    try:
        proto.ParseFromString(data)
    except (DecodeError, ValueError, RuntimeError):
        raise UsageError(f"{path} is not a SentencePiece model") from None
    if not proto.pieces:
        raise UsageError(f"{path} is not a SentencePiece model (no pieces)")
    return proto


def load_processor(path: Path | str):
    """A ``SentencePieceProcessor`` for ``path``; a garbage or truncated file is a usage error naming it."""
    import sentencepiece as spm

    try:
        return spm.SentencePieceProcessor(model_file=str(path))
    except (RuntimeError, OSError) as exc:
        reason = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise UsageError(f"{path} is not a SentencePiece model ({reason})") from None


def train_spm(
    sentences: Iterable[str],
    *,
    vocab_size: int,
    model_type: str = "bpe",
    character_coverage: float = 0.9995,
    input_sentence_size: int = 0,
    threads: int = 1,
    seed_sentencepieces: int | None = None,
    **overrides,
) -> bytes:
    """Train a SentencePiece model with LLaMA's settings on an iterator of sentences; return its bytes."""
    import sentencepiece as spm

    settings: dict[str, Any] = dict(LLAMA_TRAINER_SETTINGS)
    settings.update(
        model_type=model_type,
        vocab_size=vocab_size,
        character_coverage=character_coverage,
        num_threads=threads,
        minloglevel=2,
    )
    if input_sentence_size:
        settings.update(input_sentence_size=input_sentence_size, shuffle_input_sentence=True)
    if seed_sentencepieces:
        settings["seed_sentencepiece_size"] = seed_sentencepieces
    settings.update(overrides)
    buffer = io.BytesIO()
    try:
        spm.SentencePieceTrainer.train(sentence_iterator=iter(sentences), model_writer=buffer, **settings)
    except RuntimeError as exc:
        message = str(exc).strip().splitlines()[-1] if str(exc).strip() else "training failed"
        too_small = re.search(r"smaller than required_chars\. (\d+) vs (\d+)", message)
        if too_small:
            raise UsageError(
                f"--vocab-size {too_small.group(1)} is too small for this corpus: at --character-coverage {character_coverage:g} "
                f"its characters and the control/byte pieces need {too_small.group(2)}; pass --vocab-size {too_small.group(2)} or more, "
                "or lower --character-coverage so that rare characters fall back to bytes"
            ) from exc
        raise UsageError(f"SentencePiece training failed: {message}") from exc
    return buffer.getvalue()
