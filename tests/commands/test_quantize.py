"""``cnllm quantize`` end to end: type list, Q8_0 and Q4_K_M on a tiny model that llama.cpp then runs, refusals."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from cnllm.core.provenance import read_file_record


@pytest.fixture(scope="module")
def f16_gguf(tmp_path_factory, tiny_llama_dir) -> Path:
    from cnllm.core.gguf.convert import ConvertOptions, convert_to_gguf

    return convert_to_gguf(tiny_llama_dir, tmp_path_factory.mktemp("quantize") / "f16.gguf", ConvertOptions(outtype="f16")).output


def test_list_types_with_bits_per_weight(cli):
    result = cli("quantize", "--list-types", "--json")
    assert result.exit_code == 0
    types = {t["name"]: t for t in json.loads(result.stdout)["types"]}
    assert types["Q4_K_M"]["bits_per_weight"] == 4.5 and types["Q8_0"]["bits_per_weight"] == 8.5
    assert types["IQ2_XXS"]["needs_imatrix"] is True
    assert {"Q2_K", "Q5_K_M", "Q6_K", "IQ4_XS", "F16", "BF16"} <= set(types)
    table = cli("quantize", "--list-types")
    assert table.exit_code == 0 and "Q4_K_M" in table.stdout and "4.5" in table.stdout


@pytest.mark.parametrize("quant_type", ["Q8_0", "Q4_K_M"])
def test_quantized_model_loads_and_generates(cli, tmp_path, f16_gguf, quant_type):
    from cnllm.core.llama_loader import open_llama

    out = tmp_path / f"{quant_type}.gguf"
    result = cli("quantize", f16_gguf, "-o", out, "--type", quant_type, "--threads", "1", "--json")
    assert result.exit_code == 0, result.stderr
    report = json.loads(result.stdout)
    assert report["output_bytes"] == out.stat().st_size < report["input_bytes"]
    assert report["ratio"] > 1.5
    record = read_file_record(out)
    assert record["cnllm_record"] == "quantize" and record["results"] == report and record["options"]["type"] == quant_type
    assert record["inputs"][0]["sha256"]
    if quant_type == "Q4_K_M":
        assert report["fallback_tensors"] > 0  # hidden size 64 is not divisible by 256
    llm = open_llama(out, n_ctx=64, n_threads=1, verbose=False)
    try:
        completion = llm("The quick brown", max_tokens=8, temperature=0.0)
    finally:
        llm.close()
    assert completion["usage"]["completion_tokens"] > 0


def test_human_summary(cli, tmp_path, f16_gguf):
    result = cli("quantize", f16_gguf, "-o", tmp_path / "q.gguf", "--type", "q4_k_m")
    assert result.exit_code == 0
    assert "bits per weight" in result.stdout and "smaller" in result.stdout
    assert "fallback" in result.stderr


def test_refuses_requantizing_without_allow_requantize(cli, tmp_path, f16_gguf):
    q8 = tmp_path / "q8.gguf"
    assert cli("quantize", f16_gguf, "-o", q8, "--type", "Q8_0").exit_code == 0
    result = cli("quantize", q8, "-o", tmp_path / "q4.gguf", "--type", "Q4_K_M")
    assert result.exit_code == 2 and "--allow-requantize" in result.stderr
    assert not (tmp_path / "q4.gguf").exists()


def test_bad_input_and_type_exit_2(cli, tmp_path, f16_gguf):
    not_gguf = tmp_path / "weights.safetensors"
    not_gguf.write_bytes(b"\x08\x00\x00\x00\x00\x00\x00\x00{}      ")
    result = cli("quantize", not_gguf, "-o", tmp_path / "o.gguf", "--type", "Q8_0")
    assert result.exit_code == 2 and "not a GGUF file" in result.stderr
    truncated = tmp_path / "cut.gguf"
    truncated.write_bytes(f16_gguf.read_bytes()[:-4096])
    result = cli("quantize", truncated, "-o", tmp_path / "o.gguf", "--type", "Q8_0")
    assert result.exit_code == 2 and "truncated" in result.stderr
    result = cli("quantize", f16_gguf, "-o", tmp_path / "o.gguf", "--type", "Q3_X")
    assert result.exit_code == 2 and "--list-types" in result.stderr
    assert cli("quantize", f16_gguf, "-o", tmp_path / "o.gguf").exit_code == 2
    assert list(tmp_path.glob("*o.gguf*")) == []
