"""Tokenizer metadata: SentencePiece pieces and types, BPE pre-tokenizer detection, added-token conflicts."""

from __future__ import annotations

import json

import pytest

from cnllm.core.errors import UsageError
from cnllm.core.gguf.vocab import bpe_vocab, build_vocab, check_added_tokens, detect_pre_tokenizer, sentencepiece_vocab
from tests.core.gguf.util import copy_model


def test_detects_llama3_pre_tokenizer_from_its_definition(bpe_tokenizer_dir):
    definition = json.loads((bpe_tokenizer_dir / "tokenizer.json").read_text())["pre_tokenizer"]
    assert detect_pre_tokenizer(definition) == "llama-bpe"


def test_detects_the_real_llama3_tokenizer(shared_fixtures):
    definition = json.loads((shared_fixtures / "tokenizers/llama3-bpe/tokenizer.json").read_text())["pre_tokenizer"]
    assert detect_pre_tokenizer(definition) == "llama-bpe"


def test_detects_gpt2_and_rejects_unknown_definitions():
    assert detect_pre_tokenizer({"type": "ByteLevel", "add_prefix_space": False, "use_regex": True}) == "gpt-2"
    other_regex = {
        "type": "Sequence",
        "pretokenizers": [
            {"type": "Split", "pattern": {"Regex": r"\p{N}+|\s+"}, "behavior": "Isolated", "invert": False},
            {"type": "ByteLevel", "add_prefix_space": False, "use_regex": False},
        ],
    }
    assert detect_pre_tokenizer(other_regex) is None
    assert detect_pre_tokenizer({"type": "Whitespace"}) is None
    assert detect_pre_tokenizer(None) is None


def test_extended_bpe_vocabulary_keeps_its_pre_tokenizer(tmp_path, bpe_tokenizer_dir):
    from tokenizers import Tokenizer

    tokenizer = Tokenizer.from_file(str(bpe_tokenizer_dir / "tokenizer.json"))
    tokenizer.add_tokens(["中文", "模型"])
    model = copy_model(bpe_tokenizer_dir, tmp_path / "tok")
    tokenizer.save(str(model / "tokenizer.json"))
    vocab = bpe_vocab(model, vocab_size=tokenizer.get_vocab_size() + 3)
    assert vocab.pre == "llama-bpe"
    assert vocab.tokens[tokenizer.token_to_id("中文")] == "中文"
    assert vocab.tokens[-1].startswith("[PAD")


def test_unknown_pre_tokenizer_needs_an_explicit_name(tmp_path, bpe_tokenizer_dir):
    model = copy_model(bpe_tokenizer_dir, tmp_path / "tok")
    definition = json.loads((model / "tokenizer.json").read_text())
    definition["pre_tokenizer"]["pretokenizers"][0]["pattern"]["Regex"] = r"\p{L}+|\p{N}|\s+"
    (model / "tokenizer.json").write_text(json.dumps(definition))
    with pytest.raises(UsageError, match="--pre-tokenizer"):
        bpe_vocab(model, vocab_size=None)
    assert bpe_vocab(model, vocab_size=None, pre_tokenizer="llama-bpe").pre == "llama-bpe"


def test_sentencepiece_types_and_padding(spm_tokenizer_dir):
    import gguf

    vocab = sentencepiece_vocab(spm_tokenizer_dir, vocab_size=1005)
    assert len(vocab.tokens) == len(vocab.scores) == len(vocab.toktypes) == 1005
    types = dict(zip(vocab.tokens, vocab.toktypes))
    assert types[b"<0x0A>"] == gguf.TokenType.BYTE
    assert types[b"</s>"] == gguf.TokenType.CONTROL
    assert types[b"[PAD1004]"] == gguf.TokenType.UNUSED
    normal = [t for t, k in types.items() if k == gguf.TokenType.NORMAL]
    assert len(normal) > 500


def test_added_tokens_json_becomes_user_defined(tmp_path, spm_tokenizer_dir):
    import gguf

    model = copy_model(spm_tokenizer_dir, tmp_path / "tok")
    (model / "added_tokens.json").write_text(json.dumps({"[PAD]": 1000}))
    check_added_tokens(model)
    vocab = build_vocab(model, vocab_size=1001)
    assert vocab.tokens[1000] == b"[PAD]"
    assert vocab.toktypes[1000] == gguf.TokenType.USER_DEFINED


@pytest.mark.parametrize("added", [{"<s>": 7}, {"brand-new": 3}])
def test_conflicting_added_tokens_json_is_refused(tmp_path, spm_tokenizer_dir, added):
    model = copy_model(spm_tokenizer_dir, tmp_path / "tok")
    (model / "added_tokens.json").write_text(json.dumps(added))
    with pytest.raises(UsageError, match="conflicts with the tokenizer"):
        check_added_tokens(model)
