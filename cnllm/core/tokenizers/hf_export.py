"""Hugging Face tokenizer directories that reproduce SentencePiece exactly.

A LLaMA SentencePiece model is BPE over the whole (prefixed, space-escaped) string: at each
step the adjacent pair whose concatenation is a piece with the highest score is merged.
The ``tokenizer.json`` written here says exactly that: a ``Prepend("▁")`` + ``Replace(" ", "▁")``
normalizer, no pre-tokenizer, and a merge list holding every pair (left, right) of normal
pieces whose concatenation is a piece, ranked by that piece's score (ties by id). Byte
fallback and unknown handling match sentencepiece's. This is what lets the fast tokenizer,
sentencepiece and llama.cpp agree on every text.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from cnllm.core.tokenizers.spm import PIECE_CONTROL, PIECE_NORMAL, PIECE_UNKNOWN, PIECE_USER_DEFINED

SPIECE_UNDERLINE = "▁"


def spm_merges(proto) -> list[tuple[str, str]]:
    """Every (left, right) pair of mergeable pieces forming a piece, in sentencepiece's priority order."""
    mergeable = {p.piece: i for i, p in enumerate(proto.pieces) if p.type in (PIECE_NORMAL, PIECE_USER_DEFINED)}
    ranked = []
    for piece, piece_id in mergeable.items():
        score = proto.pieces[piece_id].score
        for cut in range(1, len(piece)):
            left, right = piece[:cut], piece[cut:]
            left_id, right_id = mergeable.get(left), mergeable.get(right)
            if left_id is not None and right_id is not None:
                ranked.append((-score, piece_id, left_id, right_id, left, right))
    ranked.sort()
    return [(left, right) for *_, left, right in ranked]


def spm_tokenizer(proto, *, add_bos: bool = True, add_eos: bool = False):
    """A ``tokenizers.Tokenizer`` equivalent to the SentencePiece model ``proto``."""
    from tokenizers import AddedToken, Tokenizer, decoders, models, normalizers, processors

    vocab = {p.piece: i for i, p in enumerate(proto.pieces)}
    unk = proto.pieces[proto.trainer_spec.unk_id].piece
    tokenizer = Tokenizer(
        models.BPE(vocab=vocab, merges=spm_merges(proto), unk_token=unk, byte_fallback=proto.trainer_spec.byte_fallback, fuse_unk=True)
    )
    steps: list[normalizers.Normalizer] = []
    if proto.normalizer_spec.add_dummy_prefix:
        steps.append(normalizers.Prepend(SPIECE_UNDERLINE))
    steps.append(normalizers.Replace(" ", SPIECE_UNDERLINE))
    tokenizer.normalizer = normalizers.Sequence(steps)
    tokenizer.pre_tokenizer = None
    decode_steps = [decoders.Replace(SPIECE_UNDERLINE, " "), decoders.ByteFallback(), decoders.Fuse()]
    if proto.normalizer_spec.add_dummy_prefix:
        decode_steps.append(decoders.Strip(" ", 1, 0))
    tokenizer.decoder = decoders.Sequence(decode_steps)
    specials = [
        AddedToken(p.piece, special=True, normalized=False) for p in proto.pieces if p.type in (PIECE_CONTROL, PIECE_UNKNOWN)
    ]
    tokenizer.add_special_tokens(specials)
    user_defined = [
        AddedToken(p.piece, special=False, normalized=False) for p in proto.pieces if p.type == PIECE_USER_DEFINED and len(p.piece) > 1
    ]
    if user_defined:
        tokenizer.add_tokens(user_defined)
    bos = proto.pieces[proto.trainer_spec.bos_id].piece if proto.trainer_spec.bos_id >= 0 else None
    eos = proto.pieces[proto.trainer_spec.eos_id].piece if proto.trainer_spec.eos_id >= 0 else None
    single, pair, special_ids = "$A:0", "$A:0 $B:1", []
    if add_bos and bos:
        single, pair = f"{bos}:0 {single}", f"{bos}:0 $A:0 {bos}:1 $B:1"
        special_ids.append((bos, vocab[bos]))
    if add_eos and eos:
        single = f"{single} {eos}:0"
        pair = pair.replace("$A:0 ", f"$A:0 {eos}:0 ") + f" {eos}:1"
        special_ids.append((eos, vocab[eos]))
    tokenizer.post_processor = processors.TemplateProcessing(single=single, pair=pair, special_tokens=special_ids)
    return tokenizer


def special_token_names(proto) -> dict[str, str]:
    spec = proto.trainer_spec
    names = {}
    for key, index in (("bos_token", spec.bos_id), ("eos_token", spec.eos_id), ("unk_token", spec.unk_id), ("pad_token", spec.pad_id)):
        if index >= 0:
            names[key] = proto.pieces[index].piece
    if "pad_token" not in names:
        pads = [p.piece for p in proto.pieces if p.piece == "<pad>"]
        if pads:
            names["pad_token"] = pads[0]
    return names


def write_spm_tokenizer_dir(
    proto,
    directory: Path | str,
    *,
    add_bos: bool = True,
    add_eos: bool = False,
    model_max_length: int = 4096,
    chat_template: str | None = None,
) -> None:
    """Write ``tokenizer.model``, ``tokenizer.json``, ``tokenizer_config.json`` and ``special_tokens_map.json``."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    (directory / "tokenizer.model").write_bytes(proto.SerializeToString())
    tokenizer = spm_tokenizer(proto, add_bos=add_bos, add_eos=add_eos)
    tokenizer.save(str(directory / "tokenizer.json"))
    specials = special_token_names(proto)
    added = {
        str(i): {"content": p.piece, "lstrip": False, "rstrip": False, "normalized": False, "single_word": False, "special": p.type != PIECE_USER_DEFINED}
        for i, p in enumerate(proto.pieces)
        if p.type in (PIECE_CONTROL, PIECE_UNKNOWN) or (p.type == PIECE_USER_DEFINED and len(p.piece) > 1)
    }
    config: dict[str, Any] = {
        "tokenizer_class": "PreTrainedTokenizerFast",
        "add_bos_token": add_bos,
        "add_eos_token": add_eos,
        "add_prefix_space": None,
        "legacy": True,
        "clean_up_tokenization_spaces": False,
        "sp_model_kwargs": {},
        "model_max_length": model_max_length,
        "added_tokens_decoder": added,
        **specials,
    }
    if chat_template:
        config["chat_template"] = chat_template
    (directory / "tokenizer_config.json").write_text(json.dumps(config, ensure_ascii=False, indent=2) + "\n", encoding="utf-8")
    (directory / "special_tokens_map.json").write_text(json.dumps(specials, ensure_ascii=False, indent=2) + "\n", encoding="utf-8")
