"""The one backend dispatcher: what a model path holds picks llama.cpp or transformers, with one set of messages."""

import pytest

from cnllm.core.backends import LLAMA_CPP, TRANSFORMERS, backend_for, load_model
from cnllm.core.errors import UsageError


def test_load_model_rejects_what_it_cannot_run(tmp_path):
    with pytest.raises(UsageError, match="does not exist"):
        load_model(tmp_path / "missing.gguf")
    text = tmp_path / "model.bin"
    text.write_bytes(b"not a model")
    with pytest.raises(UsageError, match="not a GGUF file"):
        load_model(text)
    (tmp_path / "x.gguf").write_bytes(b"GGUF")
    with pytest.raises(UsageError, match="pass that file"):
        load_model(tmp_path)
    truncated = tmp_path / "truncated.gguf"
    truncated.write_bytes(b"GGUF" + b"\x03\x00\x00\x00" + b"\x00" * 7)
    with pytest.raises(UsageError, match="truncated.gguf"):
        load_model(truncated)


def test_backend_for(tiny_llama_dir, tiny_gguf, tmp_path):
    assert backend_for(tiny_llama_dir) == TRANSFORMERS
    assert backend_for(tiny_gguf) == LLAMA_CPP
    with pytest.raises(UsageError, match="--lora applies to Hugging Face model directories"):
        backend_for(tiny_gguf, lora=tmp_path)
    with pytest.raises(UsageError, match="--load-in-4bit/--load-in-8bit applies"):
        backend_for(tiny_gguf, quantize=True)
