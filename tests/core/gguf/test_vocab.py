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


def _gpt2_style_tokenizer(out_dir, texts: list[str], *, bos_template: bool) -> None:
    """A byte-level BPE with GPT-2's built-in regex, ChatML-like specials, with or without a BOS post-processor."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers

    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=400, initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), special_tokens=["<|endoftext|>", "<|im_start|>", "<|im_end|>"], show_progress=False)
    tokenizer.train_from_iterator(texts, trainer=trainer)
    if bos_template:
        tokenizer.post_processor = processors.TemplateProcessing(single="<|im_start|> $A", special_tokens=[("<|im_start|>", 1)])
    out_dir.mkdir(parents=True, exist_ok=True)
    tokenizer.save(str(out_dir / "tokenizer.json"))
    (out_dir / "tokenizer_config.json").write_text(json.dumps({"bos_token": "<|im_start|>", "eos_token": "<|im_end|>"}), encoding="utf-8")


@pytest.mark.parametrize("digits, expected", [("fox3 jumps1 over4 the1 dog5", "smollm"), ("314 159 2653 314 159 2653", "gpt-2")])
def test_gpt2_regex_over_single_numeral_tokens_is_smollm(tmp_path, digits, expected):
    # the reference converter writes "smollm" for SmolLM2's tokenizer, whose numerals never merge
    _gpt2_style_tokenizer(tmp_path, ["the quick brown fox " + digits] * 50, bos_template=False)
    assert bpe_vocab(tmp_path, None).pre == expected
    assert bpe_vocab(tmp_path, None, pre_tokenizer="gpt-2").pre == "gpt-2"  # an explicit name wins
    steps = [{"type": "Digits", "individual_digits": True}, {"type": "ByteLevel", "add_prefix_space": False, "use_regex": True}]
    assert detect_pre_tokenizer({"type": "Sequence", "pretokenizers": steps}) == "smollm"


@pytest.mark.parametrize("bos_template", [False, True])
def test_add_bos_false_is_written_when_the_tokenizer_adds_no_bos(tmp_path, bos_template):
    import gguf

    from tests.core.gguf.util import gguf_fields

    _gpt2_style_tokenizer(tmp_path, ["the quick brown fox 3 1 4"] * 50, bos_template=bos_template)
    vocab = bpe_vocab(tmp_path, None)
    writer = gguf.GGUFWriter(tmp_path / "v.gguf", "llama")
    vocab.add_to(writer, tmp_path)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.close()
    fields = gguf_fields(tmp_path / "v.gguf")
    assert fields["tokenizer.ggml.bos_token_id"] == 1
    assert fields["tokenizer.ggml.add_bos_token"] is bos_template
