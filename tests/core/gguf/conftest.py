"""GGUF files converted once per session from the tiny fixture models."""

from __future__ import annotations

from pathlib import Path

import pytest


@pytest.fixture(scope="session")
def tiny_spm_f32_gguf(tmp_path_factory, tiny_llama_dir) -> Path:
    from cnllm.core.gguf.convert import ConvertOptions, convert_to_gguf

    return convert_to_gguf(tiny_llama_dir, tmp_path_factory.mktemp("gguf") / "spm-f32.gguf", ConvertOptions(outtype="f32")).output


@pytest.fixture(scope="session")
def tiny_bpe_f32_gguf(tmp_path_factory, tiny_llama3_dir) -> Path:
    from cnllm.core.gguf.convert import ConvertOptions, convert_to_gguf

    return convert_to_gguf(tiny_llama3_dir, tmp_path_factory.mktemp("gguf") / "bpe-f32.gguf", ConvertOptions(outtype="f32")).output


@pytest.fixture(scope="session")
def tiny_mistral_f32_gguf(tmp_path_factory, tiny_mistral_dir) -> Path:
    from cnllm.core.gguf.convert import ConvertOptions, convert_to_gguf

    return convert_to_gguf(tiny_mistral_dir, tmp_path_factory.mktemp("gguf") / "mistral-f32.gguf", ConvertOptions(outtype="f32")).output


@pytest.fixture(scope="session")
def tiny_qwen2_f32_gguf(tmp_path_factory, tiny_qwen2_dir) -> Path:
    from cnllm.core.gguf.convert import ConvertOptions, convert_to_gguf

    return convert_to_gguf(tiny_qwen2_dir, tmp_path_factory.mktemp("gguf") / "qwen2-f32.gguf", ConvertOptions(outtype="f32")).output
