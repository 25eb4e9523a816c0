"""The CPU llama.cpp runs on, and whether cnllm lets llama.cpp repack weights on it.

llama.cpp's CPU backend moves the weights of some tensor types into "extra buffer types" when a model loads:
interleaved layouts for its AVX2/AVX-512/NEON kernels (Q4_0, Q4_K, IQ4_NL, …) and, on CPUs with Intel AMX
(Sapphire Rapids and later), its AMX buffer. The AMX path faults at its first matrix multiplication on such
machines (``ldtilecfg`` in ``ggml_backend_amx_mul_mat``; llama.cpp issue 20824), killing every command that
loads a GGUF. With the extra buffer types off (llama.cpp's ``--no-repack``) the same model runs correctly on the
plain CPU kernels. So cnllm turns repacking off when the CPU advertises AMX and leaves llama.cpp's default
everywhere else; ``--repack`` / ``--no-repack`` or ``CNLLM_LLAMA_REPACK`` decide instead when given
(docs/cpu.md).

Standard library only: ``python -m cnllm.core.cpu`` prints the CPU summary before anything is installed (CI).
"""

from __future__ import annotations

import os
import platform
import re
import subprocess
import sys
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path
from typing import Iterable

from cnllm.core.errors import UsageError

REPACK_ENV = "CNLLM_LLAMA_REPACK"
REPACK_ON = ("on", "1", "true", "yes")
REPACK_OFF = ("off", "0", "false", "no")
REPACK_AUTO = ("auto", "")
# Linux's names for Intel AMX (tiles, int8 and bf16 since Sapphire Rapids; fp16 and complex since Granite Rapids).
AMX_FLAGS = frozenset({"amx_tile", "amx_int8", "amx_bf16", "amx_fp16", "amx_complex"})
# The flags llama.cpp's x86 and Arm kernels choose by (and the AMX ones above), as /proc/cpuinfo spells them.
_LLAMA_FLAG = re.compile(r"^(sse3|ssse3|avx|avx2|fma|f16c|avx_vnni|avx512.*|amx.*|asimd|asimddp|i8mm|sve|sve2|sme|bf16)$")
UPSTREAM_ISSUE = "llama.cpp issue 20824"


@dataclass(frozen=True)
class CpuInfo:
    model: str
    machine: str  # platform.machine(): x86_64, aarch64, arm64, …
    cores: int  # logical CPUs this process may use
    flags: frozenset[str]

    @property
    def amx(self) -> tuple[str, ...]:
        return tuple(sorted(AMX_FLAGS & self.flags))

    @property
    def llama_flags(self) -> tuple[str, ...]:
        """The flags that matter to llama.cpp's CPU kernels, sorted."""
        return tuple(sorted(f for f in self.flags if _LLAMA_FLAG.match(f)))

    def to_dict(self) -> dict:
        return {"model": self.model, "machine": self.machine, "cores": self.cores, "llama_flags": list(self.llama_flags), "amx": list(self.amx)}


@dataclass(frozen=True)
class RepackDecision:
    """Whether llama.cpp may repack weights into its extra buffer types (``use_extra_bufts``), and why."""

    enabled: bool
    source: str  # "option" (--repack / --no-repack), "environment" (CNLLM_LLAMA_REPACK) or "cpu" (the automatic rule)
    reason: str

    @property
    def word(self) -> str:
        return "on" if self.enabled else "off"

    def to_dict(self) -> dict:
        return {"enabled": self.enabled, "source": self.source, "reason": self.reason}


def parse_cpuinfo(text: str) -> tuple[str, frozenset[str]]:
    """The model name and the feature flags of the first processor in a /proc/cpuinfo text (x86 ``flags``, Arm ``Features``)."""
    model, flags = "", frozenset[str]()
    for line in text.splitlines():
        key, _, value = line.partition(":")
        key = key.strip().lower()
        if not model and key in ("model name", "hardware", "cpu model", "processor") and not value.strip().isdigit():
            model = value.strip()
        elif not flags and key in ("flags", "features"):
            flags = frozenset(value.split())
        if key == "" and model and flags:  # the blank line that ends the first processor
            break
    return model, flags


def _cores() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        return os.cpu_count() or 1


@lru_cache(maxsize=None)
def cpu_info() -> CpuInfo:
    """This machine's CPU: /proc/cpuinfo on Linux; the brand string on macOS (no AMX there); no flags elsewhere."""
    model, flags = "", frozenset[str]()
    cpuinfo = Path("/proc/cpuinfo")
    if sys.platform.startswith("linux") and cpuinfo.is_file():
        try:
            model, flags = parse_cpuinfo(cpuinfo.read_text(encoding="utf-8", errors="replace"))
        except OSError:
            pass
    elif sys.platform == "darwin":
        try:
            done = subprocess.run(["sysctl", "-n", "machdep.cpu.brand_string"], capture_output=True, text=True, timeout=5)
            model = done.stdout.strip()
        except (OSError, subprocess.SubprocessError):
            pass
    return CpuInfo(model or platform.processor() or "unknown", platform.machine(), _cores(), flags)


def parse_repack_env(value: str | None) -> bool | None:
    """``CNLLM_LLAMA_REPACK``: on/1/true/yes → True, off/0/false/no → False, unset/auto → None (cnllm decides)."""
    if value is None:
        return None
    word = value.strip().lower()
    if word in REPACK_AUTO:
        return None
    if word in REPACK_ON:
        return True
    if word in REPACK_OFF:
        return False
    raise UsageError(f"{REPACK_ENV}={value!r} is not one of auto, on, off")


def decide_repack(flags: Iterable[str], *, option: bool | None = None, env: str | None = None) -> RepackDecision:
    """The one rule: an explicit ``--repack``/``--no-repack`` wins, then ``CNLLM_LLAMA_REPACK``, then the CPU —
    off when it advertises AMX (llama.cpp's AMX weights crash there), llama.cpp's default (on) otherwise."""
    if option is not None:
        return RepackDecision(option, "option", "--repack" if option else "--no-repack")
    chosen = parse_repack_env(env)
    if chosen is not None:
        return RepackDecision(chosen, "environment", f"{REPACK_ENV}={env}")
    amx = sorted(AMX_FLAGS & set(flags))
    if amx:
        return RepackDecision(
            False, "cpu", f"the CPU advertises AMX ({', '.join(amx)}), where llama.cpp's repacked AMX weights crash ({UPSTREAM_ISSUE})"
        )
    return RepackDecision(True, "cpu", "no AMX on this CPU: llama.cpp's default")


def repack_decision(option: bool | None = None) -> RepackDecision:
    """:func:`decide_repack` for this machine and this process's environment."""
    return decide_repack(cpu_info().flags, option=option, env=os.environ.get(REPACK_ENV))


def main() -> None:
    """Print the CPU summary (what CI shows before the virtual environment exists)."""
    info = cpu_info()
    print(f"CPU: {info.model} ({info.machine}, {info.cores} logical CPUs)")
    print(f"flags that matter to llama.cpp: {' '.join(info.llama_flags) or '(none reported)'}")
    try:
        decision = repack_decision()
    except UsageError as exc:
        print(f"llama.cpp weight repacking: {exc}")
        return
    print(f"llama.cpp weight repacking: {decision.word} ({decision.reason})")


if __name__ == "__main__":
    main()
