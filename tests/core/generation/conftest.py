"""Fixtures for the generation tests: the tiny model loaded once, and its GGUF when the converter is present."""

from __future__ import annotations

from pathlib import Path

import pytest


@pytest.fixture(scope="session")
def tiny_generator(tiny_llama_dir):
    from cnllm.core.backends import load_model

    generator = load_model(tiny_llama_dir)
    yield generator
    generator.close()


@pytest.fixture(scope="session")
def tiny_gguf(tmp_path_factory, tiny_llama_dir) -> Path:
    """The tiny model as an f32 GGUF, written by cnllm's own converter (skips where that core is absent)."""
    try:
        from cnllm.core.gguf.convert import ConvertOptions, convert_to_gguf
    except ImportError:
        pytest.skip("cnllm.core.gguf.convert is not available; GGUF backend tests need it to build a test GGUF")
    return convert_to_gguf(tiny_llama_dir, tmp_path_factory.mktemp("gguf") / "tiny-f32.gguf", ConvertOptions(outtype="f32")).output
