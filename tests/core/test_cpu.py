"""The weight-repacking decision from CPU flags, the option and CNLLM_LLAMA_REPACK (pure: fake flags, no llama.cpp)."""

from __future__ import annotations

import subprocess
import sys
import textwrap

import pytest

from cnllm.core import cpu
from cnllm.core.cpu import AMX_FLAGS, REPACK_ENV, CpuInfo, decide_repack, parse_cpuinfo, parse_repack_env
from cnllm.core.errors import UsageError

# A 2-core Sapphire Rapids VM as its /proc/cpuinfo shows it (flags shortened), and this project's AMD EPYC.
SAPPHIRE_RAPIDS = textwrap.dedent(
    """\
    processor\t: 0
    vendor_id\t: GenuineIntel
    model name\t: Intel(R) Xeon(R) Platinum 8481C CPU @ 2.70GHz
    flags\t\t: fpu sse2 ssse3 fma avx f16c avx2 avx512f avx512dq avx512bw avx512vl avx512_bf16 avx512_fp16 avx_vnni amx_bf16 amx_tile amx_int8

    processor\t: 1
    vendor_id\t: GenuineIntel
    model name\t: Intel(R) Xeon(R) Platinum 8481C CPU @ 2.70GHz
    flags\t\t: fpu sse2 ssse3 fma avx f16c avx2 avx512f avx512dq avx512bw avx512vl avx512_bf16 avx512_fp16 avx_vnni amx_bf16 amx_tile amx_int8
    """
)
EPYC = "processor\t: 0\nmodel name\t: AMD EPYC\nflags\t\t: fpu sse2 fma avx avx2 avx512f avx512bw avx512_vnni avx512_bf16 avx_vnni\n\n"
GRAVITON = "processor\t: 0\nBogoMIPS\t: 243.75\nFeatures\t: fp asimd aes crc32 asimddp sve i8mm bf16\nCPU implementer\t: 0x41\n\n"


def test_cpuinfo_is_parsed_for_model_and_flags():
    model, flags = parse_cpuinfo(SAPPHIRE_RAPIDS)
    assert model == "Intel(R) Xeon(R) Platinum 8481C CPU @ 2.70GHz"
    assert {"amx_tile", "amx_int8", "amx_bf16", "avx512f"} <= flags
    model, flags = parse_cpuinfo(GRAVITON)
    assert model == "" and {"asimd", "sve", "i8mm"} <= flags
    info = CpuInfo("Intel Xeon", "x86_64", 2, parse_cpuinfo(SAPPHIRE_RAPIDS)[1])
    assert info.amx == ("amx_bf16", "amx_int8", "amx_tile")
    assert "avx2" in info.llama_flags and "fpu" not in info.llama_flags and "amx_tile" in info.llama_flags


def test_amx_turns_repacking_off_and_everything_else_keeps_llama_cpp_default():
    sapphire = decide_repack(parse_cpuinfo(SAPPHIRE_RAPIDS)[1])
    assert not sapphire.enabled and sapphire.source == "cpu" and "AMX" in sapphire.reason and "20824" in sapphire.reason
    for text in (EPYC, GRAVITON, ""):
        decision = decide_repack(parse_cpuinfo(text)[1])
        assert decision.enabled and decision.source == "cpu"
    for flag in AMX_FLAGS:  # any one of them is enough
        assert not decide_repack({"avx2", flag}).enabled


@pytest.mark.parametrize("flags", [parse_cpuinfo(SAPPHIRE_RAPIDS)[1], parse_cpuinfo(EPYC)[1]])
def test_the_option_wins_then_the_environment_then_the_cpu(flags):
    assert decide_repack(flags, option=True, env="off").enabled is True
    assert decide_repack(flags, option=False, env="on").enabled is False
    assert decide_repack(flags, option=True).source == "option"
    for word in ("on", "1", "TRUE", "yes"):
        decision = decide_repack(flags, env=word)
        assert decision.enabled and decision.source == "environment" and REPACK_ENV in decision.reason
    for word in ("off", "0", "false", "No"):
        assert decide_repack(flags, env=word).enabled is False
    for word in ("auto", "", None):
        assert decide_repack(flags, env=word).source == "cpu"


def test_a_bad_environment_value_is_a_usage_error_naming_the_variable():
    with pytest.raises(UsageError) as caught:
        parse_repack_env("sometimes")
    assert caught.value.exit_code == 2 and REPACK_ENV in caught.value.message and "auto, on, off" in caught.value.message


def test_without_proc_cpuinfo_no_amx_is_assumed(monkeypatch):
    cpu.cpu_info.cache_clear()
    monkeypatch.setattr(cpu.sys, "platform", "win32")
    try:
        info = cpu.cpu_info()
        assert info.flags == frozenset() and decide_repack(info.flags).enabled
    finally:
        cpu.cpu_info.cache_clear()


def test_this_machine_is_read(monkeypatch):
    monkeypatch.delenv(REPACK_ENV, raising=False)
    info = cpu.cpu_info()
    assert info.model and info.cores >= 1
    assert cpu.repack_decision().enabled == (not info.amx)
    monkeypatch.setenv(REPACK_ENV, "off")
    assert cpu.repack_decision().enabled is False and cpu.repack_decision(True).enabled is True


def test_the_ci_summary_runs_on_the_standard_library_alone():
    script = textwrap.dedent(
        """
        import runpy, sys
        runpy.run_module("cnllm.core.cpu", run_name="__main__")
        heavy = [m for m in ("torch", "transformers", "llama_cpp", "numpy", "typer", "rich") if m in sys.modules]
        assert not heavy, heavy
        """
    )
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    assert done.stdout.startswith("CPU: ") and "flags that matter to llama.cpp:" in done.stdout and "repacking:" in done.stdout
