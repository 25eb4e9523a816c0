"""The one llama.cpp loader: the repacking decision reaches llama.cpp (its log names the CPU_REPACK buffer only when
repacking is on), CPU flags decide by default, the option and the environment override, and a llama-cpp-python
without the switch is reported rather than crashing."""

from __future__ import annotations

import ctypes
import warnings

import pytest

from cnllm.core import cpu, llama_loader
from cnllm.core.cpu import REPACK_ENV, CpuInfo
from tests.conftest import forces_repack_on

pytest.importorskip("llama_cpp")

AMX_CPU = CpuInfo("Intel(R) Xeon(R) Platinum 8481C", "x86_64", 2, frozenset({"avx2", "avx512f", "amx_tile", "amx_int8", "amx_bf16"}))
PLAIN_CPU = CpuInfo("AMD EPYC", "x86_64", 2, frozenset({"avx2", "avx512f"}))


@pytest.fixture
def llama_log():
    """llama.cpp's own log lines while the test runs."""
    import llama_cpp

    from cnllm.core.generation.llamacpp import silence_llama_logs

    lines: list[str] = []
    callback = llama_cpp.llama_log_callback(lambda level, text, user_data: lines.append(text.decode("utf-8", errors="replace")))
    llama_cpp.llama_log_set(callback, ctypes.c_void_p(0))
    try:
        yield lines
    finally:
        silence_llama_logs(False)


def _load(path, llama_log, **kwargs):
    llama_log.clear()
    llm = llama_loader.open_llama(path, n_ctx=64, n_threads=1, verbose=False, **kwargs)
    try:
        text = llm("The quick brown", max_tokens=4, temperature=0.0)["choices"][0]["text"]
        return llm.model_params.use_extra_bufts, "CPU_REPACK model buffer" in "".join(llama_log), text, llm.repack
    finally:
        llm.close()


@forces_repack_on
def test_the_decision_reaches_llama_cpp_and_answers_do_not_change(tiny_q4_0_gguf, llama_log, monkeypatch):
    monkeypatch.delenv(REPACK_ENV, raising=False)
    field_on, repacked_on, text_on, decision = _load(tiny_q4_0_gguf, llama_log, repack=True)
    field_off, repacked_off, text_off, _ = _load(tiny_q4_0_gguf, llama_log, repack=False)
    assert field_on is True and field_off is False and decision.source == "option"
    assert not repacked_off, "llama.cpp repacked weights although use_extra_bufts was off"
    if not repacked_on:
        pytest.skip("llama.cpp does not repack Q4_0 on this CPU (no AVX2 / NEON kernels), so on and off are the same load")
    assert text_on == text_off  # greedy: the repacked kernels compute the same thing


def test_an_amx_cpu_loads_without_repacking_by_default(tiny_q4_0_gguf, llama_log, monkeypatch):
    monkeypatch.delenv(REPACK_ENV, raising=False)
    monkeypatch.setattr(cpu, "cpu_info", lambda: AMX_CPU)
    field, repacked, text, decision = _load(tiny_q4_0_gguf, llama_log)
    assert field is False and not repacked and decision.source == "cpu" and "AMX" in decision.reason
    assert text


@forces_repack_on
def test_a_cpu_without_amx_keeps_llama_cpp_s_default(tiny_q4_0_gguf, llama_log, monkeypatch):
    monkeypatch.delenv(REPACK_ENV, raising=False)
    monkeypatch.setattr(cpu, "cpu_info", lambda: PLAIN_CPU)
    field, _, _, decision = _load(tiny_q4_0_gguf, llama_log)
    assert field is True and decision.enabled


@forces_repack_on
def test_the_environment_and_the_option_override_the_cpu(tiny_q4_0_gguf, llama_log, monkeypatch):
    monkeypatch.setattr(cpu, "cpu_info", lambda: AMX_CPU)
    monkeypatch.setenv(REPACK_ENV, "on")
    assert _load(tiny_q4_0_gguf, llama_log)[0] is True
    assert _load(tiny_q4_0_gguf, llama_log, repack=False)[0] is False
    monkeypatch.setattr(cpu, "cpu_info", lambda: PLAIN_CPU)
    monkeypatch.setenv(REPACK_ENV, "off")
    assert _load(tiny_q4_0_gguf, llama_log)[0] is False
    assert _load(tiny_q4_0_gguf, llama_log, repack=True)[0] is True


def test_vocab_only_reads_go_through_the_same_loader(tiny_q4_0_gguf, monkeypatch):
    from cnllm.core.generation.llamacpp import gguf_model_rope

    monkeypatch.setattr(cpu, "cpu_info", lambda: AMX_CPU)
    seen = []
    real = llama_loader.open_llama

    def spy(path, **kwargs):
        llm = real(path, **kwargs)
        seen.append((kwargs.get("vocab_only"), llm.model_params.use_extra_bufts))
        return llm

    monkeypatch.setattr(llama_loader, "open_llama", spy)
    assert gguf_model_rope(tiny_q4_0_gguf) is not None
    assert seen == [(True, False)]


def test_model_params_for_the_c_api_carry_the_decision(monkeypatch):
    monkeypatch.setattr(cpu, "cpu_info", lambda: AMX_CPU)
    monkeypatch.delenv(REPACK_ENV, raising=False)
    assert llama_loader.model_params().use_extra_bufts is False
    assert llama_loader.model_params(True, n_gpu_layers=0).use_extra_bufts is True


def test_a_llama_cpp_python_without_the_switch_warns_instead_of_failing(monkeypatch):
    class OldParams(ctypes.Structure):  # llama_model_params before llama.cpp's --no-repack
        _fields_ = [("n_gpu_layers", ctypes.c_int32), ("vocab_only", ctypes.c_bool)]

    params = OldParams()
    assert llama_loader.apply_repack(params, False) is False and not hasattr(params, "use_extra_bufts")
    import llama_cpp

    monkeypatch.setattr(cpu, "cpu_info", lambda: AMX_CPU)
    monkeypatch.delenv(REPACK_ENV, raising=False)
    monkeypatch.setattr(llama_cpp, "llama_model_default_params", OldParams)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        llama_loader.model_params()
    assert any("cannot turn llama.cpp's weight repacking off" in str(w.message) for w in caught)
    monkeypatch.setattr(llama_cpp, "llama_model_params", OldParams)
    assert llama_loader.repack_support() is False
