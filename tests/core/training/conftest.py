"""Fixtures for the training tests: an extended (larger) tokenizer and small run arguments."""

from __future__ import annotations

from pathlib import Path

import pytest

ZH_TOKENS = ["中国", "天气", "学校", "图书馆", "语言", "模型", "城市", "生活", "我们", "他们", "今天", "时候", "可以", "因为", "所以", "一个", "这个", "没有", "自己", "什么"]


@pytest.fixture(scope="session")
def zh_tokenizer_dir(tmp_path_factory, tiny_llama_dir) -> Path:
    """The tiny model's tokenizer plus 20 Chinese words: 1,020 tokens for a 1,000-row model (resize to 1,024)."""
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(str(tiny_llama_dir))
    tokenizer.add_tokens(ZH_TOKENS)
    out = tmp_path_factory.mktemp("zh-tokenizer")
    tokenizer.save_pretrained(str(out))
    return out


@pytest.fixture(autouse=True, scope="module")
def one_torch_thread():
    """Tiny models train fastest on one thread, above all on a shared, busy CPU; restored afterwards."""
    import torch

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)
