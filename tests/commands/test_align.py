"""``cnllm align`` end to end on the tiny model: held-out preference accuracy rises, the adapter merges,
converts and chats, bad preference files are one line and exit 2, a killed run resumes."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from cnllm.core.tiny import asset
from tests.conftest import REPO
from tests.core.training.conftest import one_torch_thread  # noqa: F401  (fixture)

TINY_RUN = ["--batch-size", "4", "--lora-rank", "8", "--lora-alpha", "16", "--lora-dropout", "0", "--logging-steps", "4",
            "--max-length", "160", "--max-prompt-length", "96", "--learning-rate", "3e-3", "--seed", "7"]


@pytest.fixture(scope="module")
def pref_split():
    """The bundled pairs: 40 to train on, 12 held out."""
    return asset("pref_zh.jsonl"), asset("pref_zh_heldout.jsonl")


def pref_accuracy(cli, model, heldout, *extra) -> dict:
    result = cli("eval", "pref", model, "-d", heldout, "--template", "alpaca", "--json", *extra)
    assert result.exit_code == 0, result.stderr
    return json.loads(result.stdout)


def test_dpo_raises_heldout_preference_accuracy(cli, tmp_path, tiny_llama_dir, pref_split):
    train, heldout = pref_split
    out = tmp_path / "dpo"
    result = cli("align", "-m", tiny_llama_dir, "-d", train, "--validation-data", heldout, "-o", out, *TINY_RUN,
                 "--max-steps", "12", "--save-steps", "100", "--cache-dir", tmp_path / "cache", "--json")
    assert result.exit_code == 0, result.stderr
    report = json.loads(result.stdout)
    assert report["data"]["pairs"] == 40 and report["data"]["eval_pairs"] == 12 and report["data"]["method"] == "dpo"
    assert report["reward_accuracy"] >= report["reward_accuracy_before"] + 0.5 and report["reward_margin"] > 0.1
    assert report["eval_loss"] < report["eval_loss_before"]
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert any("reward_accuracy" in r and "loss" in r for r in rows) and any("reward_accuracy" in r and "eval_loss" in r for r in rows)
    assert (out / "loss.png").stat().st_size > 10_000 and "method: dpo" in (out / "train-config.yaml").read_text()
    # A fresh adapter: TRL scores the reference with it disabled, so no reference copy is saved.
    assert not (out / "ref").exists() and report["data"]["adapter"]["tensors"] == 2 * 7 * 2
    before = pref_accuracy(cli, tiny_llama_dir, heldout)
    after = pref_accuracy(cli, tiny_llama_dir, heldout, "--lora", out)
    assert before["pairs"] == after["pairs"] == 12
    assert after["accuracy"] >= before["accuracy"] + 0.25 and after["mean_margin"] > before["mean_margin"]
    again = cli("align", "-m", tiny_llama_dir, "-d", train, "--validation-data", heldout, "-o", tmp_path / "again", *TINY_RUN,
                "--max-steps", "1", "--save-steps", "100", "--cache-dir", tmp_path / "cache", "--json")
    assert again.exit_code == 0 and json.loads(again.stdout)["data"]["cache_hit"]


def test_orpo_adapter_merges_converts_and_chats(cli, tmp_path, tiny_llama_dir):
    from transformers import AutoTokenizer

    from cnllm.core.templates import TEMPLATES

    config = tmp_path / "align.yaml"
    config.write_text(f"method: orpo\nbeta: 0.2\ndata: [{asset('pref_zh.jsonl')}]\nvalidation_split: 0\nmax_steps: 2\nsave_steps: 100\n", encoding="utf-8")
    aligned = cli("align", "-c", config, "-m", tiny_llama_dir, "-o", tmp_path / "orpo", *TINY_RUN, "--template", "chatml", "--json")
    assert aligned.exit_code == 0, aligned.stderr
    report = json.loads(aligned.stdout)
    assert report["data"]["method"] == "orpo" and report["data"]["beta"] == 0.2 and report["tokens_per_second"] > 0
    assert AutoTokenizer.from_pretrained(str(tmp_path / "orpo")).chat_template == TEMPLATES["chatml"].jinja()
    merged = cli("merge-lora", "--base", tiny_llama_dir, "--lora", tmp_path / "orpo", "-o", tmp_path / "merged")
    assert merged.exit_code == 0, merged.stderr
    converted = cli("convert-gguf", tmp_path / "merged", "-o", tmp_path / "model.gguf", "--outtype", "f32")
    assert converted.exit_code == 0, converted.stderr
    chat = cli("chat", tmp_path / "model.gguf", "-p", "你好", "-t", "0", "-n", "2", "--json")
    assert chat.exit_code == 0, chat.stderr
    assert json.loads(chat.stdout)["template"] == "auto"
    heldout = tmp_path / "two.jsonl"
    heldout.write_text("\n".join(asset("pref_zh_heldout.jsonl").read_text(encoding="utf-8").splitlines()[:2]) + "\n", encoding="utf-8")
    on_gguf = cli("eval", "pref", tmp_path / "model.gguf", "-d", heldout, "--json")
    on_hf = cli("eval", "pref", tmp_path / "merged", "-d", heldout, "--json")
    assert on_gguf.exit_code == 0 and on_hf.exit_code == 0, on_gguf.stderr + on_hf.stderr
    gguf, hf = json.loads(on_gguf.stdout), json.loads(on_hf.stdout)
    assert gguf["model"]["template"] == hf["model"]["template"] == "auto" and gguf["pairs"] == 2
    for a, b in zip(gguf["scores"], hf["scores"]):
        assert a["chosen_tokens"] == b["chosen_tokens"] and abs(a["chosen_logprob"] - b["chosen_logprob"]) < 1e-2


@pytest.mark.parametrize(
    ("record", "args", "message"),
    [
        ('{"prompt": "问", "chosen": "好"}', [], ":2: a preference record needs 'chosen' and 'rejected'"),
        ('{"prompt": "问", "chosen": "好", "rejected": "好"}', [], ":2: 'chosen' and 'rejected' are the same answer (pass --skip-invalid"),
        ('{"prompt": "问", "chosen": "好", "rejected": "坏"}', ["--method", "kto"], "'kto' is not one of"),
        ('{"prompt": "问", "chosen": "好", "rejected": "坏"}', ["--max-length", "64", "--max-prompt-length", "64"], "--max-prompt-length (64) must be at least 1 and below --max-length (64)"),
        ('{"prompt": "问", "chosen": "好", "rejected": "坏"}', ["--beta", "0"], "--beta must be positive"),
    ],
)
def test_bad_preference_input_is_one_line_and_exit_2(cli, tmp_path, tiny_llama_dir, record, args, message):
    data = tmp_path / "pairs.jsonl"
    data.write_text('{"prompt": "问", "chosen": "好", "rejected": "坏"}\n' + record + "\n", encoding="utf-8")
    out = tmp_path / "out"
    result = cli("align", "-m", tiny_llama_dir, "-d", data, "-o", out, "--cache-dir", tmp_path / "cache", *args)
    assert result.exit_code == 2
    assert message in " ".join(result.stderr.split())
    assert len(result.stderr.strip().splitlines()) == 1
    assert not out.exists() and not (tmp_path / ".out.cnllm-training").exists()
    if "needs" in message:
        scored = cli("eval", "pref", tiny_llama_dir, "-d", data)
        assert scored.exit_code == 2 and f"{data}:2:" in scored.stderr and len(scored.stderr.strip().splitlines()) == 1


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


def test_align_resumes_after_sigkill_with_the_same_loss(cli, tmp_path, tiny_llama_dir, pref_split):
    from cnllm.core.training.trainer import last_complete_checkpoint, work_dir_for

    train, heldout = pref_split
    common = ["align", "-m", tiny_llama_dir, "-d", train, "--validation-data", heldout, *TINY_RUN, "--lora-dropout", "0.1",
              "--max-steps", "6", "--save-steps", "2", "--logging-steps", "1", "--cache-dir", tmp_path / "cache", "--no-eval-before", "--json"]
    whole, killed = tmp_path / "whole", tmp_path / "killed"
    assert cli(*common, "-o", whole).exit_code == 0
    env = {**os.environ, "KILL_AT_STEP": "3", "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"}
    crash = subprocess.run([sys.executable, "-c", KILL_SCRIPT, *map(str, common), "-o", str(killed)], env=env, capture_output=True, cwd=tmp_path)
    assert crash.returncode == -9, crash.stderr.decode()[-2000:]
    assert last_complete_checkpoint(work_dir_for(killed)).name == "checkpoint-2"
    resumed = cli(*common, "-o", killed, "--resume")
    assert resumed.exit_code == 0 and json.loads(resumed.stdout)["resumed_from"] == "checkpoint-2"
    last = [json.loads(line) for line in (whole / "metrics.jsonl").read_text().splitlines() if '"loss"' in line][-1]
    again = [json.loads(line) for line in (killed / "metrics.jsonl").read_text().splitlines() if '"loss"' in line]
    assert [r["step"] for r in again] == list(range(1, 7))
    assert abs(last["loss"] - again[-1]["loss"]) < 1e-4 and abs(last["reward_accuracy"] - again[-1]["reward_accuracy"]) < 1e-6


@pytest.mark.parametrize(("method", "loss"), [("dpo", "sigmoid"), ("ipo", "ipo"), ("dpo-norm", "sigmoid_norm"), ("apo-zero", "apo_zero")])
def test_dpo_family_methods_are_trl_loss_types(tmp_path, method, loss):
    from cnllm.core.training.align import ALIGN, AlignOptions

    options = AlignOptions(method=method, beta=0.3, max_length=64)
    config = ALIGN.arguments(options, {"output_dir": str(tmp_path), "use_cpu": True, "report_to": []})
    assert config.loss_type == [loss] and config.beta == 0.3 and config.max_length == 64 and not config.gradient_checkpointing
