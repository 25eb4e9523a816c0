"""GGUF files converted once per session from the tiny fixture models."""

from __future__ import annotations

from pathlib import Path

import pytest


def _f32_gguf(tmp_path_factory, model_dir: Path, name: str) -> Path:
    from cnllm.core.gguf.convert import ConvertOptions, convert_to_gguf

    return convert_to_gguf(model_dir, tmp_path_factory.mktemp("gguf") / f"{name}-f32.gguf", ConvertOptions(outtype="f32")).output


@pytest.fixture(scope="session")
def tiny_spm_f32_gguf(tmp_path_factory, tiny_llama_dir) -> Path:
    return _f32_gguf(tmp_path_factory, tiny_llama_dir, "spm")


@pytest.fixture(scope="session")
def tiny_bpe_f32_gguf(tmp_path_factory, tiny_llama3_dir) -> Path:
    return _f32_gguf(tmp_path_factory, tiny_llama3_dir, "bpe")


@pytest.fixture(scope="session")
def tiny_mistral_f32_gguf(tmp_path_factory, tiny_mistral_dir) -> Path:
    return _f32_gguf(tmp_path_factory, tiny_mistral_dir, "mistral")


@pytest.fixture(scope="session")
def tiny_qwen2_f32_gguf(tmp_path_factory, tiny_qwen2_dir) -> Path:
    return _f32_gguf(tmp_path_factory, tiny_qwen2_dir, "qwen2")
