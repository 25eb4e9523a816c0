"""Recognising what a path given as a tokenizer holds, with one clear message for anything else."""

from __future__ import annotations

import pytest

from cnllm.core.errors import UsageError
from cnllm.core.tokenizers import sources


def test_directories_and_files(spm_tokenizer_dir, bpe_tokenizer_dir):
    spm_dir = sources.load_source(spm_tokenizer_dir)
    assert spm_dir.kind == sources.SPM and spm_dir.directory == spm_tokenizer_dir
    assert sources.load_source(spm_tokenizer_dir / "tokenizer.model").kind == sources.SPM
    bpe = sources.load_source(bpe_tokenizer_dir)
    assert bpe.kind == sources.BPE and sources.is_byte_level(bpe.spec)
    # The SentencePiece tokenizer.json written by hf_export is BPE but not byte-level.
    assert not sources.is_byte_level(sources.load_source(spm_tokenizer_dir / "tokenizer.json").spec)


def test_word_list_only_where_allowed(tmp_path):
    words = tmp_path / "words.txt"
    words.write_text("中文\n\n中文\n语言\r\n", encoding="utf-8")
    assert sources.load_source(words, allow_words=True).words == ["中文", "语言"]
    with pytest.raises(UsageError, match="not a tokenizer"):
        sources.load_source(words)


@pytest.mark.parametrize(
    "content, message",
    [
        (b"GGUF\x03\x00\x00\x00" + bytes(64), "GGUF model file"),
        (bytes(range(256)) * 8, "not a tokenizer"),
        (b"{\"not\": \"a tokenizer\"}", "no 'model' section"),
        (b"{broken json", "not valid JSON"),
        (b"", "empty word list"),
    ],
)
def test_bad_inputs(tmp_path, content, message):
    path = tmp_path / "input.bin"
    path.write_bytes(content)
    with pytest.raises(UsageError, match=message) as info:
        sources.load_source(path, allow_words=True)
    assert "\n" not in info.value.message and str(path) in info.value.message


def test_missing_and_empty_directory(tmp_path):
    with pytest.raises(UsageError, match="does not exist"):
        sources.load_source(tmp_path / "nope.model")
    with pytest.raises(UsageError, match="holds no tokenizer.model or tokenizer.json"):
        sources.load_source(tmp_path)
