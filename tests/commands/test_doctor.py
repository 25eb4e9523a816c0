"""``cnllm doctor``: versions, CPU, llama.cpp's build and what cnllm will use; never loads a model."""

from __future__ import annotations

import json

import pytest

from cnllm.core import cpu, doctor
from cnllm.core.cpu import REPACK_ENV, CpuInfo

AMX_CPU = CpuInfo("Intel(R) Xeon(R) Platinum 8481C", "x86_64", 2, frozenset({"avx2", "avx512f", "amx_tile", "amx_int8", "amx_bf16"}))


@pytest.fixture(autouse=True)
def no_repack_env(monkeypatch):
    monkeypatch.delenv(REPACK_ENV, raising=False)


def test_json_reports_versions_cpu_llama_cpp_and_the_settings(cli):
    result = cli("doctor", "--json")
    assert result.exit_code == 0, result.stderr
    document = json.loads(result.stdout)
    versions = document["versions"]
    assert versions["cnllm"] and versions["torch"] and versions["transformers"] and versions["gguf"]
    assert versions["llama-cpp-python"] == document["llama_cpp"]["version"] == "0.3.36"
    assert document["python"].split()[1].count(".") == 2
    info = cpu.cpu_info()
    assert document["cpu"]["model"] == info.model and document["cpu"]["amx"] == list(info.amx)
    llama = document["llama_cpp"]
    assert llama["importable"] and llama["repack_field"] and "CPU" in llama["backends"] and "CPU :" in llama["system_info"]
    will = document["will_use"]
    assert will["repack"] is (not info.amx) and will["repack_decision"]["source"] == "cpu"
    assert will["repack_env"] == {"name": REPACK_ENV, "value": None}
    assert will["threads"]["decode"] >= 1 and will["threads"]["batch"] >= will["threads"]["decode"]
    assert "cpu" in will["backends"]["transformers"] and will["backends"]["gguf"] == "llama.cpp"
    assert document["problems"] == []


def test_human_output_names_the_decision_and_its_reason(cli):
    result = cli("doctor")
    assert result.exit_code == 0, result.stderr
    for needle in ("versions", "llama-cpp-python", "system info", "llama.cpp weight repacking", "llama.cpp threads", "transformers on cpu"):
        assert needle in result.stdout, needle


def test_on_an_amx_cpu_repacking_is_off_and_the_options_show_their_effect(cli, monkeypatch):
    monkeypatch.setattr(cpu, "cpu_info", lambda: AMX_CPU)
    document = json.loads(cli("doctor", "--json").stdout)
    assert document["will_use"]["repack"] is False and "AMX" in document["will_use"]["repack_decision"]["reason"]
    assert document["cpu"]["amx"] == ["amx_bf16", "amx_int8", "amx_tile"]
    forced = json.loads(cli("doctor", "--repack", "--threads", "3", "--json").stdout)
    assert forced["will_use"]["repack"] is True and forced["will_use"]["repack_decision"]["source"] == "option"
    assert forced["will_use"]["threads"] == {"decode": 3, "batch": 3}
    monkeypatch.setenv(REPACK_ENV, "on")
    env = json.loads(cli("doctor", "--json").stdout)["will_use"]
    assert env["repack"] is True and env["repack_decision"]["source"] == "environment" and env["repack_env"]["value"] == "on"


def test_a_llama_cpp_python_without_the_switch_on_an_amx_cpu_is_exit_1(cli, monkeypatch):
    from cnllm.core import llama_loader

    monkeypatch.setattr(cpu, "cpu_info", lambda: AMX_CPU)
    monkeypatch.setattr(llama_loader, "repack_support", lambda: False)
    result = cli("doctor", "--json")
    assert result.exit_code == 1
    document = json.loads(result.stdout)
    assert document["will_use"]["repack"] is True and "use_extra_bufts" in document["problems"][0]
    assert "use_extra_bufts" in result.stderr


def test_a_bad_environment_value_is_reported(cli, monkeypatch):
    monkeypatch.setenv(REPACK_ENV, "sometimes")
    result = cli("doctor", "--json")
    assert result.exit_code == 1 and REPACK_ENV in result.stderr
    assert json.loads(result.stdout)["will_use"]["repack"] is None


def test_system_info_is_parsed_into_backends_and_features():
    backends, features = doctor.parse_system_info(
        "CUDA : ARCHS = 890 | USE_GRAPHS = 1 | CPU : SSE3 = 1 | AVX2 = 1 | AMX_INT8 = 1 | REPACK = 1 |"
    )
    assert backends == ["CUDA", "CPU"] and features["AMX_INT8"] == "1" and features["ARCHS"] == "890"


def test_doctor_loads_no_model(cli, monkeypatch):
    from cnllm.core import llama_loader

    def refuse(*args, **kwargs):
        raise AssertionError("doctor must not load a model")

    monkeypatch.setattr(llama_loader, "open_llama", refuse)
    assert cli("doctor", "--json").exit_code == 0
