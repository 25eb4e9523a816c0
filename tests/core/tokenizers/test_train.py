"""``vocab train``: LLaMA trainer settings, corpus handling, clear failures."""

from __future__ import annotations

import json

import pytest

from cnllm.core.errors import OutputExistsError, UsageError
from cnllm.core.tokenizers.spm import load_proto
from cnllm.core.tokenizers.train import TrainVocabOptions, train_vocab


def test_trains_with_llama_settings(tmp_path, assets):
    corpus = tmp_path / "corpus"
    corpus.mkdir()
    (corpus / "a.txt").write_bytes((assets / "zh.txt").read_bytes() + b"\xff\xfe broken line\n")
    records = [{"text": line} for line in (assets / "zh_heldout.txt").read_text(encoding="utf-8").splitlines()]
    (corpus / "b.jsonl").write_text("\n".join(json.dumps(r, ensure_ascii=False) for r in records) + "\n{\"no\": 1}\n", encoding="utf-8")
    result = train_vocab([corpus], tmp_path / "zh.model", TrainVocabOptions(vocab_size=2200))
    proto = load_proto(result.output)
    assert result.pieces == len(proto.pieces) == 2200
    assert result.corpus.invalid_utf8_lines == 1 and result.corpus.invalid_json_lines == 1 and result.corpus.files == 2
    spec = proto.trainer_spec
    assert spec.byte_fallback and spec.split_digits and spec.model_type == 2
    assert proto.normalizer_spec.name == "identity" and (spec.unk_id, spec.bos_id, spec.eos_id) == (0, 1, 2)


def test_unigram_and_sampling(tmp_path, assets):
    result = train_vocab([assets / "zh.txt"], tmp_path / "u.model", TrainVocabOptions(vocab_size=2000, model_type="unigram", input_sentence_size=120))
    assert load_proto(result.output).trainer_spec.model_type == 1
    with pytest.raises(UsageError, match="--input-sentence-size"):
        train_vocab([assets / "zh.txt"], tmp_path / "s.model", TrainVocabOptions(vocab_size=2000, input_sentence_size=50))


def test_empty_corpus(tmp_path):
    empty = tmp_path / "empty.txt"
    empty.write_text("\n  \n", encoding="utf-8")
    with pytest.raises(UsageError, match="no text lines"):
        train_vocab([empty], tmp_path / "out.model", TrainVocabOptions(vocab_size=100))
    assert not (tmp_path / "out.model").exists()


def test_vocab_too_large_for_corpus(tmp_path, assets):
    with pytest.raises(UsageError, match=r"--vocab-size 500 is too small for this corpus: .* pass --vocab-size \d+ or more"):
        train_vocab([assets / "zh_heldout.txt"], tmp_path / "out.model", TrainVocabOptions(vocab_size=500))
    assert [p.name for p in tmp_path.iterdir()] == []


def test_existing_output(tmp_path, assets):
    (tmp_path / "out.model").write_text("x")
    with pytest.raises(OutputExistsError):
        train_vocab([assets / "zh.txt"], tmp_path / "out.model", TrainVocabOptions(vocab_size=2000))
