"""lm-evaluation-harness against ``cnllm serve``: does a real evaluation client score the same as its own model code?

Usage (lm-eval lives in its own virtual environment; this script runs it as a subprocess):
    python3 -m venv /tmp/lmeval && /tmp/lmeval/bin/pip install torch==2.13.0 "lm-eval[api,hf]==0.4.13"
    bash ../shared/tools/get-smollm2.sh /tmp/smollm2 --hf          # SmolLM2-135M-Instruct: Q4_1 GGUF + fp32 HF
    .venv/bin/python bench/bench_lm_eval.py --lm-eval /tmp/lmeval/bin/lm_eval \\
        --hf /tmp/smollm2/smollm2-135m-hf --gguf /tmp/smollm2/SmolLM2-135M-Instruct.Q4_1.gguf
Without --hf/--gguf it builds the tiny random test model and its f32 GGUF (agreement only, no meaningful accuracy).

On a local multiple-choice task written here (20 questions, English and Chinese, 4 choices each; four asked in
ChatML, SmolLM2's chat format, whose short answers the instruct model ends with EOS), lm-eval scores
every choice by log-likelihood three ways:
  1. ``--model hf`` on the Hugging Face directory (lm-eval's own transformers code: the reference)
  2. ``--model local-completions`` against ``cnllm serve HF_DIR`` (cnllm's transformers backend)
  3. ``--model local-completions`` against ``cnllm serve GGUF`` (llama.cpp; quantised, so near but not equal)
and reports, against 1: questions where the chosen answer agrees, and the largest log-likelihood difference.
local-completions sends ``max_tokens=1, echo=true, logprobs=1`` and sums ``token_logprobs[ctxlen:-1]``: an answer
whose next token is EOS is scored right only if the server returns that EOS as the generated token (issue 13).
Writes bench/results/lm_eval.md (or --out).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import re
import signal
import subprocess
import sys
import tempfile
import time
import urllib.request
from datetime import datetime, timezone
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
TASK = "cnllm_mc_local"
CHATML = "<|im_start|>user\n{}<|im_end|>\n<|im_start|>assistant\n"
# (question, choices, answer index, asked in ChatML): an instruct model ends a chat answer like "Blue." with EOS, the
# case lm-eval mis-scored before the server returned the generated EOS.
QUESTIONS = [
    ("The capital of France is", ["Paris", "Berlin", "Madrid", "Rome"], 0, False),
    ("The largest planet in the solar system is", ["Mars", "Jupiter", "Venus", "Mercury"], 1, False),
    ("Water freezes at a temperature of", ["100 degrees Celsius", "50 degrees Celsius", "0 degrees Celsius", "10 degrees Celsius"], 2, False),
    ("The author of Romeo and Juliet is", ["Charles Dickens", "Mark Twain", "Jane Austen", "William Shakespeare"], 3, False),
    ("The chemical symbol for gold is", ["Au", "Ag", "Fe", "Pb"], 0, False),
    ("How many days are in a week?", ["Five.", "Seven.", "Ten.", "Three."], 1, True),
    ("What is the opposite of hot?", ["Warm.", "Loud.", "Cold.", "Fast."], 2, True),
    ("What color is the sky on a clear day?", ["Green.", "Red.", "Yellow.", "Blue."], 3, True),
    ("What is two plus two?", ["Four.", "Five.", "Three.", "Six."], 0, True),
    ("The animal known as the king of the jungle is the", ["mouse", "lion", "rabbit", "sheep"], 1, False),
    ("中国的首都是", ["上海", "广州", "北京", "深圳"], 2, False),
    ("床前明月光，", ["春眠不觉晓", "白日依山尽", "红豆生南国", "疑是地上霜"], 3, False),
    ("一年有几个季节？", ["四个", "三个", "五个", "六个"], 0, False),
    ("太阳从哪个方向升起？", ["西方", "东方", "南方", "北方"], 1, False),
    ("《红楼梦》的作者是", ["鲁迅", "李白", "曹雪芹", "杜甫"], 2, False),
    ("水的化学式是", ["CO2", "O2", "NaCl", "H2O"], 3, False),
    ("The first month of the year is", ["January", "March", "June", "October"], 0, False),
    ("Bees make", ["milk", "honey", "silk", "wool"], 1, False),
    ("The number of legs a spider has is", ["six", "four", "eight", "ten"], 2, False),
    ("To see in the dark, people turn on a", ["spoon", "chair", "shoe", "light"], 3, False),
]


def context(question: str, chat: bool) -> str:
    return CHATML.format(question) if chat else question


def write_task(folder: Path) -> Path:
    """The task as lm-eval reads it: a YAML config next to a JSONL file (loaded with ``datasets``, offline)."""
    data = folder / "questions.jsonl"
    rows = [{"question": context(q, chat), "choices": c, "answer": a} for q, c, a, chat in QUESTIONS]
    data.write_text("".join(json.dumps(row, ensure_ascii=False) + "\n" for row in rows), encoding="utf-8")
    (folder / f"{TASK}.yaml").write_text(
        f"task: {TASK}\n"
        "dataset_path: json\n"
        f"dataset_kwargs:\n  data_files:\n    test: {data}\n"
        "test_split: test\n"
        "output_type: multiple_choice\n"
        "doc_to_text: question\n"
        "doc_to_choice: choices\n"
        "doc_to_target: answer\n"
        "metric_list:\n  - metric: acc\n",
        encoding="utf-8",
    )
    return folder


def tiny_models(folder: Path) -> tuple[Path, Path]:
    from cnllm.core.gguf.convert import convert_to_gguf
    from cnllm.core.tiny import build_spm_tokenizer, build_tiny_llama

    hf = build_tiny_llama(folder / "tiny", build_spm_tokenizer(folder / "tokenizer"))
    return hf, convert_to_gguf(hf, folder / "tiny-f32.gguf", outtype="f32").output


class Serve:
    """``cnllm serve MODEL`` as a user runs it, on a free loopback port."""

    def __init__(self, model: Path, name: str, threads: int | None):
        args = [sys.executable, "-m", "cnllm", "serve", str(model), "--port", "0", "--model-name", name, "--n-ctx", "2048"]
        args += ["--threads", str(threads)] if threads else []
        self.process = subprocess.Popen(args, stderr=subprocess.PIPE, cwd=REPO, env={**os.environ, "PYTHONPATH": str(REPO)})
        line = b""
        while b"serving" not in line and self.process.poll() is None:
            line = self.process.stderr.readline()
        found = re.search(rb"http://127\.0\.0\.1:(\d+)/v1", line)
        if not found:
            raise SystemExit(f"cnllm serve {model} did not start: {line.decode(errors='replace')}")
        self.url = f"http://127.0.0.1:{int(found.group(1))}/v1/completions"

    def stop(self) -> int:
        self.process.send_signal(signal.SIGINT)
        self.process.communicate(timeout=120)
        return self.process.returncode


def run_lm_eval(lm_eval: str, model: str, model_args: str, tasks_dir: Path, out: Path) -> tuple[list[dict], float]:
    """lm-eval's per-question records (``--log_samples``) and the wall time."""
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}
    command = [lm_eval, "--model", model, "--model_args", model_args, "--tasks", TASK, "--include_path", str(tasks_dir),
               "--batch_size", "1", "--device", "cpu", "--log_samples", "--output_path", str(out)]
    started = time.perf_counter()
    result = subprocess.run(command, env=env, capture_output=True, text=True)
    seconds = time.perf_counter() - started
    if result.returncode != 0:
        raise SystemExit(f"lm-eval --model {model} failed ({result.returncode}):\n{result.stderr[-4000:]}")
    samples = sorted(out.rglob(f"samples_{TASK}_*.jsonl"))
    if not samples:
        raise SystemExit(f"lm-eval wrote no samples under {out}")
    records = [json.loads(line) for line in samples[-1].read_text(encoding="utf-8").splitlines() if line.strip()]
    return sorted(records, key=lambda r: r["doc_id"]), seconds


def eos_endings(url: str, hf: Path) -> int:
    """How many of the task's (question, choice) texts the model would end with EOS: lm-eval's request shape sent
    for each; these are the ones scored right only because the server returns that EOS as the generated token."""
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(str(hf))
    count = 0
    for question, choices, _, chat in QUESTIONS:
        for choice in choices:
            ids = tokenizer(f"{context(question, chat)} {choice}")["input_ids"]  # lm-eval's target delimiter: a space
            body = {"model": "bench", "prompt": [ids], "temperature": 0, "max_tokens": 1, "logprobs": 1, "seed": 1234, "echo": True}
            request = urllib.request.Request(url, data=json.dumps(body).encode(), headers={"Content-Type": "application/json"})
            with urllib.request.urlopen(request, timeout=120) as response:
                count += json.load(response)["choices"][0]["finish_reason"] == "stop"
    return count


def loglikelihoods(record: dict) -> list[float]:
    return [float(item[0]) for item in record["filtered_resps"]]


def compare(reference: list[dict], other: list[dict]) -> dict:
    agree, worst, rows = 0, 0.0, []
    for ref, oth in zip(reference, other):
        a, b = loglikelihoods(ref), loglikelihoods(oth)
        pick_a, pick_b = max(range(len(a)), key=a.__getitem__), max(range(len(b)), key=b.__getitem__)
        delta = max(abs(x - y) for x, y in zip(a, b))
        agree += pick_a == pick_b
        worst = max(worst, delta)
        rows.append((ref["doc_id"], pick_a, pick_b, delta))
    accuracy = sum(r["acc"] for r in other) / len(other)
    return {"agree": agree, "total": len(reference), "max_delta": worst, "rows": rows, "accuracy": accuracy}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--lm-eval", required=True, help="the lm_eval executable of a virtual environment with lm-eval[api,hf]")
    parser.add_argument("--hf", type=Path, help="Hugging Face model directory (default: the tiny test model)")
    parser.add_argument("--gguf", type=Path, help="the same model as GGUF (default: the tiny model's f32 GGUF)")
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--out", type=Path, default=REPO / "bench" / "results" / "lm_eval.md")
    args = parser.parse_args()

    with tempfile.TemporaryDirectory(prefix="cnllm-lm-eval-") as scratch:
        scratch = Path(scratch)
        hf, gguf = (args.hf, args.gguf) if args.hf and args.gguf else tiny_models(scratch)
        tasks = write_task(scratch)
        reference, hf_seconds = run_lm_eval(args.lm_eval, "hf", f"pretrained={hf},dtype=float32", tasks, scratch / "out-hf")
        runs = {}
        for label, model in (("cnllm serve (transformers)", hf), ("cnllm serve (llama.cpp GGUF)", gguf)):
            server = Serve(model, "bench", args.threads)
            try:
                # add_bos_token: the tokenizer adds its BOS (if it has one) as in lm-eval's hf backend, so both score the same ids.
                model_args = (f"model=bench,base_url={server.url},tokenizer={hf},tokenizer_backend=huggingface,"
                              "tokenized_requests=True,add_bos_token=True,num_concurrent=1,max_retries=1,max_length=2048")
                records, seconds = run_lm_eval(args.lm_eval, "local-completions", model_args, tasks, scratch / f"out-{len(runs)}")
                eos = eos_endings(server.url, hf)
            finally:
                code = server.stop()
            runs[label] = (compare(reference, records), seconds, code, eos)

    reference_accuracy = sum(r["acc"] for r in reference) / len(reference)
    lines = [
        "# lm-evaluation-harness against cnllm serve",
        "",
        f"{datetime.now(timezone.utc):%Y-%m-%d %H:%M} UTC · {platform.machine()} · Python {platform.python_version()} · "
        f"hf: `{hf.name}` · gguf: `{gguf.name}` · task: {len(QUESTIONS)} local 4-choice questions (`bench/bench_lm_eval.py`)",
        "",
        "| lm-eval model | agrees with `--model hf` | max abs log-likelihood difference | accuracy | answers the model ends with EOS | seconds | serve exit |",
        "| --- | --- | --- | --- | --- | --- | --- |",
        f"| `hf` (reference) | — | — | {reference_accuracy:.2f} | — | {hf_seconds:.1f} | — |",
    ]
    choices = sum(len(c) for _, c, _, _ in QUESTIONS)
    for label, (result, seconds, code, eos) in runs.items():
        lines.append(
            f"| `local-completions` → {label} | {result['agree']}/{result['total']} | {result['max_delta']:.2e} | "
            f"{result['accuracy']:.2f} | {eos} of {choices} | {seconds:.1f} | {code} |"
        )
    lines += ["", "Per question (chosen choice index; max abs difference of the four log-likelihoods vs `hf`):", ""]
    labels = list(runs)
    lines.append("| question | hf | " + " | ".join(labels) + " |")
    lines.append("| --- | --- | " + " | ".join("---" for _ in labels) + " |")
    for index in range(len(QUESTIONS)):
        cells = []
        for label in labels:
            _, ref_pick, pick, delta = runs[label][0]["rows"][index]
            cells.append(f"{pick} ({delta:.1e})" + ("" if pick == ref_pick else " ≠"))
        question, _, _, chat = QUESTIONS[index]
        lines.append(f"| {question}{' (ChatML)' if chat else ''} | {runs[labels[0]][0]['rows'][index][1]} | " + " | ".join(cells) + " |")
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text("\n".join(lines) + "\n", encoding="utf-8")
    print("\n".join(lines[:8 + len(runs)]))


if __name__ == "__main__":
    main()
