"""The tiny model as an f32 GGUF (when the converter is available) and small exam folders."""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.core.evaluation.exam_data import write_ceval


@pytest.fixture(scope="session")
def tiny_f32_gguf(tmp_path_factory, tiny_llama_dir) -> Path:
    try:
        from cnllm.core.gguf.convert import ConvertOptions, convert_to_gguf
    except ImportError as exc:
        pytest.skip(f"the GGUF converter (cnllm.core.gguf.convert) is not available: {exc}")
    return convert_to_gguf(tiny_llama_dir, tmp_path_factory.mktemp("eval-gguf") / "tiny-f32.gguf", ConvertOptions(outtype="f32")).output


@pytest.fixture(scope="session")
def ceval_dir(tmp_path_factory) -> Path:
    return write_ceval(tmp_path_factory.mktemp("ceval"))
