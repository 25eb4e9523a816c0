"""Llama-3's tiktoken ``tokenizer.model`` (``base64-token rank`` lines) → a byte-level BPE ``tokenizer.json``.

tiktoken merges the adjacent pair whose concatenation has the lowest rank; a byte-level BPE with
the ranks as ids and, for each multi-byte token, the one merge that tiktoken's own procedure ends
with (its two last parts) encodes identically (``ignore_merges`` as Llama-3's tokenizer.json).
The special tokens follow the ranks, named as in Meta's Llama-3 / 3.1 release.
"""

from __future__ import annotations

import base64
import json
from pathlib import Path

from cnllm.core.errors import UsageError

# Llama-3's pre-tokenizer split pattern (its tokenizer.json); byte-level BPE runs inside each piece.
LLAMA3_SPLIT_PATTERN = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)
LLAMA3_SPECIALS = ["<|begin_of_text|>", "<|end_of_text|>"] + [f"<|reserved_special_token_{i}|>" for i in range(4)] + [
    "<|start_header_id|>",
    "<|end_header_id|>",
    "<|reserved_special_token_4|>",
    "<|eot_id|>",
]
LLAMA31_SPECIALS = [
    "<|begin_of_text|>",
    "<|end_of_text|>",
    "<|reserved_special_token_0|>",
    "<|reserved_special_token_1|>",
    "<|finetune_right_pad_id|>",
    "<|step_id|>",
    "<|start_header_id|>",
    "<|end_header_id|>",
    "<|eom_id|>",
    "<|eot_id|>",
    "<|python_tag|>",
]
LLAMA3_SPECIAL_COUNT = 256


def is_tiktoken_file(path: Path) -> bool:
    """Whether ``path`` starts like a tiktoken ranks file (a SentencePiece model is binary protobuf)."""
    with open(path, "rb") as handle:
        head = handle.read(4096)
    first = head.split(b"\n", 1)[0].split()
    if len(first) != 2 or not first[1].isdigit():
        return False
    try:
        base64.b64decode(first[0], validate=True)
    except ValueError:
        return False
    return True


def read_ranks(path: Path) -> dict[bytes, int]:
    ranks = {}
    for number, line in enumerate(Path(path).read_bytes().splitlines(), start=1):
        if not line.strip():
            continue
        try:
            token, rank = line.split()
            ranks[base64.b64decode(token, validate=True)] = int(rank)
        except ValueError:
            raise UsageError(f"{path}:{number} is not a tiktoken line (base64 token, space, rank)") from None
    if sorted(ranks.values()) != list(range(len(ranks))):
        raise UsageError(f"{path}: tiktoken ranks must be 0…{len(ranks) - 1} without gaps")
    return ranks


def _byte_chars() -> dict[int, str]:
    from tokenizers import pre_tokenizers

    alphabet = pre_tokenizers.ByteLevel.alphabet()
    # GPT-2's bytes_to_unicode: printable bytes map to themselves, the rest to 256 + n in byte order.
    printable = [b for b in range(256) if chr(b) in alphabet]
    table = {b: chr(b) for b in printable}
    extra = 0
    for b in range(256):
        if b not in table:
            table[b] = chr(256 + extra)
            extra += 1
    return table


def _last_merge(ranks: dict[bytes, int], token: bytes) -> tuple[bytes, bytes]:
    """The final pair tiktoken's BPE joins to make ``token`` (merging only ranks below the token's own)."""
    limit = ranks[token]
    parts = [bytes([b]) for b in token]
    while len(parts) > 2:
        best, best_rank = None, None
        for i in range(len(parts) - 1):
            rank = ranks.get(parts[i] + parts[i + 1])
            if rank is not None and rank < limit and (best_rank is None or rank < best_rank):
                best, best_rank = i, rank
        if best is None:
            break
        parts[best:best + 2] = [parts[best] + parts[best + 1]]
    if len(parts) != 2:
        raise UsageError(f"tiktoken token {token!r} (rank {limit}) cannot be built from lower-ranked tokens")
    return parts[0], parts[1]


def build_tokenizer(ranks: dict[bytes, int], specials: list[str]):
    """A ``tokenizers.Tokenizer`` that encodes as tiktoken does with Llama-3's split pattern."""
    from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers, processors

    chars = _byte_chars()

    def text(token: bytes) -> str:
        return "".join(chars[b] for b in token)

    vocab = {text(token): rank for token, rank in ranks.items()}
    merges = []
    for token, _ in sorted(ranks.items(), key=lambda item: item[1]):
        if len(token) > 1:
            first, second = _last_merge(ranks, token)
            merges.append((text(first), text(second)))
    tokenizer = Tokenizer(models.BPE(vocab=vocab, merges=merges, ignore_merges=True))
    tokenizer.pre_tokenizer = pre_tokenizers.Sequence(
        [
            pre_tokenizers.Split(Regex(LLAMA3_SPLIT_PATTERN), behavior="isolated", invert=False),
            pre_tokenizers.ByteLevel(add_prefix_space=False, trim_offsets=True, use_regex=False),
        ]
    )
    tokenizer.decoder = decoders.ByteLevel()
    tokenizer.add_special_tokens(specials)
    bos = specials[0]
    tokenizer.post_processor = processors.TemplateProcessing(
        single=f"{bos}:0 $A:0", pair=f"{bos}:0 $A:0 {bos}:1 $B:1", special_tokens=[(bos, tokenizer.token_to_id(bos))]
    )
    return tokenizer


def special_names(scaled_rope: bool, count: int = LLAMA3_SPECIAL_COUNT) -> list[str]:
    """Meta's names of Llama-3 (or 3.1) special tokens, reserved ones numbered on to ``count``."""
    named = LLAMA31_SPECIALS if scaled_rope else LLAMA3_SPECIALS
    reserved = sum(1 for name in named if name.startswith("<|reserved_special_token_"))
    return (named + [f"<|reserved_special_token_{reserved + i}|>" for i in range(max(0, count - len(named)))])[:count]


def write_tokenizer_dir(
    ranks: dict[bytes, int], directory: Path, *, specials: int = LLAMA3_SPECIAL_COUNT, scaled_rope: bool = False, model_max_length: int = 8192
) -> None:
    """``tokenizer.json``, ``tokenizer_config.json`` and ``special_tokens_map.json`` for a Llama-3 tiktoken model."""
    tokenizer = build_tokenizer(ranks, special_names(scaled_rope, specials))
    tokenizer.save(str(directory / "tokenizer.json"))
    tokens = {"bos_token": "<|begin_of_text|>", "eos_token": "<|end_of_text|>"}
    config = {"tokenizer_class": "PreTrainedTokenizerFast", "clean_up_tokenization_spaces": True, "model_max_length": model_max_length, **tokens}
    (directory / "tokenizer_config.json").write_text(json.dumps(config, indent=2) + "\n", encoding="utf-8")
    (directory / "special_tokens_map.json").write_text(json.dumps(tokens, indent=2) + "\n", encoding="utf-8")
