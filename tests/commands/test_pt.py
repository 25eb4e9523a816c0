"""``cnllm pt`` end to end on the tiny model: outputs, config files, cache reuse, and bad input."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from cnllm.core.tiny import asset
from tests.core.training.conftest import one_torch_thread  # noqa: F401  (fixture)

TINY_RUN = ["--block-size", "64", "--batch-size", "2", "--lora-rank", "4", "--lora-alpha", "8", "--logging-steps", "1", "--learning-rate", "3e-3"]


@pytest.fixture(scope="module")
def bigger_tokenizer(tmp_path_factory, tiny_llama_dir) -> Path:
    """The tiny tokenizer plus 10 Chinese words (1,010 tokens for the 1,000-row model)."""
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(str(tiny_llama_dir))
    tokenizer.add_tokens(["中国", "天气", "学校", "语言", "模型", "城市", "生活", "我们", "今天", "可以"])
    out = tmp_path_factory.mktemp("bigger-tokenizer")
    tokenizer.save_pretrained(str(out))
    return out


def test_pt_writes_adapter_tokenizer_metrics_curve_config_and_provenance(cli, tmp_path, tiny_llama_dir, bigger_tokenizer):
    out = tmp_path / "pt"
    args = ["pt", "-m", tiny_llama_dir, "--tokenizer", bigger_tokenizer, "-d", asset("zh.txt"), "-o", out, *TINY_RUN,
            "--max-steps", "6", "--save-steps", "3", "--validation-split", "0.05", "--cache-dir", tmp_path / "cache", "--json"]
    result = cli(*args)
    assert result.exit_code == 0, result.stderr
    report = json.loads(result.stdout)
    assert report["steps"] == 6 and report["vocab"]["embedding_rows"] == 1024 and report["vocab"]["train_embeddings"]
    assert report["data"]["eval_blocks"] > 0 and not report["data"]["cache_hit"]
    assert report["eval_loss"] is not None and report["tokens_per_second"] > 0 and report["peak_memory_bytes"] > 0
    for name in ("adapter_config.json", "adapter_model.safetensors", "tokenizer.json", "train-config.yaml", "metrics.jsonl", "loss.png", "cnllm-train.json"):
        assert (out / name).is_file(), name
    assert not (out / "training_args.bin").exists()
    assert (out / "loss.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    for checkpoint in ("checkpoint-3", "checkpoint-6"):
        assert {"adapter_config.json", "adapter_model.safetensors", "tokenizer.json"} <= {p.name for p in (out / checkpoint).iterdir()}
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    train_rows = [r for r in rows if "loss" in r]
    assert [r["step"] for r in train_rows] == [1, 2, 3, 4, 5, 6]
    assert all({"loss", "lr", "grad_norm", "tokens_per_second"} <= set(r) for r in train_rows)
    record = json.loads((out / "cnllm-train.json").read_text())
    assert record["options"]["mode"] == "pt" and record["inputs"][0]["sha256"]
    assert record["results"]["steps"] == 6
    assert "lora-rank: 4" in (out / "train-config.yaml").read_text()
    assert "new-row-init: subword-mean" in (out / "train-config.yaml").read_text()
    assert report["vocab"]["new_row_init"] == "subword-mean" and report["vocab"]["new_rows"]["decomposed"] == 10
    from transformers import AutoTokenizer

    assert len(AutoTokenizer.from_pretrained(str(out))) == 1010

    again = cli(*args, "--force")
    assert again.exit_code == 0, again.stderr
    assert json.loads(again.stdout)["data"]["cache_hit"]


def test_config_file_with_command_line_override(cli, tmp_path, tiny_llama_dir):
    config = tmp_path / "run.yaml"
    config.write_text(
        f"model: {tiny_llama_dir}\ndata: [{asset('zh.txt')}]\noutput: {tmp_path / 'from-config'}\n"
        f"max-steps: 4\nlora-rank: 4\nblock-size: 64\nbatch-size: 2\nsave-steps: 100\nvalidation-split: 0\ncache-dir: {tmp_path / 'cache'}\n",
        encoding="utf-8",
    )
    result = cli("pt", "--config", config, "--max-steps", "2", "--json")
    assert result.exit_code == 0, result.stderr
    assert json.loads(result.stdout)["steps"] == 2
    resolved = (tmp_path / "from-config" / "train-config.yaml").read_text()
    assert "max-steps: 2" in resolved and "lora-rank: 4" in resolved and "template" not in resolved


def _not_utf8(tmp_path: Path) -> Path:
    path = tmp_path / "gbk.txt"
    path.write_bytes("中文文本\n".encode("gbk"))
    return path


def _empty(tmp_path: Path) -> Path:
    path = tmp_path / "empty.txt"
    path.write_text("")
    return path


@pytest.mark.parametrize(
    ("make_args", "message"),
    [
        (lambda t, m: ["-d", t / "missing.txt"], "data file .*missing.txt does not exist"),
        (lambda t, m: ["-d", _empty(t)], "empty.txt is empty"),
        (lambda t, m: ["-d", _not_utf8(t)], r"gbk.txt:1 is not UTF-8"),
        (lambda t, m: ["-d", asset("zh.txt"), "--lora-targets", "q_proj,attn"], "LoRA target attn is not a linear layer of the model; its linear layers are: down_proj, gate_proj, k_proj, lm_head"),
        (lambda t, m: ["-d", asset("zh.txt"), "--tokenizer", t / "small-tok"], "fewer than the model's 1000 embedding rows"),
        (lambda t, m: ["-d", asset("zh.txt"), "--load-in-4bit"], "needs a CUDA GPU"),
        (lambda t, m: ["-d", asset("zh.txt"), "--streaming"], "set --max-steps"),
        (lambda t, m: ["-d", asset("zh.txt"), "--resume"], "nothing to resume"),
    ],
    ids=["missing", "empty", "not-utf8", "lora-target", "small-tokenizer", "qlora-cpu", "streaming-steps", "resume-nothing"],
)
def test_bad_input_is_one_line_exit_2_and_nothing_trained(cli, tmp_path, tiny_llama_dir, make_args, message):
    import torch

    if "--load-in-4bit" in make_args(tmp_path, tiny_llama_dir) and torch.cuda.is_available():
        pytest.skip("this machine has a GPU")
    if "small-tok" in str(make_args(tmp_path, tiny_llama_dir)):
        from cnllm.core.tiny import build_spm_tokenizer

        build_spm_tokenizer(tmp_path / "small-tok", vocab_size=400)
    out = tmp_path / "out"
    result = cli("pt", "-m", tiny_llama_dir, "-o", out, "--cache-dir", tmp_path / "cache", *make_args(tmp_path, tiny_llama_dir))
    assert result.exit_code == 2, result.stderr
    assert result.stdout == ""
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error:")
    import re

    assert re.search(message, " ".join(result.stderr.split())), result.stderr
    assert not out.exists() and not (tmp_path / ".out.cnllm-training").exists() and not (tmp_path / "cache").exists()


def test_new_row_init_mean_is_recorded(cli, tmp_path, tiny_llama_dir, bigger_tokenizer):
    out = tmp_path / "pt"
    result = cli("pt", "-m", tiny_llama_dir, "--tokenizer", bigger_tokenizer, "-d", asset("zh.txt"), "-o", out, *TINY_RUN,
                 "--max-steps", "1", "--validation-split", "0", "--new-row-init", "mean", "--cache-dir", tmp_path / "cache", "--json")
    assert result.exit_code == 0, result.stderr
    assert json.loads(result.stdout)["vocab"]["new_rows"]["mean_fallback"] == {"method mean": 10}
    assert "new-row-init: mean" in (out / "train-config.yaml").read_text()


def test_a_tokenizer_that_does_not_extend_the_models_is_one_line_exit_2(cli, tmp_path, tiny_llama_dir, bpe_tokenizer_dir):
    out = tmp_path / "out"
    result = cli("pt", "-m", tiny_llama_dir, "--tokenizer", bpe_tokenizer_dir, "-d", asset("zh.txt"), "-o", out, "--cache-dir", tmp_path / "cache")
    assert result.exit_code == 2 and result.stdout == ""
    assert "does not extend the base tokenizer" in result.stderr and len(result.stderr.strip().splitlines()) == 1
    assert not out.exists() and not (tmp_path / "cache").exists()


def test_existing_output_is_refused_without_resume_or_force(cli, tmp_path, tiny_llama_dir):
    out = tmp_path / "out"
    out.mkdir()
    (out / "keep.txt").write_text("mine")
    result = cli("pt", "-m", tiny_llama_dir, "-d", asset("zh.txt"), "-o", out)
    assert result.exit_code == 2
    assert "already exists; pass --resume to continue its training or --force to start over" in result.stderr
    assert [p.name for p in out.iterdir()] == ["keep.txt"]


def test_force_replaces_the_output_through_the_atomic_swap_and_cleans_leftovers(cli, tmp_path, tiny_llama_dir):
    import subprocess
    import sys

    from cnllm.core.atomic import TEMP_MARK

    out = tmp_path / "out"
    out.mkdir()
    (out / "old.txt").write_text("an earlier run")
    dead = int(subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True).stdout)
    stale = tmp_path / f".out{TEMP_MARK}{dead}-old"  # what a swap killed midway leaves
    stale.mkdir()
    result = cli("pt", "-m", tiny_llama_dir, "-d", asset("zh.txt"), "-o", out, "--force", "--max-steps", "1", *TINY_RUN,
                 "--save-steps", "100", "--validation-split", "0", "--cache-dir", tmp_path / "cache", "--precision", "float32")
    assert result.exit_code == 0, result.stderr
    assert (out / "adapter_model.safetensors").exists() and not (out / "old.txt").exists()
    assert "precision: float32" in (out / "train-config.yaml").read_text()  # any dtype word, echoed back
    assert sorted(p.name for p in tmp_path.iterdir()) == ["cache", "out"]


def test_full_finetune_writes_a_loadable_model(cli, tmp_path, tiny_llama_dir):
    out = tmp_path / "full"
    result = cli("pt", "-m", tiny_llama_dir, "-d", asset("zh.txt"), "-o", out, "--full-finetune", "--max-steps", "2",
                 "--block-size", "64", "--save-steps", "100", "--validation-split", "0", "--cache-dir", tmp_path / "cache", "--json")
    assert result.exit_code == 0, result.stderr
    report = json.loads(result.stdout)
    assert report["trainable_parameters"] == report["total_parameters"]
    from transformers import AutoModelForCausalLM

    trained, base = AutoModelForCausalLM.from_pretrained(str(out)), AutoModelForCausalLM.from_pretrained(str(tiny_llama_dir))
    assert trained.config.vocab_size == 1000
    name = "model.layers.0.self_attn.q_proj.weight"
    assert not (trained.state_dict()[name] == base.state_dict()[name]).all()


def test_gradient_checkpointing_with_frozen_embeddings_trains(cli, tmp_path, tiny_llama_dir):
    result = cli("pt", "-m", tiny_llama_dir, "-d", asset("zh.txt"), "-o", tmp_path / "gc", "--gradient-checkpointing", "--max-steps", "2",
                 "--block-size", "64", "--lora-rank", "4", "--save-steps", "100", "--validation-split", "0", "--logging-steps", "1",
                 "--cache-dir", tmp_path / "cache", "--json")
    assert result.exit_code == 0, result.stderr
    rows = [json.loads(line) for line in (tmp_path / "gc" / "metrics.jsonl").read_text().splitlines()]
    assert all(r["grad_norm"] > 0 for r in rows if "loss" in r)


def test_streaming_trains_without_a_cache(cli, tmp_path, tiny_llama_dir):
    result = cli("pt", "-m", tiny_llama_dir, "-d", asset("zh.txt"), "-o", tmp_path / "stream", "--streaming", "--max-steps", "2",
                 "--block-size", "64", "--lora-rank", "4", "--save-steps", "100", "--cache-dir", tmp_path / "cache", "--json")
    assert result.exit_code == 0, result.stderr
    assert json.loads(result.stdout)["steps"] == 2
    assert not (tmp_path / "cache").exists()
