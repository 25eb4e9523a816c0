"""Fixtures for the tokenizer tests: a tiny Chinese SentencePiece model and merges built from it."""

from __future__ import annotations

from pathlib import Path

import pytest

MIXED_TEXTS = [
    "Hello world",
    " leading space and  two spaces",
    "我想在apple工作1314151天～",
    "大语言模型（LLM）在2023年取得了很大进展。",
    "emoji 🦙🚀😶‍🌫️ and 中文 mixed",
    "数字 3.14159 和 1,000,000",
    "tabs\tand\nnewlines 换行",
]


def sample_texts(assets: Path, per_file: int = 40) -> list[str]:
    """Chinese, English, held-out and mixed lines for tokenizer agreement checks."""
    texts = list(MIXED_TEXTS)
    for name in ("zh.txt", "zh_heldout.txt", "en.txt"):
        texts += (assets / name).read_text(encoding="utf-8").splitlines()[:per_file]
    return texts


@pytest.fixture(scope="session")
def zh_spm_model(tmp_path_factory, assets) -> Path:
    """A 2,000-piece Chinese BPE SentencePiece model trained on cnllm/assets/zh.txt."""
    from cnllm.core.tokenizers.train import TrainVocabOptions, train_vocab

    return train_vocab([assets / "zh.txt"], tmp_path_factory.mktemp("zh-spm") / "zh.model", TrainVocabOptions(vocab_size=2000)).output


@pytest.fixture(scope="session")
def merged_spm_dir(tmp_path_factory, spm_tokenizer_dir, zh_spm_model) -> Path:
    """The tiny English SentencePiece tokenizer extended with the Chinese model (default ranked scores)."""
    from cnllm.core.tokenizers.merge import merge_vocab

    return merge_vocab(spm_tokenizer_dir, [zh_spm_model], tmp_path_factory.mktemp("merged") / "out").output
