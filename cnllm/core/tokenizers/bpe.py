"""Extending a byte-level BPE tokenizer (Llama-3 style) with new tokens reachable by merges.

New tokens become regular vocabulary entries, never "added tokens" (those are matched before
pre-tokenization and would change how surrounding text splits). Each new token must be one
pre-token of the base pre-tokenizer (otherwise no text could ever produce it). Its merges are
derived from how the tokenizer built so far splits it: adjacent parts are joined, one merge at
a time, until the token comes out whole; every merge is ranked after all existing ones and
produces a token the base lacks. So on any text the base merges run first exactly as before,
and the encoding of text that contains no new token is unchanged; base ids stay the same.
"""

from __future__ import annotations

import copy
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Sequence

from cnllm.core.progress import NULL_PROGRESS, Progress
from cnllm.core.tokenizers import sources
from cnllm.core.tokenizers.hf_export import SPIECE_UNDERLINE
from cnllm.core.tokenizers.sources import PAD_PIECE, padded_size, spm_candidates

UNUSED_TEMPLATE = "<|cnllm_unused_{}|>"


@dataclass
class BpeExtension:
    spec: dict
    base_size: int
    final_size: int
    added: int
    already_present: int
    skipped: int
    unreachable: int
    padding: int
    pad_token_id: int | None
    per_source: list[tuple[int, int]] = field(default_factory=list)


def _texts(source: sources.TokenizerSource) -> tuple[list[str], int]:
    """Candidate strings (plain text) from an ADD, in its order; SentencePiece's ``▁`` becomes a space.

    A piece that starts a word (``▁中国``) is offered both without and with its space: byte-level
    pre-tokenizers keep a preceding space inside the pre-token, and Chinese text rarely has one.
    """
    if source.kind == sources.SPM:
        pieces, skipped = spm_candidates(source)
    else:
        assert source.words is not None  # a byte-level base takes SentencePiece models and word lists only
        pieces, skipped = source.words, 0
    texts: list[str] = []
    for piece in pieces:
        text = piece.replace(SPIECE_UNDERLINE, " ")
        stripped = text.lstrip(" ")
        if stripped and stripped != text:
            texts.append(stripped)
        texts.append(text)
    return texts, skipped


class _MergeDeriver:
    """Derives merges for new tokens on top of a base BPE model whose merges already ran."""

    def __init__(self, base_tokenizer, base_vocab: dict[str, int]):
        self.base_model = base_tokenizer.model
        self.base_vocab = base_vocab
        self.rank: dict[tuple[str, str], int] = {}
        self.merges: list[tuple[str, str]] = []
        self.new_tokens: dict[str, None] = {}

    def split(self, token: str) -> list[str]:
        """How the tokenizer built so far splits ``token``: base BPE, then the new merges by rank."""
        parts = [t.value for t in self.base_model.tokenize(token)]
        while len(parts) > 1:
            ranked = [(self.rank[pair], i) for i, pair in enumerate(zip(parts, parts[1:])) if pair in self.rank]
            if not ranked:
                break
            _, i = min(ranked)
            parts[i : i + 2] = [parts[i] + parts[i + 1]]
        return parts

    def add(self, token: str) -> bool:
        """Add merges (and intermediate tokens) until ``token`` comes out whole; False if impossible."""
        added: list[tuple[str, str]] = []
        parts = self.split(token)
        while len(parts) > 1:
            pairs = [(a, b) for a, b in zip(parts, parts[1:]) if a + b not in self.base_vocab]
            if not pairs:
                for pair in added:  # roll back: this token cannot be reached without touching base merges
                    del self.rank[pair]
                    self.merges.pop()
                return False
            known = [pair for pair in pairs if "".join(pair) in self.new_tokens]
            pair = (known or pairs)[0]
            self.rank[pair] = len(self.merges)
            self.merges.append(pair)
            added.append(pair)
            parts = self.split(token)
        for a, b in added:
            self.new_tokens.setdefault(a + b, None)
        return True


def extend_byte_level(
    spec: dict,
    adds: Sequence[sources.TokenizerSource],
    *,
    add_pad_token: bool = False,
    pad_to_multiple_of: int | None = None,
    progress: Progress = NULL_PROGRESS,
) -> BpeExtension:
    """Return the extended ``tokenizer.json`` document and the counts of what was added."""
    from tokenizers import Tokenizer

    base_tokenizer = Tokenizer.from_str(json.dumps(spec))
    base_vocab: dict[str, int] = dict(spec["model"]["vocab"])
    # Added tokens go into the model's vocabulary too (as Llama-3 has them): tokenizers renumbers an
    # added token missing from it to the end of the model's vocabulary, which new entries would shift.
    for added in spec.get("added_tokens", []):
        base_vocab.setdefault(added["content"], added["id"])
    base_size = max(base_vocab.values()) + 1
    existing_pad = base_vocab.get(PAD_PIECE)
    normalizer, pre_tokenizer = base_tokenizer.normalizer, base_tokenizer.pre_tokenizer
    deriver = _MergeDeriver(base_tokenizer, base_vocab)
    per_source: list[tuple[int, int]] = []
    already = skipped = unreachable = 0
    offered = [_texts(source) for source in adds]
    progress.start(sum(len(texts) for texts, _ in offered), "deriving merges", unit="token")
    for texts, not_mergeable in offered:
        skipped += not_mergeable
        before = len(deriver.new_tokens)
        for text in texts:
            progress.advance(1)
            normalized = normalizer.normalize_str(text) if normalizer else text
            pieces = pre_tokenizer.pre_tokenize_str(normalized) if pre_tokenizer else [(normalized, None)]
            if len(pieces) != 1:
                skipped += 1  # spans several pre-tokens: no text could produce it as one token
                continue
            token = pieces[0][0]
            if token in base_vocab or token in deriver.new_tokens:
                already += 1
            elif not deriver.add(token):
                unreachable += 1
        per_source.append((len(texts), len(deriver.new_tokens) - before))
    progress.finish()

    extended = copy.deepcopy(spec)
    model = extended["model"]
    model["vocab"] = dict(base_vocab)
    next_id = base_size
    pad_id = existing_pad if add_pad_token else None
    if add_pad_token and existing_pad is None:
        pad_id, next_id = next_id, next_id + 1
        model["vocab"][PAD_PIECE] = pad_id  # special tokens live in the model's vocabulary too, as Llama-3's do
    new_tokens = list(deriver.new_tokens)
    for token in new_tokens:
        model["vocab"][token] = next_id
        next_id += 1
    padding = padded_size(next_id, pad_to_multiple_of) - next_id
    index = 0
    for _ in range(padding):
        while UNUSED_TEMPLATE.format(index) in model["vocab"]:
            index += 1
        model["vocab"][UNUSED_TEMPLATE.format(index)] = next_id
        next_id += 1
        index += 1
    as_strings = isinstance(model["merges"][0], str) if model["merges"] else False
    model["merges"] = list(model["merges"]) + [f"{a} {b}" if as_strings else [a, b] for a, b in deriver.merges]
    if add_pad_token and existing_pad is None:
        extended.setdefault("added_tokens", []).append(
            {"id": pad_id, "content": PAD_PIECE, "single_word": False, "lstrip": False, "rstrip": False, "normalized": False, "special": True}
        )
    _check_reachable(extended, new_tokens)
    return BpeExtension(
        spec=extended,
        base_size=base_size,
        final_size=next_id,
        added=len(new_tokens),
        already_present=already,
        skipped=skipped,
        unreachable=unreachable,
        padding=padding,
        pad_token_id=pad_id,
        per_source=per_source,
    )


def _check_reachable(spec: dict, new_tokens: list[str]) -> None:
    """Every new token must come out whole from the extended model: a wrong merge list is a bug, not output."""
    from tokenizers import Tokenizer

    from cnllm.core.errors import CheckFailed

    model = Tokenizer.from_str(json.dumps(spec)).model
    for token in new_tokens:
        parts = [t.value for t in model.tokenize(token)]
        if parts != [token]:
            raise CheckFailed(f"internal check failed: new token {token!r} encodes as {parts}")


def write_bpe_tokenizer_dir(extension: BpeExtension, directory: Path, base_config: dict, base_dir: Path | None) -> None:
    """``tokenizer.json`` plus the base's ``tokenizer_config.json`` / ``special_tokens_map.json`` (pad added)."""
    (directory / "tokenizer.json").write_text(json.dumps(extension.spec, ensure_ascii=False), encoding="utf-8")
    config = dict(base_config) or {"tokenizer_class": "PreTrainedTokenizerFast", "clean_up_tokenization_spaces": False}
    specials_path = base_dir / "special_tokens_map.json" if base_dir else None
    if specials_path is not None and specials_path.is_file():
        specials = json.loads(specials_path.read_text(encoding="utf-8"))
    else:
        specials = {key: config[key] for key in ("bos_token", "eos_token", "unk_token", "pad_token") if config.get(key)}
    if extension.pad_token_id is not None:
        config["pad_token"] = specials["pad_token"] = PAD_PIECE
        if isinstance(config.get("added_tokens_decoder"), dict):
            config["added_tokens_decoder"][str(extension.pad_token_id)] = {
                "content": PAD_PIECE, "lstrip": False, "normalized": False, "rstrip": False, "single_word": False, "special": True
            }
    (directory / "tokenizer_config.json").write_text(json.dumps(config, ensure_ascii=False, indent=2) + "\n", encoding="utf-8")
    (directory / "special_tokens_map.json").write_text(json.dumps(specials, ensure_ascii=False, indent=2) + "\n", encoding="utf-8")
