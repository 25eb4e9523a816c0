"""The path rule, as a user meets it: ``cnllm`` run as a subprocess in a fresh folder, relative paths only.

A path typed on the command line is relative to the current directory; a path in a ``--config`` file
or a recipe is relative to that file's folder; ``-o`` on the command line wins over a recipe's
``workdir``. One chain walks every command the way the README does, each output checked where the
user asked for it (and nowhere else: the bundled assets folder stays untouched).
"""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest

from cnllm.core.tiny import ASSETS

TIMEOUT = 600


def cnllm(cwd: Path, *args: str, check: bool = True) -> subprocess.CompletedProcess:
    """``cnllm ARGS`` in ``cwd``, as a shell user would start it."""
    completed = subprocess.run([sys.executable, "-m", "cnllm", *args], cwd=cwd, capture_output=True, text=True, timeout=TIMEOUT)
    if check:
        assert completed.returncode == 0, f"cnllm {' '.join(args)} exited {completed.returncode}:\n{completed.stderr}"
    return completed


def assets_listing() -> set[str]:
    return {str(p.relative_to(ASSETS)) for p in ASSETS.rglob("*")}


@pytest.fixture
def workspace(tmp_path, tiny_llama_dir) -> Path:
    """A user's folder: a base model and the bundled samples beside each other, nothing else."""
    shutil.copytree(tiny_llama_dir, tmp_path / "base")
    for name in ("zh.txt", "zh_heldout.txt", "alpaca_zh.json", "pref_zh.jsonl", "pref_zh_heldout.jsonl", "ceval-mini"):
        source = ASSETS / name
        (shutil.copytree if source.is_dir() else shutil.copy)(source, tmp_path / name)
    return tmp_path


def test_every_command_takes_paths_relative_to_the_current_folder(workspace):
    before = assets_listing()
    run = lambda *args: cnllm(workspace, *args)  # noqa: E731 - short alias for a long chain
    tiny_training = ["--max-steps", "2", "--batch-size", "2", "--lora-rank", "4", "--lora-alpha", "8", "--save-steps", "10", "--no-eval-before"]

    run("vocab", "train", "zh.txt", "--vocab-size", "2500", "-o", "zh.model")
    run("vocab", "merge", "--base", "base", "--add", "zh.model", "-o", "tok")
    assert json.loads(run("vocab", "inspect", "tok", "--text", "zh_heldout.txt", "--json").stdout)
    run("pt", "--model", "base", "--tokenizer", "tok", "--data", "zh.txt", "-o", "pt-lora", "--block-size", "64", *tiny_training)
    run("merge-lora", "--base", "base", "--lora", "pt-lora", "-o", "merged")
    run("sft", "--model", "merged", "--data", "alpaca_zh.json", "--template", "alpaca", "-o", "sft-lora", "--max-seq-length", "128", *tiny_training)
    run("align", "--model", "merged", "--data", "pref_zh.jsonl", "--template", "alpaca", "-o", "align-lora", "--max-length", "128", *tiny_training)
    run("eval", "pref", "merged", "--lora", "align-lora", "--data", "pref_zh_heldout.jsonl", "--template", "alpaca", "-o", "pref.json")
    run("diff-recover", "--make-diff", "--base", "base", "--tuned", "merged", "-o", "diff")
    run("diff-recover", "--base", "base", "--diff", "diff", "-o", "recovered", "--reference", "merged")
    run("merge-lora", "--base", "base", "--lora", "pt-lora", "-o", "meta", "--format", "pth")
    run("convert-meta", "meta", "-o", "meta-hf")
    run("convert-gguf", "merged", "-o", "merged.gguf", "--outtype", "f32")
    run("quantize", "merged.gguf", "-o", "merged-q8.gguf", "--type", "Q8_0")
    run("gguf-to-hf", "merged.gguf", "-o", "from-gguf")
    run("chat", "merged-q8.gguf", "--prompt", "你好", "--max-tokens", "4")
    ppl = json.loads(run("eval", "ppl", "merged.gguf", "--data", "zh_heldout.txt", "--ctx", "64", "--json", "-o", "ppl.json").stdout)
    assert ppl["total"]["ppl"] > 1
    run("eval", "mc", "merged", "--data", "ceval-mini", "--format", "ceval", "--shots", "0", "-o", "mc")
    run("eval", "passkey", "merged.gguf", "--length", "192", "--depth", "0.5", "--trials", "1", "-o", "passkey.json")
    (workspace / "longbench").mkdir()
    sample = {"input": "中国的首都是哪里？", "context": "北京是中国的首都。" * 8, "answers": ["北京"], "length": 72,
              "dataset": "multifieldqa_zh", "language": "zh", "all_classes": None, "_id": "zh-1"}
    (workspace / "longbench" / "multifieldqa_zh.jsonl").write_text(json.dumps(sample, ensure_ascii=False) + "\n", encoding="utf-8")
    run("eval", "longbench", "merged.gguf", "--data", "longbench", "--max-length", "200", "-o", "lb")
    run("checksum", "create", "merged", "-o", "merged.sha256")
    run("checksum", "verify", "merged.sha256")

    for output in ("zh.model", "tok", "pt-lora", "merged", "meta-hf", "sft-lora", "diff", "recovered", "merged.gguf", "merged-q8.gguf", "from-gguf", "ppl.json", "mc", "align-lora", "pref.json", "passkey.json", "lb", "merged.sha256"):
        assert (workspace / output).exists(), output
    assert assets_listing() == before


def test_config_file_paths_are_relative_to_the_file(workspace):
    (workspace / "configs").mkdir()
    (workspace / "configs" / "pt.yaml").write_text(
        "model: ../base\ndata: [../zh.txt]\noutput: ../runs/pt\nblock-size: 64\nbatch-size: 2\nmax-steps: 1\n"
        "lora-rank: 4\nlora-alpha: 8\nsave-steps: 10\neval-before: false\n",
        encoding="utf-8",
    )
    elsewhere = workspace / "elsewhere"
    elsewhere.mkdir()
    cnllm(elsewhere, "pt", "--config", "../configs/pt.yaml")
    assert (workspace / "runs" / "pt" / "adapter_config.json").is_file()
    # A flag typed on the command line is relative to the current folder, and wins over the file.
    cnllm(elsewhere, "pt", "--config", "../configs/pt.yaml", "-o", "here")
    assert (elsewhere / "here" / "adapter_config.json").is_file()


def test_pipeline_recipe_paths_and_workdir(workspace):
    (workspace / "recipes").mkdir()
    (workspace / "recipes" / "tiny.yaml").write_text(
        "name: tiny\nworkdir: ../runs/tiny\nbase: {model: ../base}\n"
        "eval: {ppl: {data: [../zh_heldout.txt], ctx: 64}}\nchecksum: {}\n",
        encoding="utf-8",
    )
    cnllm(workspace, "pipeline", "recipes/tiny.yaml")
    assert (workspace / "runs" / "tiny" / "report.md").is_file()
    # -o on the command line wins over the recipe's workdir, relative to the current folder.
    cnllm(workspace / "recipes", "pipeline", "tiny.yaml", "-o", "out")
    assert (workspace / "recipes" / "out" / "report.md").is_file()


def test_serve_takes_a_relative_model_path(workspace):
    process = subprocess.Popen(
        [sys.executable, "-m", "cnllm", "serve", "base", "--port", "0", "--template", "alpaca"],
        cwd=workspace,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
    )
    try:
        line = b""
        deadline = time.monotonic() + 240
        while b"serving" not in line and time.monotonic() < deadline and process.poll() is None:
            line = process.stderr.readline()
        url = re.search(rb"http://127\.0\.0\.1:\d+", line)
        assert url, line
        with urllib.request.urlopen(url.group(0).decode() + "/v1/models", timeout=30) as response:
            assert json.load(response)["data"][0]["id"] == "base"
    finally:
        process.send_signal(signal.SIGINT)
        process.communicate(timeout=60)
    assert process.returncode == 0


def test_demo_from_a_fresh_folder_with_a_relative_output(tmp_path):
    """`make demo`'s own command line, run where a newcomer runs it; then again, every step up to date."""
    env = {**os.environ, "COLUMNS": "200"}
    completed = subprocess.run([sys.executable, "-m", "cnllm", "demo", "-o", "cnllm-demo"], cwd=tmp_path, capture_output=True, text=True, timeout=TIMEOUT, env=env)
    assert completed.returncode == 0, completed.stderr
    demo = tmp_path / "cnllm-demo"
    assert (demo / "report.md").is_file() and (demo / "09-quantize").is_dir()
    # The way forward names the demo's own outputs, relative to where the user stands.
    assert "cnllm chat cnllm-demo/09-quantize/" in completed.stdout and "cnllm serve cnllm-demo/09-quantize/" in completed.stdout
    assert "cnllm-demo/report.md" in completed.stdout

    document = json.loads((demo / "report.json").read_text(encoding="utf-8"))
    steps = {s["step"]: s for s in document["steps"]}
    assert all(s["status"] == "ran" for s in steps.values()), steps
    vocab = steps["vocab"]["figures"]
    assert vocab["chinese_chars_per_token"]["after"] > 1.8 * vocab["chinese_chars_per_token"]["before"]
    assert steps["pt"]["figures"]["perplexity"]["after"] < steps["pt"]["figures"]["perplexity"]["before"]
    bits = steps["eval"]["figures"]["bits_per_byte"]
    assert bits["pt"] < bits["base"] and {"gguf-q8_0", "gguf-q4_k_m"} <= set(bits)
    align = steps["align"]["figures"]
    assert align["preference_accuracy"]["after"] >= align["preference_accuracy"]["before"] + 0.25
    assert align["reward_accuracy"]["after"] > align["reward_accuracy"]["before"]
    assert "preference_accuracy" in (demo / "report.md").read_text(encoding="utf-8")
    assert document["notes"]["chat"]["answer"] is not None
    assert cnllm(tmp_path, "checksum", "verify", "cnllm-demo/11-checksum/SHA256SUMS", "--root", "cnllm-demo").returncode == 0

    again = json.loads(cnllm(tmp_path, "demo", "-o", "cnllm-demo", "--json").stdout)
    assert {s["status"] for s in again["steps"]} == {"skipped"}


def test_ci_runs_the_readme_quick_start_commands_as_written():
    """CI's script runs the README's two set-up commands, in the README's order, from the repository root."""
    repo = Path(__file__).resolve().parent.parent
    readme = (repo / "README.md").read_text(encoding="utf-8")
    quick_start = readme.split("## Quick start", 1)[1].split("```bash", 1)[1].split("```", 1)[0]
    commands = [line.split("#", 1)[0].strip() for line in quick_start.splitlines() if line.split("#", 1)[0].strip()]
    assert commands == ["make demo", "make test"]
    ci = [line.strip() for line in (repo / ".ci" / "run").read_text(encoding="utf-8").splitlines() if line.strip() and not line.startswith("#")]
    ran = [line for line in ci if line.startswith("make ")]
    assert ran[: len(commands)] == commands
