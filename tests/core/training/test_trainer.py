"""The training core: vocabulary checks and resizing, adapter verification, and real tiny runs
(perplexity goes down, the adapter holds the trained tensors, SIGKILL + --resume ends where an
uninterrupted run ends, two gloo processes train together)."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from cnllm.core.errors import CheckFailed, UsageError
from cnllm.core.tiny import asset
from cnllm.core.training import trainer
from cnllm.core.training.pt import PtOptions

from .helpers import heldout_perplexity

REPO = Path(__file__).resolve().parents[3]
PYTHON = sys.executable


def small_options(model: Path, output: Path, cache: Path, **overrides) -> PtOptions:
    values = dict(
        model=model, data=[asset("zh.txt")], output=output, validation_data=[asset("zh_heldout.txt")],
        lora_rank=8, lora_alpha=16.0, lora_dropout=0.0, learning_rate=3e-3, batch_size=4, max_steps=20,
        block_size=128, save_steps=10, eval_steps=20, logging_steps=5, cache_dir=cache, seed=0,
    )
    values.update(overrides)
    return PtOptions(**values)


# ------------------------------------------------------------------------------------------ checks


def test_tokenizer_smaller_than_the_model_is_refused(tmp_path, tiny_llama_dir, bpe_tokenizer_dir, spm_tokenizer_dir):
    from cnllm.core.tiny import build_spm_tokenizer

    small = build_spm_tokenizer(tmp_path / "small", vocab_size=400)
    with pytest.raises(UsageError, match=r"has \d+ tokens, fewer than the model's 1000 embedding rows"):
        trainer.check_vocabulary(tiny_llama_dir, small)
    assert trainer.check_vocabulary(tiny_llama_dir, spm_tokenizer_dir).tokenizer == 1000


def test_config_and_embedding_disagreement_names_which(tmp_path, tiny_llama_dir):
    broken = tmp_path / "broken"
    shutil.copytree(tiny_llama_dir, broken)
    config = json.loads((broken / "config.json").read_text())
    config["vocab_size"] = 1100
    (broken / "config.json").write_text(json.dumps(config))
    with pytest.raises(UsageError, match=r"config.vocab_size \(1100\) differs from the embedding rows \(1000\)"):
        trainer.check_vocabulary(broken, broken)


def test_unknown_lora_target_lists_the_linear_layers(tiny_llama_dir):
    with pytest.raises(UsageError, match=r"LoRA target qkv_proj is not a linear layer .*down_proj, gate_proj, k_proj, lm_head, o_proj"):
        trainer.check_lora_targets(tiny_llama_dir, ["q_proj", "qkv_proj"], False)


def test_qlora_without_gpu_is_a_clear_usage_error():
    import torch

    if torch.cuda.is_available():
        pytest.skip("this machine has a GPU")
    with pytest.raises(UsageError, match="load_in_4bit .QLoRA. needs a CUDA GPU"):
        trainer.check_quantization(PtOptions(load_in_4bit=True))


def test_verify_adapter_rejects_an_adapter_without_trained_tensors(tmp_path):
    import torch
    from safetensors.torch import save_file

    save_file({"base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight": torch.zeros(2, 2)}, str(tmp_path / trainer.ADAPTER_WEIGHTS))
    with pytest.raises(CheckFailed, match="lacks the trained tensors of q_proj"):
        trainer.verify_adapter(tmp_path, ["q_proj"], False)


def test_last_complete_checkpoint_ignores_half_written_ones(tmp_path):
    for step, complete in ((5, True), (10, True), (15, False)):
        (tmp_path / f"checkpoint-{step}").mkdir()
        if complete:
            (tmp_path / f"checkpoint-{step}" / "trainer_state.json").write_text("{}")
    assert trainer.last_complete_checkpoint(tmp_path).name == "checkpoint-10"


@pytest.mark.skipif(sys.platform != "linux" or not os.confstr("CS_GNU_LIBC_VERSION"), reason="glibc only")
def test_malloc_thresholds_are_fixed_on_glibc_unless_the_user_tunes_them():
    # A child process: the thresholds are process-wide and this worker runs other tests.
    code = "from cnllm.core.training.trainer import keep_freed_tensor_memory as k; print(k())"
    env = {k: v for k, v in os.environ.items() if k not in (*trainer.MALLOC_ENVIRONMENT, "GLIBC_TUNABLES")}

    def run(extra: dict) -> str:
        return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env={**env, **extra}, check=True).stdout.strip()

    assert run({}) == "True"
    assert run({"MALLOC_TRIM_THRESHOLD_": "131072"}) == "False"
    assert run({"GLIBC_TUNABLES": "glibc.malloc.mmap_threshold=131072"}) == "False"


@pytest.mark.parametrize(("word", "schedule"), [("cosine", "cosine"), ("linear", "linear"), ("constant", "constant_with_warmup")])
def test_lr_scheduler_is_the_trainers_schedule(tmp_path, word, schedule):
    from types import SimpleNamespace

    from cnllm.core.training.pt import PT

    plan = SimpleNamespace(options=PtOptions(lr_scheduler=word), precision="fp32", work=tmp_path, method=PT)
    assert trainer.training_arguments(plan, has_eval=False).lr_scheduler_type.value == schedule


# -------------------------------------------------------------------------------------- real runs


def test_pt_lowers_heldout_perplexity_and_saves_the_trained_tensors(tmp_path, tiny_llama_dir, zh_tokenizer_dir):
    output = tmp_path / "pt"
    result = trainer.run_training(small_options(tiny_llama_dir, output, tmp_path / "cache", tokenizer=zh_tokenizer_dir))
    assert result.vocab["resized"] and result.vocab["embedding_rows"] == 1024 and result.vocab["train_embeddings"]
    assert result.eval_loss < result.eval_loss_before
    from safetensors import safe_open

    with safe_open(str(output / "adapter_model.safetensors"), "pt") as weights:
        names = list(weights.keys())
        assert weights.get_tensor("base_model.model.model.embed_tokens.weight").shape == (1024, 64)
        assert weights.get_tensor("base_model.model.lm_head.weight").shape == (1024, 64)
    assert sum("lora_A" in n for n in names) == 2 * 7 and sum("lora_B" in n for n in names) == 2 * 7
    assert (output / "adapter_model.safetensors").stat().st_size > 500_000
    before = heldout_perplexity(tiny_llama_dir, zh_tokenizer_dir)
    after = heldout_perplexity(tiny_llama_dir, output, adapter=output)
    assert after < before * 0.5
    assert not trainer.work_dir_for(output).exists()


KILL_SCRIPT = """
import os, signal, sys
import transformers
original = transformers.Trainer.training_step
def training_step(self, *args, **kwargs):
    if self.state.global_step == int(os.environ["KILL_AT_STEP"]):
        os.kill(os.getpid(), signal.SIGKILL)
    return original(self, *args, **kwargs)
transformers.Trainer.training_step = training_step
from cnllm.cli.app import main
main(sys.argv[1:])
"""


def _final(metrics: Path) -> tuple[float, float]:
    rows = [json.loads(line) for line in metrics.read_text().splitlines()]
    return [r["loss"] for r in rows if "loss" in r][-1], [r["eval_loss"] for r in rows if "eval_loss" in r][-1]


def test_resume_after_sigkill_ends_with_the_same_loss(tmp_path, tiny_llama_dir, cli):
    common = ["pt", "-m", tiny_llama_dir, "-d", asset("zh.txt"), "--validation-data", asset("zh_heldout.txt"),
              "--block-size", "64", "--batch-size", "2", "--gradient-accumulation-steps", "2", "--max-steps", "12",
              "--save-steps", "4", "--logging-steps", "1", "--lora-rank", "4", "--lora-alpha", "8", "--lora-dropout", "0.1",
              "--learning-rate", "2e-3", "--seed", "7", "--cache-dir", tmp_path / "cache", "--no-eval-before", "--json"]
    whole, killed = tmp_path / "whole", tmp_path / "killed"
    assert cli(*common, "-o", whole).exit_code == 0
    env = {**os.environ, "KILL_AT_STEP": "6", "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"}
    crash = subprocess.run([PYTHON, "-c", KILL_SCRIPT, *map(str, common), "-o", str(killed)], env=env, capture_output=True, cwd=tmp_path)
    assert crash.returncode == -9
    work = trainer.work_dir_for(killed)
    assert not killed.exists() and trainer.last_complete_checkpoint(work).name == "checkpoint-4"
    refused = cli(*common, "-o", killed)
    assert refused.exit_code == 2 and "pass --resume" in refused.stderr
    resumed = cli(*common, "-o", killed, "--resume")
    assert resumed.exit_code == 0 and json.loads(resumed.stdout)["resumed_from"] == "checkpoint-4"
    whole_loss, whole_eval = _final(whole / "metrics.jsonl")
    resumed_loss, resumed_eval = _final(killed / "metrics.jsonl")
    assert abs(whole_loss - resumed_loss) < 1e-4
    assert abs(whole_eval - resumed_eval) < 1e-4
    steps = [json.loads(line)["step"] for line in (killed / "metrics.jsonl").read_text().splitlines() if '"loss"' in line]
    assert steps == list(range(1, 13))


@pytest.mark.slow
def test_two_gloo_processes_train_and_only_rank_zero_writes(tmp_path, tiny_llama_dir):
    output = tmp_path / "ddp"
    torchrun = Path(PYTHON).parent / "torchrun"
    command = [str(torchrun), "--nproc_per_node", "2", "--master_port", "29533", "-m", "cnllm", "pt", "-m", str(tiny_llama_dir),
               "-d", str(asset("zh.txt")), "--validation-data", str(asset("zh_heldout.txt")), "--block-size", "64",
               "--batch-size", "2", "--max-steps", "8", "--save-steps", "4", "--logging-steps", "2", "--lora-rank", "4",
               "--learning-rate", "2e-3", "--cache-dir", str(tmp_path / "cache"), "-o", str(output), "--json"]
    done = subprocess.run(command, env={**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"}, capture_output=True, text=True, cwd=tmp_path, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    report = json.loads(done.stdout)  # only rank 0 printed: exactly one JSON document
    assert report["steps"] == 8 and report["eval_loss"] < report["eval_loss_before"]
    assert report["tokens_seen"] == 8 * 2 * 2 * 64  # both ranks' batches were counted
    assert sorted(p.name for p in tmp_path.iterdir()) == ["cache", "ddp"]
    assert (output / "checkpoint-8" / "adapter_model.safetensors").exists()
    assert len((output / "metrics.jsonl").read_text().splitlines()) == len(set((output / "metrics.jsonl").read_text().splitlines()))
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    model = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(str(tiny_llama_dir)), str(output))
    assert any("lora_A" in name for name, _ in model.named_parameters())
