"""Tokenizer metadata for GGUF (``tokenizer.ggml.*``), written the way llama.cpp's reference converter does.

Two tokenizer families:

* ``llama`` — SentencePiece (``tokenizer.model``): every piece with its score and type (normal,
  unknown, control, byte, unused, user-defined), ``added_tokens.json`` and the
  ``added_tokens_decoder`` of ``tokenizer_config.json`` on top, ``[PAD<i>]`` for embedding rows
  past the tokenizer.
* ``gpt2`` — byte-level BPE (``tokenizer.json``): tokens, types and merges, plus the name of
  llama.cpp's pre-tokenizer. The reference converter identifies the pre-tokenizer by hashing the
  ids of a sample text, which breaks as soon as a vocabulary is extended (the ids change); here it
  is read from the ``pre_tokenizer`` definition itself, which vocabulary extension leaves alone, and
  from what the vocabulary can produce: GPT-2's regex over a vocabulary whose numerals are single
  characters (SmolLM's, trained with digits split) tokenizes exactly as llama.cpp's ``smollm``, the
  name the reference writes for it. A tokenizer that puts no BOS before a text gets
  ``add_bos_token = false`` (llama.cpp would otherwise add one).

Special ids, ``add_bos``/``add_eos``, merges and the chat template come from ``gguf.SpecialVocab``.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from cnllm.core.errors import UsageError
from cnllm.core.files import read_json_object
from cnllm.core.tokenizers.spm import load_processor
from cnllm.core.tokenizers.tiktoken import LLAMA3_SPLIT_PATTERN

SPIECE_UNDERLINE = "\u2581"

# llama.cpp pre-tokenizer names (llama-vocab.cpp) keyed by the Hugging Face pre_tokenizer that implements them:
# ("split", regex) for Split + ByteLevel(use_regex=False), ("bytelevel",) for GPT-2's built-in regex.
QWEN2_SPLIT_PATTERN = r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
PRE_TOKENIZERS = {
    ("split", LLAMA3_SPLIT_PATTERN): "llama-bpe",
    ("split", QWEN2_SPLIT_PATTERN): "qwen2",
    ("bytelevel",): "gpt-2",
    ("digits", "bytelevel"): "smollm",  # GPT-2's regex after each numeral is split off
}
KNOWN_PRE_TOKENIZER_NAMES = sorted(set(PRE_TOKENIZERS.values()))


@dataclass
class TokenizerVocab:
    """What goes under ``tokenizer.ggml.*`` besides the special-token metadata."""

    model: str  # "llama" (SentencePiece) or "gpt2" (byte-level BPE)
    pre: str
    tokens: list = field(repr=False)
    toktypes: list[int] = field(repr=False)
    scores: list[float] | None = field(default=None, repr=False)
    add_space_prefix: bool | None = None
    first_id: int | None = None  # the first id the tokenizer gives a text: its BOS when it adds one

    def add_to(self, writer, model_dir: Path) -> None:
        import gguf

        if self.add_space_prefix is not None:
            writer.add_add_space_prefix(self.add_space_prefix)
        writer.add_tokenizer_model(self.model)
        writer.add_tokenizer_pre(self.pre)
        writer.add_token_list(self.tokens)
        if self.scores is not None:
            writer.add_token_scores(self.scores)
        writer.add_token_types(self.toktypes)
        if self.model == "gpt2":
            special = gguf.SpecialVocab(model_dir, load_merges=True)
        else:
            special = gguf.SpecialVocab(model_dir, n_vocab=len(self.tokens))
        special.add_to_gguf(writer, quiet=True)
        bos = special.special_token_ids.get("bos")
        if self.model == "gpt2" and "bos" not in special.add_special_token and bos is not None and self.first_id != bos:
            writer.add_add_bos_token(False)


def looks_special(token: str) -> bool:
    """Added tokens some models forget to mark special (the reference converter's heuristic)."""
    return (
        token in ("<pad>", "<mask>", "<2mass>", "[@BOS@]")
        or (token.startswith("<|") and token.endswith("|>"))
        or (token.startswith("<\uff5c") and token.endswith("\uff5c>"))
        or (token.startswith("<unused") and token.endswith(">"))
    )


def tokenizer_kind(model_dir: Path) -> str:
    """``"spm"`` (tokenizer.model) or ``"gpt2"`` (byte-level BPE tokenizer.json).

    A SentencePiece-style tokenizer.json (byte fallback) without its tokenizer.model is refused: llama.cpp's
    SentencePiece tokenizer merges by piece score, which tokenizer.json does not carry (the reference converter
    writes a constant score there, and llama.cpp then splits text differently from the Hugging Face tokenizer).
    """
    if (model_dir / "tokenizer.model").is_file():
        return "spm"
    if (model_dir / "tokenizer.json").is_file():
        definition = read_json_object(model_dir / "tokenizer.json")
        model = definition.get("model") or {}
        if model.get("type") == "BPE" and model.get("byte_fallback"):
            raise UsageError(
                f"{model_dir / 'tokenizer.json'} is a SentencePiece tokenizer but {model_dir} has no tokenizer.model; "
                "copy the original tokenizer.model next to the weights (llama.cpp needs its piece scores)"
            )
        if model.get("type") == "BPE":
            return "gpt2"
        raise UsageError(f"{model_dir / 'tokenizer.json'}: a {model.get('type')} tokenizer is not supported (SentencePiece or byte-level BPE only)")
    raise UsageError(f"{model_dir} has no tokenizer (tokenizer.model or tokenizer.json); copy the tokenizer files next to the weights")


def base_vocabulary(model_dir: Path) -> dict[str, int]:
    """Token → id of the tokenizer itself (SentencePiece pieces, or tokenizer.json vocab + added tokens)."""
    if (model_dir / "tokenizer.model").is_file():
        processor = load_processor(model_dir / "tokenizer.model")
        return {processor.IdToPiece(i): i for i in range(processor.GetPieceSize())}
    definition = read_json_object(model_dir / "tokenizer.json")
    vocab = dict(definition.get("model", {}).get("vocab") or {})
    vocab.update({t["content"]: t["id"] for t in definition.get("added_tokens", [])})
    return vocab


def check_added_tokens(model_dir: Path) -> None:
    """Refuse an ``added_tokens.json`` that contradicts the tokenizer (a stray file from another vocabulary)."""
    path = model_dir / "added_tokens.json"
    if not path.is_file():
        return
    added = read_json_object(path)
    vocab = base_vocabulary(model_dir)
    by_id = {i: t for t, i in vocab.items()}
    for token, token_id in added.items():
        if not isinstance(token_id, int):
            raise UsageError(f"{path}: id of {token!r} is not an integer")
        if token in vocab and vocab[token] != token_id:
            raise UsageError(
                f"{path} conflicts with the tokenizer: {token!r} is id {vocab[token]} in the tokenizer but {token_id} in "
                "added_tokens.json; delete the stray added_tokens.json or fix its ids"
            )
        if token_id in by_id and by_id[token_id] != token:
            raise UsageError(
                f"{path} conflicts with the tokenizer: id {token_id} is {by_id[token_id]!r} in the tokenizer but {token!r} in "
                "added_tokens.json; delete the stray added_tokens.json or fix its ids"
            )


def sentencepiece_vocab(model_dir: Path, vocab_size: int | None) -> TokenizerVocab:
    """Pieces, scores and types of ``tokenizer.model`` padded to the embedding rows, with added tokens applied."""
    import gguf

    processor = load_processor(model_dir / "tokenizer.model")
    size = vocab_size or processor.vocab_size()
    tokens: list[bytes] = [f"[PAD{i}]".encode() for i in range(size)]
    scores = [-10000.0] * size
    toktypes = [int(gguf.TokenType.UNUSED)] * size
    for token_id in range(min(processor.vocab_size(), size)):
        toktype = gguf.TokenType.NORMAL
        if processor.IsUnknown(token_id):
            toktype = gguf.TokenType.UNKNOWN
        elif processor.IsControl(token_id):
            toktype = gguf.TokenType.CONTROL
        elif processor.IsUnused(token_id):
            toktype = gguf.TokenType.UNUSED
        elif processor.IsByte(token_id):
            toktype = gguf.TokenType.BYTE
        tokens[token_id] = processor.IdToPiece(token_id).encode("utf-8")
        scores[token_id] = processor.GetScore(token_id)
        toktypes[token_id] = int(toktype)

    added_path = model_dir / "added_tokens.json"
    if added_path.is_file():
        for token, token_id in read_json_object(added_path).items():
            if token_id < size:
                tokens[token_id] = token.encode("utf-8")
                scores[token_id] = -1000.0
                toktypes[token_id] = int(gguf.TokenType.USER_DEFINED)

    config_path = model_dir / "tokenizer_config.json"
    if config_path.is_file():
        config = read_json_object(config_path)
        for key, data in (config.get("added_tokens_decoder") or {}).items():
            token_id, token = int(key), data["content"]
            if token_id >= size:
                continue
            if data.get("special") or looks_special(token):
                toktypes[token_id] = int(gguf.TokenType.CONTROL)
            else:
                token = token.replace(SPIECE_UNDERLINE, " ")
                toktypes[token_id] = int(gguf.TokenType.USER_DEFINED)
            scores[token_id] = -1000.0
            tokens[token_id] = token.encode("utf-8")
    return TokenizerVocab("llama", "default", tokens, toktypes, scores)


def detect_pre_tokenizer(definition: dict | None) -> str | None:
    """llama.cpp's name for a tokenizer.json ``pre_tokenizer`` definition, or None when it is not one llama.cpp implements."""
    if not definition:
        return None
    steps: list[dict] = (definition.get("pretokenizers") or []) if definition.get("type") == "Sequence" else [definition]
    if len(steps) == 1 and steps[0].get("type") == "ByteLevel" and steps[0].get("use_regex", True):
        key: tuple = ("bytelevel",)
    elif (
        len(steps) == 2
        and steps[0].get("type") == "Digits"
        and steps[0].get("individual_digits")
        and steps[1].get("type") == "ByteLevel"
        and steps[1].get("use_regex", True)
    ):
        key = ("digits", "bytelevel")
    elif (
        len(steps) == 2
        and steps[0].get("type") == "Split"
        and str(steps[0].get("behavior", "")).lower() == "isolated"
        and not steps[0].get("invert")
        and steps[1].get("type") == "ByteLevel"
        and not steps[1].get("use_regex", True)
        and not steps[1].get("add_prefix_space")
    ):
        key = ("split", (steps[0].get("pattern") or {}).get("Regex"))
    else:
        return None
    return PRE_TOKENIZERS.get(key)


def numerals_stand_alone(tokens) -> bool:
    """Whether every token holding a numeral (Unicode N*) is that one numeral alone, so splitting numerals off
    first (llama.cpp's ``smollm``) changes no tokenization. ``tokens`` are byte-level strings."""
    import unicodedata

    from tokenizers.decoders import ByteLevel

    decoder = ByteLevel()
    seen = False
    for token in tokens:
        text = decoder.decode([token])
        if any(unicodedata.category(c).startswith("N") for c in text):
            seen = True
            if len(text) != 1:
                return False
    return seen


def bpe_vocab(model_dir: Path, vocab_size: int | None, pre_tokenizer: str | None = None) -> TokenizerVocab:
    """Tokens and types of a byte-level BPE ``tokenizer.json`` (rows past it are ``[PAD<i>]``), and its pre-tokenizer."""
    import gguf
    from tokenizers import Tokenizer

    path = model_dir / "tokenizer.json"
    definition = read_json_object(path)
    pre = pre_tokenizer or detect_pre_tokenizer(definition.get("pre_tokenizer"))
    if pre is None:
        raise UsageError(
            f"{path}: its pre_tokenizer is not one llama.cpp implements under a known name "
            f"({', '.join(KNOWN_PRE_TOKENIZER_NAMES)}); pass --pre-tokenizer NAME if you know which one it matches"
        )
    tokenizer = Tokenizer.from_file(str(path))
    if pre == "gpt-2" and pre_tokenizer is None and numerals_stand_alone(tokenizer.get_vocab(with_added_tokens=False)):
        pre = "smollm"
    vocab = tokenizer.get_vocab(with_added_tokens=True)
    size = vocab_size or (max(vocab.values()) + 1)
    by_id = {i: t for t, i in vocab.items()}
    added = tokenizer.get_added_tokens_decoder()
    tokens: list[str] = []
    toktypes: list[int] = []
    for token_id in range(size):
        token = by_id.get(token_id)
        if token is None:
            tokens.append(f"[PAD{token_id}]")
            toktypes.append(int(gguf.TokenType.UNUSED))
            continue
        if token_id in added:
            added_token = added[token_id]
            if not added_token.normalized:
                # llama.cpp expects added tokens pre-normalized: encode and decode them as the tokenizer would.
                token = tokenizer.decode(tokenizer.encode(token, add_special_tokens=False).ids, skip_special_tokens=False)
            if added_token.special or looks_special(token):
                toktypes.append(int(gguf.TokenType.CONTROL))
            else:
                token = token.replace(SPIECE_UNDERLINE, " ")
                toktypes.append(int(gguf.TokenType.USER_DEFINED))
        else:
            toktypes.append(int(gguf.TokenType.NORMAL))
        tokens.append(token)
    first_id = next(iter(tokenizer.encode("a").ids), None)
    return TokenizerVocab("gpt2", pre, tokens, toktypes, first_id=first_id)


def build_vocab(
    model_dir: Path | str, vocab_size: int | None, *, pre_tokenizer: str | None = None, space_prefix_from_config: bool = True
) -> TokenizerVocab:
    """The tokenizer metadata of a model directory, sized to ``vocab_size`` (``config.vocab_size``);
    ``space_prefix_from_config``: copy ``tokenizer_config.json``'s ``add_prefix_space`` (the architecture row says)."""
    model_dir = Path(model_dir)
    kind = tokenizer_kind(model_dir)
    if kind == "spm":
        vocab = sentencepiece_vocab(model_dir, vocab_size)
    else:
        vocab = bpe_vocab(model_dir, vocab_size, pre_tokenizer)
    config_path = model_dir / "tokenizer_config.json"
    if space_prefix_from_config and config_path.is_file():
        vocab.add_space_prefix = read_json_object(config_path).get("add_prefix_space")
    return vocab
