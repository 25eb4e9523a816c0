"""``cnllm doctor``: what this installation is and what cnllm will do on this machine — library versions, the CPU
and the features llama.cpp cares about, llama.cpp's own system-info line, and the llama.cpp settings cnllm will use
(weight repacking on or off and why, threads, backends). It never loads a model, so it runs where loading one would
crash and says why it would."""

from __future__ import annotations

import os
import platform
import sys
from dataclasses import dataclass, field
from importlib import metadata

from cnllm import __version__
from cnllm.core import cpu as cpus
from cnllm.core.cpu import REPACK_ENV, UPSTREAM_ISSUE, CpuInfo, RepackDecision
from cnllm.core.errors import UsageError

# Distribution names, in the order a reader looks for them (cnllm and Python come first).
PACKAGES = (
    "torch",
    "transformers",
    "llama-cpp-python",
    "gguf",
    "peft",
    "trl",
    "accelerate",
    "tokenizers",
    "sentencepiece",
    "safetensors",
    "datasets",
    "numpy",
    "fastapi",
    "uvicorn",
    "typer",
)
TESTED_LLAMA_CPP = "0.3.36"  # the version the Makefile and pyproject.toml pin


@dataclass
class LlamaCppReport:
    version: str | None
    importable: bool
    error: str | None = None
    system_info: str | None = None
    backends: list[str] = field(default_factory=list)  # llama.cpp's backends as its system info names them (CPU, CUDA, Metal, …)
    gpu_offload: bool = False
    repack_field: bool = False  # llama_model_params.use_extra_bufts exists: cnllm can turn repacking off
    amx_build: bool = False  # this llama.cpp was built with its AMX kernels

    def to_dict(self) -> dict:
        return {
            "version": self.version,
            "tested_version": TESTED_LLAMA_CPP,
            "importable": self.importable,
            "error": self.error,
            "system_info": self.system_info,
            "backends": self.backends,
            "gpu_offload": self.gpu_offload,
            "repack_field": self.repack_field,
            "amx_build": self.amx_build,
        }


@dataclass
class DoctorReport:
    versions: dict[str, str | None]
    python: str
    platform: str
    cpu: CpuInfo
    llama_cpp: LlamaCppReport
    repack: RepackDecision | None
    repack_error: str | None
    repack_env: str | None
    threads: dict[str, int]
    torch_devices: list[str]
    problems: list[str]  # what will fail (cnllm doctor exits 1)
    warnings: list[str]  # what may fail

    @property
    def repack_in_effect(self) -> bool | None:
        """Whether llama.cpp will repack weights: the decision when it can be passed on, llama.cpp's default otherwise."""
        if self.repack is None:
            return None
        return self.repack.enabled if self.llama_cpp.repack_field else True

    def to_dict(self) -> dict:
        return {
            "cnllm": self.versions.get("cnllm"),
            "python": self.python,
            "platform": self.platform,
            "versions": self.versions,
            "cpu": self.cpu.to_dict(),
            "llama_cpp": self.llama_cpp.to_dict(),
            "will_use": {
                "repack": self.repack_in_effect,
                "repack_decision": self.repack.to_dict() if self.repack else None,
                "repack_error": self.repack_error,
                "repack_env": {"name": REPACK_ENV, "value": self.repack_env},
                "threads": self.threads,
                "backends": {"gguf": "llama.cpp", "llama.cpp": self.llama_cpp.backends, "transformers": self.torch_devices},
            },
            "problems": self.problems,
            "warnings": self.warnings,
        }


def package_versions() -> dict[str, str | None]:
    versions: dict[str, str | None] = {"cnllm": __version__}
    for name in PACKAGES:
        try:
            versions[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            versions[name] = None
    return versions


def parse_system_info(text: str) -> tuple[list[str], dict[str, str]]:
    """llama.cpp's system-info line → the backends it names (``CPU : SSE3 = 1 | …`` → CPU) and their features."""
    backends, features = [], {}
    for part in (p.strip() for p in text.split("|")):
        if " : " in part:
            name, _, part = part.partition(" : ")
            backends.append(name.strip())
        key, eq, value = part.partition("=")
        if eq:
            features[key.strip()] = value.strip()
    return backends, features


def _llama_cpp(version: str | None) -> LlamaCppReport:
    try:
        import llama_cpp
    except Exception as exc:  # an ImportError, or a shared library that does not load on this machine
        return LlamaCppReport(version, False, f"{type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}")
    from cnllm.core.llama_loader import repack_support

    info = llama_cpp.llama_print_system_info().decode("utf-8", errors="replace").strip().rstrip("|").strip()
    backends, features = parse_system_info(info)
    return LlamaCppReport(
        version=getattr(llama_cpp, "__version__", version),
        importable=True,
        system_info=info,
        backends=backends,
        gpu_offload=bool(llama_cpp.llama_supports_gpu_offload()),
        repack_field=repack_support(),
        amx_build=any(k.startswith("AMX") and v == "1" for k, v in features.items()),
    )


def _torch_devices() -> list[str]:
    try:
        import torch
    except Exception:
        return []
    devices = ["cpu"]
    try:
        if torch.cuda.is_available():
            devices += [f"cuda:{i} ({torch.cuda.get_device_name(i)})" for i in range(torch.cuda.device_count())]
        if getattr(torch.backends, "mps", None) is not None and torch.backends.mps.is_available():
            devices.append("mps")
    except Exception:  # a broken driver: report the CPU only
        pass
    return devices


def llama_threads(threads: int | None = None) -> dict[str, int]:
    """The threads llama.cpp gets: ``--threads`` for both decode and prompt batches, else llama-cpp-python's choice
    (half the CPUs for decoding, all of them for batches)."""
    import multiprocessing

    if threads:
        return {"decode": threads, "batch": threads}
    count = multiprocessing.cpu_count()
    return {"decode": max(count // 2, 1), "batch": count}


def diagnose(*, repack: bool | None = None, threads: int | None = None, with_torch: bool = True) -> DoctorReport:
    versions = package_versions()
    cpu = cpus.cpu_info()
    llama = _llama_cpp(versions.get("llama-cpp-python"))
    decision, decision_error = None, None
    try:
        decision = cpus.repack_decision(repack)
    except UsageError as exc:
        decision_error = exc.message
    problems = []
    if not llama.importable:
        problems.append(f"llama-cpp-python cannot be imported ({llama.error}): no GGUF can be loaded")
    elif not llama.repack_field and decision is not None and not decision.enabled:
        problems.append(
            f"llama-cpp-python {llama.version} has no use_extra_bufts: cnllm cannot turn weight repacking off although "
            f"{decision.reason}; install llama-cpp-python=={TESTED_LLAMA_CPP}"
        )
    if decision_error:
        problems.append(decision_error)
    warnings = []
    if decision is not None and decision.enabled and cpu.amx and llama.amx_build:
        warnings.append(
            f"repacking is on ({decision.reason}) on a CPU with AMX and a llama.cpp built with its AMX kernels: "
            f"quantized GGUFs may crash ({UPSTREAM_ISSUE})"
        )
    return DoctorReport(
        versions=versions,
        python=f"{platform.python_implementation()} {platform.python_version()} ({sys.executable})",
        platform=platform.platform(),
        cpu=cpu,
        llama_cpp=llama,
        repack=decision,
        repack_error=decision_error,
        repack_env=os.environ.get(REPACK_ENV),
        threads=llama_threads(threads=threads),
        torch_devices=_torch_devices() if with_torch else [],
        problems=problems,
        warnings=warnings,
    )

