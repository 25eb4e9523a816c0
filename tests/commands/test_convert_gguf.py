"""``cnllm convert-gguf`` end to end on the tiny models: JSON output, refusals, exit codes."""

from __future__ import annotations

import json
import shutil

from cnllm.core.provenance import read_file_record


def test_converts_and_reports_json(cli, tmp_path, tiny_llama_dir):
    out = tmp_path / "model-f16.gguf"
    result = cli("convert-gguf", tiny_llama_dir, "-o", out, "--outtype", "f16", "--json")
    assert result.exit_code == 0, result.stderr
    report = json.loads(result.stdout)
    assert report["output"] == str(out) and out.stat().st_size == report["bytes"]
    assert report["file_type"] == "MOSTLY_F16"
    assert report["tensor_types"] == {"F32": 5, "F16": 16}
    assert report["tokenizer"] == {"model": "llama", "pre": "default", "tokens": 1000}
    record = read_file_record(out)  # X.gguf.cnllm.json: what made the file
    assert record["cnllm_record"] == "convert-gguf" and record["results"] == report and record["options"]["outtype"] == "f16"
    assert record["inputs"][0]["path"] == str(tiny_llama_dir)


def test_dtype_words_name_gguf_types_and_come_back(cli, tmp_path, tiny_llama_dir):
    result = cli("convert-gguf", tiny_llama_dir, "-o", tmp_path / "m.gguf", "--outtype", "half", "--vocab-only", "--json")
    assert result.exit_code == 0, result.stderr
    report = json.loads(result.stdout)
    assert report["outtype"] == "half" and report["file_type"] == "MOSTLY_F16"
    bad = cli("convert-gguf", tiny_llama_dir, "-o", tmp_path / "x.gguf", "--outtype", "q2")
    assert bad.exit_code == 2 and "--outtype 'q2' is not one of f32, f16, bf16, q8_0, auto" in bad.stderr


def test_bpe_model_and_human_output(cli, tmp_path, tiny_llama3_dir):
    result = cli("convert-gguf", tiny_llama3_dir, "-o", tmp_path / "m.gguf", "--outtype", "q8_0")
    assert result.exit_code == 0, result.stderr
    assert "gpt2/llama-bpe" in result.stdout and "q8_0" in result.stdout


def test_existing_output_needs_force(cli, tmp_path, tiny_llama_dir):
    out = tmp_path / "m.gguf"
    out.write_bytes(b"old")
    result = cli("convert-gguf", tiny_llama_dir, "-o", out, "--vocab-only")
    assert result.exit_code == 2 and "--force" in result.stderr
    assert out.read_bytes() == b"old"
    assert cli("convert-gguf", tiny_llama_dir, "-o", out, "--vocab-only", "--force").exit_code == 0
    assert out.read_bytes()[:4] == b"GGUF"


def test_unsupported_architecture_lists_supported_ones(cli, tmp_path, tiny_llama_dir):
    model = tmp_path / "model"
    shutil.copytree(tiny_llama_dir, model)
    config = json.loads((model / "config.json").read_text())
    config.update(architectures=["Qwen3ForCausalLM"], model_type="qwen3")
    (model / "config.json").write_text(json.dumps(config))
    result = cli("convert-gguf", model, "-o", tmp_path / "m.gguf")
    assert result.exit_code == 2
    assert "Qwen3ForCausalLM" in result.stderr and "LlamaForCausalLM" in result.stderr
    assert "Traceback" not in result.stderr
    assert list(tmp_path.glob("*m.gguf*")) == []


def test_bad_inputs_exit_2(cli, tmp_path):
    assert cli("convert-gguf", tmp_path / "missing", "-o", tmp_path / "m.gguf").exit_code == 2
    result = cli("convert-gguf", tmp_path)
    assert result.exit_code == 2 and "--output" in result.stderr
