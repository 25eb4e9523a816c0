"""--repack / --no-repack and CNLLM_LLAMA_REPACK through chat, serve and eval on a GGUF llama.cpp repacks (Q4_0):
the same perplexity and answers either way, the choice recorded, a bad value refused; serve answers many requests."""

from __future__ import annotations

import json
import os

import pytest

from cnllm.core import cpu
from cnllm.core.cpu import REPACK_ENV, CpuInfo
from cnllm.core.tiny import asset
from tests.conftest import forces_repack_on
from tests.core.server.conftest import http_request, spawn_serve

GREEDY = ["--temperature", "0", "--repetition-penalty", "1", "--max-tokens", "8", "--template", "none"]
AMX_CPU = CpuInfo("Intel(R) Xeon(R) Platinum 8481C", "x86_64", 2, frozenset({"avx2", "avx512f", "amx_tile", "amx_int8", "amx_bf16"}))


@pytest.fixture(autouse=True)
def no_repack_env(monkeypatch):
    monkeypatch.delenv(REPACK_ENV, raising=False)


def _ppl(cli, gguf, *args):
    result = cli("eval", "ppl", gguf, "-d", asset("zh_heldout.txt"), "--ctx", "128", "--threads", "1", *args, "--json")
    assert result.exit_code == 0, result.stderr
    return json.loads(result.stdout)


def test_the_default_is_the_same_run_as_the_cpu_s_setting(cli, tiny_q4_0_gguf):
    """Without AMX the default is llama.cpp's (repacking on): the perplexity cnllm reported before, to the digit."""
    default = _ppl(cli, tiny_q4_0_gguf)
    explicit = _ppl(cli, tiny_q4_0_gguf, "--no-repack" if cpu.cpu_info().amx else "--repack")
    assert default["model"]["repack"] is explicit["model"]["repack"] is (not cpu.cpu_info().amx)
    assert f"{default['total']['ppl']:.4f}" == f"{explicit['total']['ppl']:.4f}"
    assert default["total"]["mean_nll"] == explicit["total"]["mean_nll"]


@forces_repack_on
def test_eval_ppl_agrees_with_repacking_on_and_off(cli, tiny_q4_0_gguf):
    """The bundled Chinese held-out text: llama.cpp's repacked Q4_0 kernels and the plain ones round differently, so
    the random tiny model's perplexity of ~1000 moves in its 7th digit (SmolLM2's Q4_0 by 0.06%: bench/results/repack.md)."""
    on, off = _ppl(cli, tiny_q4_0_gguf, "--repack"), _ppl(cli, tiny_q4_0_gguf, "--no-repack")
    assert on["model"]["repack"] is True and off["model"]["repack"] is False
    assert on["total"]["tokens_scored"] == off["total"]["tokens_scored"] > 100
    assert off["total"]["mean_nll"] == pytest.approx(on["total"]["mean_nll"], rel=1e-6)
    assert off["total"]["ppl"] == pytest.approx(on["total"]["ppl"], rel=1e-6)


@forces_repack_on
def test_an_amx_cpu_gets_repacking_off_in_eval_unless_asked(cli, tiny_q4_0_gguf, monkeypatch):
    monkeypatch.setattr(cpu, "cpu_info", lambda: AMX_CPU)
    data = asset("zh_heldout.txt")
    auto = cli("eval", "ppl", tiny_q4_0_gguf, "-d", data, "--ctx", "64", "--threads", "1", "--json")
    assert auto.exit_code == 0, auto.stderr
    assert json.loads(auto.stdout)["model"]["repack"] is False
    forced = cli("eval", "ppl", tiny_q4_0_gguf, "-d", data, "--ctx", "64", "--threads", "1", "--repack", "--json")
    assert forced.exit_code == 0 and json.loads(forced.stdout)["model"]["repack"] is True
    monkeypatch.setenv(REPACK_ENV, "on")
    env = cli("eval", "ppl", tiny_q4_0_gguf, "-d", data, "--ctx", "64", "--threads", "1", "--json")
    assert env.exit_code == 0 and json.loads(env.stdout)["model"]["repack"] is True


@forces_repack_on
def test_chat_answers_the_same_either_way(cli, tiny_q4_0_gguf):
    answers = []
    for args in (["--repack"], ["--no-repack"], []):
        result = cli("chat", tiny_q4_0_gguf, "-p", "The quick brown", *GREEDY, "--threads", "1", *args, "--json")
        assert result.exit_code == 0, result.stderr
        answers.append(json.loads(result.stdout)["answer"])
    assert answers[0] == answers[1] == answers[2] and answers[0]


def test_a_bad_environment_value_is_one_line_and_exit_2(cli, tiny_q4_0_gguf, monkeypatch):
    monkeypatch.setenv(REPACK_ENV, "maybe")
    result = cli("chat", tiny_q4_0_gguf, "-p", "hi", *GREEDY)
    assert result.exit_code == 2 and result.stdout == ""
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and REPACK_ENV in lines[0] and "auto, on, off" in lines[0]


def test_serve_with_repacking_off_answers_fifty_requests(tiny_q4_0_gguf):
    process, port = spawn_serve(
        tiny_q4_0_gguf, "--model-name", "tiny", "--template", "chatml", "--parallel", "2", "--threads", "1", env={**os.environ, REPACK_ENV: "off"}
    )
    try:
        for i in range(50):
            body = {"model": "tiny", "temperature": 0, "max_tokens": 4, "messages": [{"role": "user", "content": f"question {i}"}]}
            status, answer = http_request(port, "POST", "/v1/chat/completions", json.dumps(body).encode())
            assert status == 200, answer
            assert json.loads(answer)["usage"]["completion_tokens"] >= 1
    finally:
        process.terminate()
        _, stderr = process.communicate(timeout=60)
    assert process.returncode == 143 and b"Traceback" not in stderr
