"""Byte-level BPE (Llama-3 style) extension: new tokens reachable by merges, base ids and encodings unchanged."""

from __future__ import annotations

import json

import pytest
from tokenizers import Tokenizer

from cnllm.core.errors import UsageError
from cnllm.core.tokenizers.merge import MergeVocabOptions, merge_vocab
from tests.conftest import read_vectors
from tests.core.tokenizers.conftest import sample_texts


def encode(tokenizer: Tokenizer, text: str) -> list[int]:
    return tokenizer.encode(text, add_special_tokens=False).ids


@pytest.fixture(scope="module")
def extended_bpe(bpe_tokenizer_dir, zh_spm_model, tmp_path_factory):
    out = tmp_path_factory.mktemp("bpe-merge") / "out"
    return merge_vocab(bpe_tokenizer_dir, [zh_spm_model], out, MergeVocabOptions(add_pad_token=True, pad_to_multiple_of=64))


def test_base_ids_kept_and_new_tokens_are_regular_vocab(bpe_tokenizer_dir, extended_bpe):
    base = json.loads((bpe_tokenizer_dir / "tokenizer.json").read_text(encoding="utf-8"))
    out = json.loads((extended_bpe.output / "tokenizer.json").read_text(encoding="utf-8"))
    base_vocab, vocab = base["model"]["vocab"], out["model"]["vocab"]
    assert all(vocab[token] == index for token, index in base_vocab.items())
    assert out["model"]["merges"][: len(base["model"]["merges"])] == base["model"]["merges"]
    assert [t for t in out["added_tokens"] if t["content"] != "<pad>"] == base["added_tokens"]
    assert extended_bpe.added > 500 and extended_bpe.unreachable == 0
    ids = sorted(set(vocab.values()) | {t["id"] for t in out["added_tokens"]})
    assert ids == list(range(extended_bpe.final_size)) and extended_bpe.final_size % 64 == 0
    assert extended_bpe.pad_token_id == extended_bpe.base_size
    loaded = Tokenizer.from_file(str(extended_bpe.output / "tokenizer.json"))
    assert all(loaded.token_to_id(t["content"]) == t["id"] for t in base["added_tokens"])


def test_new_tokens_reachable_and_used(bpe_tokenizer_dir, extended_bpe, assets):
    base = Tokenizer.from_file(str(bpe_tokenizer_dir / "tokenizer.json"))
    extended = Tokenizer.from_file(str(extended_bpe.output / "tokenizer.json"))
    text = (assets / "zh_heldout.txt").read_text(encoding="utf-8")
    assert len(encode(extended, text)) < 0.6 * len(encode(base, text))
    first_new = extended_bpe.base_size + 1
    assert any(i >= first_new for i in encode(extended, "今天天气很好"))


def test_text_without_new_tokens_encodes_as_before(bpe_tokenizer_dir, extended_bpe, assets):
    base = Tokenizer.from_file(str(bpe_tokenizer_dir / "tokenizer.json"))
    extended = Tokenizer.from_file(str(extended_bpe.output / "tokenizer.json"))
    english = (assets / "en.txt").read_text(encoding="utf-8").splitlines()
    untouched = 0
    for text in sample_texts(assets) + english:
        ids = encode(extended, text)
        if all(i < extended_bpe.base_size for i in ids):
            assert ids == encode(base, text), text
            untouched += 1
    assert untouched > len(english) // 2


def test_padding_entries_never_produced(extended_bpe):
    out = json.loads((extended_bpe.output / "tokenizer.json").read_text(encoding="utf-8"))
    unused = {i for token, i in out["model"]["vocab"].items() if token.startswith("<|cnllm_unused_")}
    assert len(unused) == extended_bpe.padding > 0
    extended = Tokenizer.from_file(str(extended_bpe.output / "tokenizer.json"))
    text = " ".join(f"<|cnllm_unused_{k}|>" for k in range(extended_bpe.padding)) + " 天气很好"
    assert not set(encode(extended, text)) & unused


def test_round_trip_and_transformers_load(extended_bpe, assets):
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(str(extended_bpe.output))
    assert len(tokenizer) == extended_bpe.final_size
    assert tokenizer.pad_token == "<pad>" and tokenizer.pad_token_id == extended_bpe.pad_token_id
    for text in sample_texts(assets, per_file=10):
        ids = tokenizer(text, add_special_tokens=False)["input_ids"]
        assert tokenizer.decode(ids) == text


def test_word_list_into_bpe(bpe_tokenizer_dir, tmp_path):
    words = tmp_path / "words.txt"
    words.write_text("语言模型\n 中文\n中文。\n", encoding="utf-8")
    result = merge_vocab(bpe_tokenizer_dir, [words], tmp_path / "out")
    extended = Tokenizer.from_file(str(tmp_path / "out" / "tokenizer.json"))
    # "中文。" spans two pre-tokens (letters, punctuation): no text could produce it, so it is skipped.
    assert result.skipped == 1
    tokens = [extended.id_to_token(i) for i in encode(extended, "语言模型和 中文")]
    assert "è¯Ńè¨Ģæ¨¡åŀĭ" in tokens and "Ġä¸Ńæĸĩ" in tokens


def test_bpe_add_into_bpe_refused(bpe_tokenizer_dir, zh_spm_model, tmp_path):
    with pytest.raises(UsageError, match="cannot be merged into a byte-level BPE base"):
        merge_vocab(bpe_tokenizer_dir, [bpe_tokenizer_dir / "tokenizer.json"], tmp_path / "out")
    with pytest.raises(UsageError, match="--scores applies to SentencePiece bases"):
        merge_vocab(bpe_tokenizer_dir, [zh_spm_model], tmp_path / "out", MergeVocabOptions(scores="zero"))
    assert list(tmp_path.iterdir()) == []


def test_spm_tokenizer_json_base_refused(spm_tokenizer_dir, zh_spm_model, tmp_path):
    with pytest.raises(UsageError, match="not a byte-level BPE tokenizer.json"):
        merge_vocab(spm_tokenizer_dir / "tokenizer.json", [zh_spm_model], tmp_path / "out")


def test_llama3_vectors_unchanged_after_extension(shared_fixtures, zh_spm_model, tmp_path):
    folder = shared_fixtures / "tokenizers" / "llama3-bpe"
    result = merge_vocab(folder, [zh_spm_model], tmp_path / "out")
    assert result.base_size == 128256 and result.added > 0 and result.unreachable == 0
    extended = Tokenizer.from_file(str(tmp_path / "out" / "tokenizer.json"))
    vectors = read_vectors(folder)
    assert len(vectors) == 46
    assert [encode(extended, text) for text, _ in vectors] == [ids for _, ids in vectors]
    assert extended.id_to_token(128000) == "<|begin_of_text|>"
