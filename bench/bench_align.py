"""Preference alignment: ``cnllm align`` (DPO) against TRL's own DPO script, and accuracy before → after.

Throughput: both train the same small random LLaMA on the same pairs (cnllm/assets/pref_zh.jsonl,
rendered with the alpaca template; TRL's script gets the rendered prompts and answers as its
prompt/chosen/rejected strings, so both see the same tokens), same LoRA rank/targets, batch,
steps, beta, max length and precision (fp32 on CPU), LoRA reference = adapter disabled in both.
Each run is a fresh process; the two alternate; medians are compared. tokens/s = the Trainer's
non-padding input tokens / its train_runtime, for both. Peak memory: the process's peak RSS.

Quality: preference accuracy (``cnllm eval pref``, per-token log-probability) on the 12 held-out
pairs before and after ``cnllm align`` with DPO and ORPO, on the test suite's tiny model and,
when ``--smollm2 DIR`` names a local SmolLM2-135M(-Instruct) directory, on it.

    python bench/bench_align.py --repeats 3 --steps 20 --write bench/results/align.md
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]

# TRL's own script (trl/scripts/dpo.py, i.e. `trl dpo`), run as it is; the wrapper only reads its figures.
BASELINE = r'''
import json, resource, sys
import trl
from trl.scripts import dpo
figures = {}
original = trl.DPOTrainer.train
def train(self, *args, **kwargs):
    output = original(self, *args, **kwargs)
    figures.update(tokens=self.state.num_input_tokens_seen, runtime=output.metrics["train_runtime"],
                   loss=[h["loss"] for h in self.state.log_history if "loss" in h][-1])
    return output
trl.DPOTrainer.train = train
parser = dpo.make_parser()
script_args, training_args, model_args, dataset_args = parser.parse_args_and_config(fail_with_unknown_args=False)
training_args.include_num_input_tokens_seen = "non_padding"  # the count cnllm reports (its parser takes only a bool)
dpo.main(script_args, training_args, model_args, dataset_args)
print(json.dumps({"tokens_per_second": figures["tokens"] / figures["runtime"], "final_loss": figures["loss"],
                  "peak_memory_bytes": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024}))
'''
TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def build_model(root: Path) -> Path:
    from cnllm.core.tiny import build_spm_tokenizer, build_tiny_llama

    tokenizer = build_spm_tokenizer(root / "tokenizer")
    return build_tiny_llama(root / "model", tokenizer, hidden_size=256, layers=4, heads=8, kv_heads=4, intermediate_size=688,
                            max_position_embeddings=1024, max_shard_size="50MB")


def rendered_pairs(model: Path, folder: Path) -> Path:
    """The bundled pairs as TRL's script reads them: the alpaca-rendered prompt and the answers with their end
    marker, exactly the text cnllm tokenises (TRL's tokenizer call adds the BOS cnllm adds)."""
    from transformers import AutoTokenizer

    from cnllm.core.tiny import asset
    from cnllm.core.training.data import segment_function
    from cnllm.core.training.preference import read_preference_pairs, render_pair

    tokenizer = AutoTokenizer.from_pretrained(str(model))
    to_segments = segment_function("alpaca", tokenizer, None)
    folder.mkdir(parents=True)
    with open(folder / "train.jsonl", "w", encoding="utf-8") as handle:
        for pair in read_preference_pairs([asset("pref_zh.jsonl")]).pairs:
            prompt, chosen, rejected = render_pair(pair, to_segments)
            handle.write(json.dumps({"prompt": "".join(s.text for s in prompt), "chosen": chosen, "rejected": rejected}, ensure_ascii=False) + "\n")
    return folder


def env(threads: int) -> dict:
    return {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": str(threads), "HF_HUB_OFFLINE": "1",
            "TRANSFORMERS_VERBOSITY": "error", "HF_DATASETS_OFFLINE": "1"}


def run_cnllm(model: Path, out: Path, args) -> dict:
    from cnllm.core.tiny import asset

    command = [sys.executable, "-m", "cnllm", "align", "-m", str(model), "-d", str(asset("pref_zh.jsonl")), "-o", str(out), "--template", "alpaca",
               "--batch-size", str(args.batch_size), "--max-steps", str(args.steps), "--lora-rank", str(args.rank), "--lora-alpha", str(2 * args.rank),
               "--lora-dropout", "0.05", "--beta", "0.1", "--max-length", str(args.max_length), "--max-prompt-length", str(args.max_length - 1),
               "--learning-rate", "5e-5", "--validation-split", "0", "--save-steps", "100000", "--logging-steps", str(args.steps),
               "--cache-dir", str(out.parent / "cnllm-cache"), "--seed", "42", "--json"]
    done = subprocess.run(command, capture_output=True, text=True, env=env(args.threads))
    if done.returncode:
        raise SystemExit(f"cnllm align failed:\n{done.stderr[-2000:]}")
    report = json.loads(done.stdout)
    return {"tokens_per_second": report["tokens_per_second"], "peak_memory_bytes": report["peak_memory_bytes"], "final_loss": report["train_loss"]}


def run_trl(model: Path, data: Path, out: Path, args) -> dict:
    command = [sys.executable, "-c", BASELINE, "--model_name_or_path", str(model), "--dataset_name", str(data), "--output_dir", str(out),
               "--use_peft", "--lora_r", str(args.rank), "--lora_alpha", str(2 * args.rank), "--lora_dropout", "0.05",
               "--lora_target_modules", *TARGETS, "--per_device_train_batch_size", str(args.batch_size), "--max_steps", str(args.steps),
               "--beta", "0.1", "--max_length", str(args.max_length), "--learning_rate", "5e-5", "--lr_scheduler_type", "cosine",
               "--warmup_steps", "0.03", "--logging_steps", str(args.steps), "--save_strategy", "no", "--report_to", "none", "--use_cpu",
               "--bf16", "false", "--gradient_checkpointing", "false",
               "--dtype", "float32", "--seed", "42", "--disable_tqdm", "true"]
    done = subprocess.run(command, capture_output=True, text=True, env=env(args.threads), cwd=out.parent)
    if done.returncode:
        raise SystemExit(f"TRL's dpo script failed:\n{done.stderr[-3000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def accuracy(model: Path, adapter: Path | None, threads: int, template: str) -> float:
    from cnllm.core.tiny import asset

    command = [sys.executable, "-m", "cnllm", "eval", "pref", str(model), "-d", str(asset("pref_zh_heldout.jsonl")), "--template", template, "--json"]
    if adapter is not None:
        command += ["--lora", str(adapter)]
    done = subprocess.run(command, capture_output=True, text=True, env=env(threads))
    if done.returncode:
        raise SystemExit(f"eval pref failed:\n{done.stderr[-2000:]}")
    return json.loads(done.stdout)["accuracy"]


def run_quality(name: str, model: Path, root: Path, threads: int, steps: int, lr: str, template: str, max_length: int) -> list[str]:
    from cnllm.core.tiny import asset

    before = accuracy(model, None, threads, template)
    lines = []
    for method in ("dpo", "orpo"):
        out = root / f"q-{name}-{method}"
        command = [sys.executable, "-m", "cnllm", "align", "-m", str(model), "-d", str(asset("pref_zh.jsonl")), "--validation-data",
                   str(asset("pref_zh_heldout.jsonl")), "--method", method, "--template", template, "--max-length", str(max_length),
                   "--batch-size", "4", "--max-steps", str(steps), "--learning-rate", lr, "--lora-rank", "8", "--lora-alpha", "16",
                   "--lora-dropout", "0", "--save-steps", "100000", "--cache-dir", str(root / "quality-cache"), "--seed", "7", "-o", str(out), "--json"]
        done = subprocess.run(command, capture_output=True, text=True, env=env(threads))
        if done.returncode:
            raise SystemExit(f"{name} {method} failed:\n{done.stderr[-2000:]}")
        report = json.loads(done.stdout)
        after = accuracy(model, out, threads, template)
        lines.append(f"| {name} | {method} | {steps} | {lr} | {100 * before:.1f}% → **{100 * after:.1f}%** | "
                     f"{report['reward_accuracy_before']:.2f} → {report['reward_accuracy']:.2f} | {report['eval_loss_before']:.3f} → {report['eval_loss']:.3f} |")
    return lines


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--batch-size", type=int, default=4)
    parser.add_argument("--rank", type=int, default=16)
    parser.add_argument("--max-length", type=int, default=256)
    parser.add_argument("--threads", type=int, default=1, help="Torch threads per run (the same for both).")
    parser.add_argument("--smollm2", type=Path, help="A local SmolLM2-135M(-Instruct) directory for the quality table.")
    parser.add_argument("--skip-quality", action="store_true")
    parser.add_argument("--write", type=Path, help="Also write the markdown report to this file.")
    args = parser.parse_args()

    with tempfile.TemporaryDirectory(prefix="bench-align-") as tmp:
        root = Path(tmp)
        model = build_model(root)
        data = rendered_pairs(model, root / "trl-data")
        quality = []
        if not args.skip_quality:
            from cnllm.core.tiny import build_spm_tokenizer, build_tiny_llama

            tiny = build_tiny_llama(root / "tiny", build_spm_tokenizer(root / "tiny-tokenizer"))
            quality += run_quality("tiny (hidden 64, 2 layers)", tiny, root, args.threads, 12, "3e-3", "alpaca", 160)
            if args.smollm2 is not None:
                quality += run_quality("SmolLM2-135M", args.smollm2, root, args.threads, 30, "5e-5", "auto", 256)
        ours, theirs = [], []
        for index in range(args.repeats):
            if index % 2:
                theirs.append(run_trl(model, data, root / f"trl-{index}", args))
            ours.append(run_cnllm(model, root / f"cnllm-{index}", args))
            if not index % 2:
                theirs.append(run_trl(model, data, root / f"trl-{index}", args))
            print(f"repeat {index + 1}: cnllm {ours[-1]['tokens_per_second']:.0f} tok/s, TRL script {theirs[-1]['tokens_per_second']:.0f} tok/s", file=sys.stderr)

    def median(rows, key):
        return statistics.median(r[key] for r in rows)

    ratio = median(ours, "tokens_per_second") / median(theirs, "tokens_per_second")
    memory = median(ours, "peak_memory_bytes") / median(theirs, "peak_memory_bytes")
    command = "python bench/bench_align.py " + " ".join(sys.argv[1:])
    table = "\n".join(["| model | method | steps | lr | preference accuracy (held-out, per token) | reward accuracy (held-out) | eval loss |",
                       "|---|---|---:|---:|---:|---:|---:|", *quality]) if quality else "(skipped)"
    report = f"""# Preference alignment: `cnllm align` vs TRL's own DPO script

- Machine: {platform.machine()}, {os.cpu_count()} CPUs, {platform.system()} {platform.release()}; shared with other jobs (load average at start {os.getloadavg()[0]:.1f})
- Date: {dt.datetime.now(dt.timezone.utc).strftime('%Y-%m-%d %H:%M UTC')}
- Command: `{command}`
- Model: random LLaMA, hidden 256, 4 layers, 8 heads (4 KV), FFN 688, vocab 1,000 (SentencePiece), fp32 on CPU
- Data: cnllm/assets/pref_zh.jsonl (40 pairs, alpaca template); DPO (sigmoid), beta 0.1, batch {args.batch_size}, {args.steps} steps,
  max length {args.max_length}, LoRA r={args.rank} alpha={2 * args.rank} on q,k,v,o,gate,up,down, reference = adapter disabled
- Torch threads per run: {args.threads}; fresh processes, alternating; medians of {args.repeats}.

| | tokens/s (median) | runs (tokens/s) | peak RSS (median) | final loss (median) |
|---|---:|---|---:|---:|
| `cnllm align` | {median(ours, 'tokens_per_second'):,.0f} | {', '.join(f"{r['tokens_per_second']:,.0f}" for r in ours)} | {median(ours, 'peak_memory_bytes') / 2**20:,.0f} MiB | {median(ours, 'final_loss'):.4f} |
| TRL `trl/scripts/dpo.py` | {median(theirs, 'tokens_per_second'):,.0f} | {', '.join(f"{r['tokens_per_second']:,.0f}" for r in theirs)} | {median(theirs, 'peak_memory_bytes') / 2**20:,.0f} MiB | {median(theirs, 'final_loss'):.4f} |

**cnllm / TRL script: {ratio:.2f}x tokens/s, {memory:.2f}x peak memory** (goal >= 1.0x, <= 1.0x).

## Preference accuracy before → after `cnllm align` (held-out `pref_zh_heldout.jsonl`, 12 pairs)

{table}
"""
    print(report)
    if args.write:
        args.write.write_text(report, encoding="utf-8")


if __name__ == "__main__":
    main()
