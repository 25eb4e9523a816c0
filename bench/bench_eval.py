"""`cnllm eval` figures, measured side by side in one run.

Run:  .venv/bin/python bench/bench_eval.py [--gemma /tmp/gemma] [--ctx 512] [--questions 30] [--threads 2] [--write bench/results/eval.md]

1. Perplexity on GGUF files vs llama.cpp's own perplexity computation — a transcription of llama.cpp's
   `perplexity` tool loop (whole chunks, BOS first, second half scored) on llama-cpp-python's low-level API —
   with the same context; `cnllm eval ppl --llamacpp-compatible` must agree within 0.5%:
   the tiny test model as f32 GGUF, and the real Gemma 3 270M Q4_K_M on a Chinese and an English text.
2. Gemma 3 270M: Q4_K_M vs a Q8_0 re-quantization of it (cnllm.core.gguf.quantize), and the de-quantized
   Hugging Face checkpoint on transformers (`get-gemma.sh DIR --hf`), same texts and context.
3. Multiple choice (C-Eval layout, 5-shot) on a Chinese poetry exam built from /work/shared/fixtures/sft
   (next line of a poem; author of a poem): cnllm on transformers must equal, question by question, a plain
   reference scorer written directly on transformers (one prompt per forward pass, no padding); throughput
   (questions/s) of both, and cnllm on the Q4_K_M GGUF through llama.cpp.
lm-evaluation-harness is not measured: it pulls a large dependency tree and its tasks come from the Hub,
which these machines cannot reach.
"""

from __future__ import annotations

import argparse
import csv
import datetime
import json
import math
import platform
import random
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from cnllm.core.evaluation.mc import (  # noqa: E402
    LETTERS,
    McOptions,
    build_prompt,
    evaluate_multiple_choice,
    load_subjects,
)
from cnllm.core.evaluation.ppl import PplOptions, evaluate_perplexity  # noqa: E402
from cnllm.core.generation.base import LoadOptions  # noqa: E402
from cnllm.core.tiny import asset  # noqa: E402

POEMS = Path("/work/shared/fixtures/sft/poem-next-line.json")
PPL_TABLE_HEADER = (
    "| model | text | tokens scored (cnllm / llama.cpp) | cnllm ppl | llama.cpp ppl | difference | tokens/s (cnllm / llama.cpp) |",
    "| --- | --- | --- | --- | --- | --- | --- |",
)


# ---------------------------------------------------------------- anchors


def llamacpp_reference_ppl(model_path: Path, text: str, n_ctx: int, threads: int, flash_attn: str) -> tuple[float, int, float, int]:
    """llama.cpp's perplexity tool, step by step on the C API: tokenize with BOS, whole chunks of n_ctx, clear
    the memory, put BOS first, decode the chunk asking logits only for its second half, sum -log p(next).
    Returns (ppl, tokens scored, seconds, tokens decoded)."""
    import llama_cpp

    from cnllm.core.generation.llamacpp import silence_llama_logs
    from cnllm.core.llama_loader import model_params

    silence_llama_logs(False)
    model = llama_cpp.llama_model_load_from_file(str(model_path).encode(), model_params())  # cnllm's repack decision
    params = llama_cpp.llama_context_default_params()
    params.n_ctx = params.n_batch = params.n_ubatch = n_ctx
    params.n_threads = params.n_threads_batch = threads
    # The perplexity tool's default is "auto"; llama-cpp-python's Llama (what cnllm uses) disables flash attention.
    # Flash attention changes the rounding of Gemma's attention enough to move ppl by ~0.5%, so compare like with like.
    params.flash_attn_type = {"off": llama_cpp.LLAMA_FLASH_ATTN_TYPE_DISABLED, "auto": llama_cpp.LLAMA_FLASH_ATTN_TYPE_AUTO}[flash_attn]
    ctx = llama_cpp.llama_init_from_model(model, params)
    vocab = llama_cpp.llama_model_get_vocab(model)
    n_vocab = llama_cpp.llama_vocab_n_tokens(vocab)
    raw = text.encode("utf-8")
    buffer = (llama_cpp.llama_token * (len(raw) + 8))()
    count = llama_cpp.llama_tokenize(vocab, raw, len(raw), buffer, len(buffer), True, False)
    tokens = list(buffer[:count])
    add_bos = llama_cpp.llama_vocab_get_add_bos(vocab)
    bos = llama_cpp.llama_vocab_bos(vocab)
    first = n_ctx // 2
    batch = llama_cpp.llama_batch_init(n_ctx, 0, 1)
    nll, scored, chunks = 0.0, 0, len(tokens) // n_ctx
    started = time.perf_counter()
    try:
        for chunk in range(chunks):
            start = chunk * n_ctx
            llama_cpp.llama_memory_clear(llama_cpp.llama_get_memory(ctx), True)
            batch.n_tokens = n_ctx
            for k in range(n_ctx):
                batch.token[k] = bos if (k == 0 and add_bos) else tokens[start + k]
                batch.pos[k] = k
                batch.n_seq_id[k] = 1
                batch.seq_id[k][0] = 0
                batch.logits[k] = k >= first
            if llama_cpp.llama_decode(ctx, batch) != 0:
                raise RuntimeError("llama_decode failed")
            for j in range(first, n_ctx - 1):
                logits = np.ctypeslib.as_array(llama_cpp.llama_get_logits_ith(ctx, j), shape=(n_vocab,)).astype(np.float64)
                peak = logits.max()
                nll += peak + math.log(np.exp(logits - peak).sum()) - logits[tokens[start + j + 1]]
                scored += 1
    finally:
        seconds = time.perf_counter() - started
        llama_cpp.llama_batch_free(batch)
        llama_cpp.llama_free(ctx)
        llama_cpp.llama_model_free(model)
    return math.exp(nll / scored), scored, seconds, chunks * n_ctx


def reference_mc(model_dir: Path, prompts: list[str]) -> tuple[list[list[float]], float]:
    """Letter probabilities the plain way: one prompt per forward pass, no padding, straight transformers
    (last-position logits only, as cnllm asks for, so the throughput comparison measures batching alone)."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(str(model_dir))
    model = AutoModelForCausalLM.from_pretrained(str(model_dir), dtype=torch.float32).eval()
    vocab = tokenizer.get_vocab()
    out = []
    started = time.perf_counter()
    for prompt in prompts:
        ids = tokenizer(prompt).input_ids
        with torch.no_grad():
            logprobs = torch.log_softmax(model(torch.tensor([ids]), logits_to_keep=1).logits[0, -1].double(), -1)
        scores = []
        for letter in LETTERS:
            spellings = {vocab[p] for p in (letter, "\u2581" + letter, "\u0120" + letter, " " + letter) if p in vocab}
            extended = tokenizer(prompt + letter).input_ids
            if extended[: len(ids)] == ids and len(extended) > len(ids):
                spellings.add(extended[len(ids)])
            scores.append(torch.logsumexp(logprobs[sorted(spellings)], 0).item())
        top = max(scores)
        weights = [math.exp(s - top) for s in scores]
        out.append([w / sum(weights) for w in weights])
    return out, time.perf_counter() - started


# ---------------------------------------------------------------- data


def build_poem_exam(root: Path, per_subject: int, seed: int = 0) -> Path:
    """Two C-Eval-layout subjects from the poem SFT records: the next line of a poem, and a poem's author."""
    records = json.loads(POEMS.read_text(encoding="utf-8"))
    rng = random.Random(seed)
    next_line = [r for r in records if r["instruction"].startswith("请写出")]
    authors = [r for r in records if r["instruction"].endswith("的作者是谁？")]
    subjects = {
        "poem_next_line": ([(r["input"] + "下一句是？", r["output"]) for r in next_line], "古诗词接句"),
        "poem_author": ([(r["instruction"], r["output"]) for r in authors], "古诗词作者"),
    }
    mapping = {}
    for key, (pairs, chinese) in subjects.items():
        rng.shuffle(pairs)
        pool = sorted({answer for _, answer in pairs})
        rows = []
        for number, (question, answer) in enumerate(pairs[: per_subject + 5]):
            options = [answer] + rng.sample([a for a in pool if a != answer], 3)
            rng.shuffle(options)
            rows.append([str(number), question, *options, LETTERS[options.index(answer)]])
        for split, chunk in (("dev", rows[:5]), ("val", rows[5:])):
            path = root / split / f"{key}_{split}.csv"
            path.parent.mkdir(parents=True, exist_ok=True)
            with open(path, "w", encoding="utf-8", newline="") as handle:
                writer = csv.writer(handle)
                writer.writerow(["id", "question", "A", "B", "C", "D", "answer"])
                writer.writerows([[str(i), *row[1:]] for i, row in enumerate(chunk)])
        mapping[key] = [key, chinese, "Humanities"]
    (root / "subject_mapping.json").write_text(json.dumps(mapping, ensure_ascii=False), encoding="utf-8")
    return root


# ---------------------------------------------------------------- sections


def ppl_row(label: str, model: Path, text_path: Path, ctx: int, threads: int, flash_attn: str = "off") -> tuple[str, dict]:
    text = text_path.read_text(encoding="utf-8")
    ref_ppl, ref_count, ref_seconds, ref_tokens = llamacpp_reference_ppl(model, text, ctx, threads, flash_attn)
    ours = evaluate_perplexity(model, [text_path], PplOptions(ctx=ctx, llamacpp_compatible=True), LoadOptions(threads=threads)).total
    diff = ours.ppl / ref_ppl - 1
    line = (
        f"| {label} | {text_path.name} | {ours.tokens_scored} / {ref_count} | {ours.ppl:.4f} | {ref_ppl:.4f} | {100 * diff:+.4f}% | "
        f"{ours.tokens_per_second:.0f} / {ref_tokens / ref_seconds:.0f} |"
    )
    return line, {"ours": ours.ppl, "reference": ref_ppl, "ok": abs(diff) < 0.005 and ours.tokens_scored == ref_count}


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--gemma", type=Path, default=Path("/tmp/gemma"), help="folder of get-gemma.sh (GGUF, and gemma-3-270m-hf/ with --hf)")
    parser.add_argument("--ctx", type=int, default=512)
    parser.add_argument("--questions", type=int, default=16, help="questions per subject of the poetry exam")
    parser.add_argument("--en-chars", type=int, default=6000, help="characters of cnllm/assets/en.txt to score (keeps the run short)")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--write", type=Path, default=None, help="also write the markdown report here")
    parser.add_argument("--only-ppl", action="store_true", help="only the perplexity-vs-llama.cpp section")
    args = parser.parse_args()

    from cnllm.core.runtime import quiet_libraries

    quiet_libraries()
    work = Path(tempfile.mkdtemp(prefix="cnllm-bench-eval-"))
    zh_text = asset("zh_heldout.txt")
    en_text = work / "en_excerpt.txt"
    en_text.write_text(asset("en.txt").read_text(encoding="utf-8")[: args.en_chars], encoding="utf-8")
    lines = [
        "# `cnllm eval` benchmark",
        "",
        f"- machine: {platform.machine()}, {platform.processor() or 'cpu'}, 2 shared cores (other jobs running), no GPU",
        f"- date: {datetime.date.today().isoformat()}",
        f"- command: `.venv/bin/python bench/bench_eval.py --ctx {args.ctx} --questions {args.questions} --threads {args.threads} --en-chars {args.en_chars}`",
        f"- texts: cnllm/assets/zh_heldout.txt (Chinese, {len(zh_text.read_bytes())} bytes), the first {args.en_chars} characters of cnllm/assets/en.txt (English)",
        "",
        f"## Perplexity vs llama.cpp's perplexity loop (ctx {args.ctx}, --llamacpp-compatible)",
        "",
        *PPL_TABLE_HEADER,
    ]
    checks = []

    from cnllm.core.gguf.convert import ConvertOptions, convert_to_gguf
    from cnllm.core.tiny import build_spm_tokenizer, build_tiny_llama

    tiny_dir = build_tiny_llama(work / "tiny", build_spm_tokenizer(work / "tok"))
    tiny_gguf = convert_to_gguf(tiny_dir, work / "tiny-f32.gguf", ConvertOptions(outtype="f32")).output
    line, check = ppl_row("tiny LLaMA f32 GGUF (ctx 128)", tiny_gguf, asset("en.txt"), 128, args.threads)
    lines.append(line)
    checks.append(check)
    gemma_q4 = args.gemma / "gemma-3-270m-q4_k_m.gguf"
    gemma_q8 = None
    if gemma_q4.exists():
        for text in (zh_text, en_text):
            line, check = ppl_row("Gemma 3 270M Q4_K_M", gemma_q4, text, args.ctx, args.threads)
            lines.append(line)
            checks.append(check)
        from cnllm.core.gguf.quantize import QuantizeOptions, quantize_gguf

        gemma_q8 = quantize_gguf(gemma_q4, work / "gemma-q8_0.gguf", QuantizeOptions(type="Q8_0", allow_requantize=True, threads=args.threads)).output
        for text in (zh_text, en_text):
            line, check = ppl_row("Gemma 3 270M Q8_0 (from Q4_K_M)", gemma_q8, text, args.ctx, args.threads)
            lines.append(line)
            checks.append(check)
    lines += ["", f"All within 0.5% with identical token counts: {'yes' if all(c['ok'] for c in checks) else 'NO'}", ""]
    if gemma_q4.exists():
        line, _ = ppl_row("Gemma 3 270M Q4_K_M, llama.cpp loop with flash attention auto", gemma_q4, zh_text, args.ctx, args.threads, "auto")
        lines += ["For scale, the llama.cpp loop with the tool's default flash attention (auto) instead:", "", *PPL_TABLE_HEADER, line, ""]

    gemma_hf = args.gemma / "gemma-3-270m-hf"
    if gemma_q4.exists() and not args.only_ppl:
        lines += [
            f"## Gemma 3 270M perplexity by format (ctx {args.ctx}, non-overlapping windows)",
            "",
            "| model | text | tokens scored | ppl | bits/byte | tokens/s |",
            "| --- | --- | --- | --- | --- | --- |",
        ]
        on_cpu = LoadOptions(threads=args.threads)
        variants = [("Q4_K_M GGUF (llama.cpp)", gemma_q4, on_cpu), ("Q8_0 re-quantized (llama.cpp)", gemma_q8, on_cpu)]
        if (gemma_hf / "config.json").exists():
            variants.append(("de-quantized HF f32 (transformers)", gemma_hf, LoadOptions()))
        for label, path, load in variants:
            result = evaluate_perplexity(path, [zh_text, en_text], PplOptions(ctx=args.ctx, batch_size=1), load)
            for score in result.files:
                lines.append(
                    f"| {label} | {Path(score.path).name} | {score.tokens_scored} | {score.ppl:.3f} | {score.bits_per_byte:.4f} | {score.tokens_per_second:.0f} |"
                )
        lines.append("")

    if (gemma_hf / "config.json").exists() and POEMS.exists() and not args.only_ppl:
        exam = build_poem_exam(work / "poems", args.questions)
        options = McOptions(format="ceval", split="val", shots=5, batch_size=8, ctx=4096)
        subjects = load_subjects(exam, options)
        prompts = [build_prompt(s, q) for s in subjects for q in s.questions]
        expected, ref_seconds = reference_mc(gemma_hf, prompts)
        ours = evaluate_multiple_choice(gemma_hf, exam, options)
        on_gguf = evaluate_multiple_choice(gemma_q4, exam, options, LoadOptions(threads=args.threads))
        ref_predictions = [LETTERS[int(np.argmax(p))] for p in expected]
        same = sum(p.prediction == r for p, r in zip(ours.predictions, ref_predictions))
        max_diff = max(abs(p.probabilities[x] - r[i]) for p, r in zip(ours.predictions, expected) for i, x in enumerate(LETTERS))
        answers = [p.answer for p in ours.predictions]
        ref_accuracy = sum(r == a for r, a in zip(ref_predictions, answers)) / len(answers)
        gguf_same = sum(a.prediction == b.prediction for a, b in zip(ours.predictions, on_gguf.predictions))
        n = len(prompts)
        lines += [
            f"## Multiple choice: Chinese poetry exam, C-Eval layout, 5-shot, {n} questions (Gemma 3 270M)",
            "",
            "| scorer | accuracy | questions/s | same predictions as the reference |",
            "| --- | --- | --- | --- |",
            f"| reference: plain transformers, one prompt per pass | {100 * ref_accuracy:.1f}% | {n / ref_seconds:.2f} | — |",
            f"| cnllm eval mc, transformers, batch 8 | {100 * ours.overall:.1f}% | {ours.questions_per_second:.2f} | {same}/{n} (max probability difference {max_diff:.1e}) |",
            f"| cnllm eval mc, Q4_K_M GGUF, llama.cpp (prefix reuse) | {100 * on_gguf.overall:.1f}% | {on_gguf.questions_per_second:.2f} | {gguf_same}/{n} agree with the HF run |",
            "",
            "Per subject (cnllm, transformers): "
            + ", ".join(f"{s.name} {100 * s.accuracy:.1f}%" for s in ours.subjects)
            + f". Chance is 25%. Throughput ratio cnllm/reference: {ours.questions_per_second * ref_seconds / n:.2f}×.",
            "",
        ]
        checks.append({"ok": same == n})
    report = "\n".join(lines) + "\n"
    print(report)
    if args.write:
        args.write.write_text(report, encoding="utf-8")
    sys.exit(0 if all(c["ok"] for c in checks) else 1)


if __name__ == "__main__":
    main()
