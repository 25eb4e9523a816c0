"""Benchmark llama.cpp's weight repacking on and off (``--repack`` / ``--no-repack``) side by side on a real model.

cnllm turns repacking off on CPUs with AMX (llama.cpp's AMX weights crash there: docs/cpu.md) and keeps llama.cpp's
default (on) elsewhere. This measures what "off" costs on a CPU where "on" works, per tensor type, since llama.cpp
repacks only some types (on x86 with AVX2/AVX-512: Q4_0, Q4_K, IQ4_NL, MXFP4; not Q4_1, Q8_0, F16).

Usage:
    bash ../shared/tools/get-smollm2.sh /tmp/smollm2 --hf        # SmolLM2-135M-Instruct: its Q4_1 GGUF + de-quantized HF
    .venv/bin/python bench/bench_repack.py --gguf /tmp/smollm2/SmolLM2-135M-Instruct.Q4_1.gguf \\
        --hf /tmp/smollm2/smollm2-135m-hf --types F16,Q8_0,Q4_0,Q4_K_M --tokens 64 --rounds 5 --threads 2

For each GGUF (the given ones, and the --hf model converted to F16 and quantized to --types), both settings are loaded
once (through cnllm's loader, so the only difference is ``use_extra_bufts``) and run alternately, the order swapped
every round so both see the same machine load: greedy decoding of --tokens tokens after a ~250-token prompt.
Reported: decode speed (tokens after the first / time after the first) and prompt speed (prompt tokens / time to the
first token), medians, and the median of the per-round off/on ratios; the size of llama.cpp's CPU_REPACK buffer
(what it repacked); whether the greedy text is the same; and perplexity of the bundled zh_heldout.txt (ctx 512) with
each setting. Writes a Markdown table to bench/results/repack.md (or --out).
"""

from __future__ import annotations

import argparse
import ctypes
import os
import platform
import re
import statistics
import sys
import tempfile
import time
from datetime import datetime, timezone
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent


class LogCapture:
    """llama.cpp's log lines while a model loads (the CPU_REPACK buffer line says what was repacked)."""

    def __enter__(self):
        import llama_cpp

        self.lines: list[str] = []
        self._callback = llama_cpp.llama_log_callback(lambda level, text, user_data: self.lines.append(text.decode("utf-8", errors="replace")))
        llama_cpp.llama_log_set(self._callback, ctypes.c_void_p(0))
        return self

    def __exit__(self, *exc):
        from cnllm.core.generation.llamacpp import silence_llama_logs

        silence_llama_logs(False)

    def repack_mib(self) -> float:
        found = re.findall(r"CPU_REPACK model buffer size =\s*([0-9.]+) MiB", "".join(self.lines))
        return sum(float(x) for x in found)


def load(gguf: Path, repack: bool, threads: int, n_ctx: int):
    from cnllm.core.llama_loader import open_llama

    with LogCapture() as log:
        llm = open_llama(gguf, repack=repack, n_ctx=n_ctx, n_threads=threads, n_threads_batch=threads, verbose=False)
    assert llm.model_params.use_extra_bufts is repack
    return llm, log.repack_mib()


def run(llm, prompt: list[int], tokens: int) -> dict:
    import llama_cpp

    llm.reset()  # no prompt cache: the same work every round
    vocab = llama_cpp.llama_model_get_vocab(llm.model)
    started = time.perf_counter()
    first = None
    generated: list[int] = []
    for token in llm.generate(prompt, top_k=1, top_p=1.0, min_p=0.0, typical_p=1.0, temp=0.0, repeat_penalty=1.0):
        if first is None:
            first = time.perf_counter() - started
        if llama_cpp.llama_vocab_is_eog(vocab, token) or len(generated) >= tokens:
            break
        generated.append(token)
    total = time.perf_counter() - started
    return {
        "decode": (len(generated) - 1) / (total - first),
        "prompt": len(prompt) / first,
        "text": llm.detokenize(generated).decode("utf-8", errors="replace"),
        "tokens": len(generated),
    }


def perplexity(gguf: Path, repack: bool, threads: int) -> float:
    from cnllm.core.evaluation.ppl import PplOptions, evaluate_perplexity
    from cnllm.core.generation.base import LoadOptions
    from cnllm.core.tiny import asset

    result = evaluate_perplexity(gguf, [asset("zh_heldout.txt")], PplOptions(ctx=512), LoadOptions(threads=threads, repack=repack))
    return result.total.ppl


def measure(gguf: Path, args) -> dict:
    from cnllm.core.tiny import asset

    on, on_mib = load(gguf, True, args.threads, args.n_ctx)
    off, _ = load(gguf, False, args.threads, args.n_ctx)
    try:
        prompt = on.tokenize(asset("en.txt").read_text(encoding="utf-8")[:1100].encode(), add_bos=True)
        for llm in (on, off):
            run(llm, prompt, 4)  # warm-up: compute buffers, page cache
        rows = {"on": [], "off": []}
        for round_ in range(args.rounds):
            order = ("on", "off") if round_ % 2 == 0 else ("off", "on")
            for name in order:
                rows[name].append(run(on if name == "on" else off, prompt, args.tokens))
            print(
                f"{gguf.name} round {round_ + 1}: decode on {rows['on'][-1]['decode']:.1f} / off {rows['off'][-1]['decode']:.1f} tok/s, "
                f"prompt on {rows['on'][-1]['prompt']:.0f} / off {rows['off'][-1]['prompt']:.0f} tok/s",
                file=sys.stderr,
                flush=True,
            )
    finally:
        on.close()
        off.close()
    med = lambda name, key: statistics.median(r[key] for r in rows[name])  # noqa: E731
    ratio = lambda key: statistics.median(b[key] / a[key] for a, b in zip(rows["on"], rows["off"]))  # noqa: E731
    ppl_on, ppl_off = perplexity(gguf, True, args.threads), perplexity(gguf, False, args.threads)
    return {
        "name": gguf.name,
        "repack_mib": on_mib,
        "decode_on": med("on", "decode"),
        "decode_off": med("off", "decode"),
        "decode_ratio": ratio("decode"),
        "prompt_on": med("on", "prompt"),
        "prompt_off": med("off", "prompt"),
        "prompt_ratio": ratio("prompt"),
        "same_text": all(a["text"] == b["text"] for a, b in zip(rows["on"], rows["off"])),
        "ppl_on": ppl_on,
        "ppl_off": ppl_off,
        "prompt_tokens": len(prompt),
        "tokens": rows["on"][0]["tokens"],
    }


def build_types(hf: Path, types: list[str], folder: Path) -> list[Path]:
    from cnllm.core.gguf.convert import ConvertOptions, convert_to_gguf
    from cnllm.core.gguf.quantize import QuantizeOptions, quantize_gguf

    f16 = convert_to_gguf(hf, folder / "smollm2-f16.gguf", ConvertOptions(outtype="f16")).output
    out = []
    for name in types:
        if name.upper() == "F16":
            out.append(f16)
        else:
            out.append(quantize_gguf(f16, folder / f"smollm2-{name.lower()}.gguf", QuantizeOptions(type=name)).output)
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--gguf", type=Path, action="append", default=[], help="A GGUF to measure as it is (repeat).")
    parser.add_argument("--hf", type=Path, help="A Hugging Face model to convert to F16 and quantize to --types.")
    parser.add_argument("--types", default="F16,Q8_0,Q4_0,Q4_K_M")
    parser.add_argument("--tokens", type=int, default=64)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--n-ctx", type=int, default=1024)
    parser.add_argument("--out", type=Path, default=REPO / "bench" / "results" / "repack.md")
    args = parser.parse_args()
    if not args.gguf and args.hf is None:
        sys.exit("give --gguf FILE and/or --hf DIR; fetch SmolLM2 with: bash ../shared/tools/get-smollm2.sh /tmp/smollm2 --hf")

    from cnllm.core.cpu import cpu_info
    from cnllm.core.generation.llamacpp import silence_llama_logs

    silence_llama_logs(False)
    info = cpu_info()
    if info.amx:
        sys.exit(f"this CPU advertises AMX ({', '.join(info.amx)}): repacking on is the setting that crashes here; run this where it works")
    import llama_cpp

    with tempfile.TemporaryDirectory() as scratch:
        ggufs = list(args.gguf) + (build_types(args.hf, [t.strip() for t in args.types.split(",") if t.strip()], Path(scratch)) if args.hf else [])
        results = [measure(g, args) for g in ggufs]
    system = llama_cpp.llama_print_system_info().decode().strip().rstrip("|").strip()
    command = " ".join(["python", "bench/bench_repack.py", *sum((["--gguf", str(g)] for g in args.gguf), [])])
    if args.hf:
        command += f" --hf {args.hf} --types {args.types}"
    command += f" --tokens {args.tokens} --rounds {args.rounds} --threads {args.threads}"
    first = results[0]
    lines = [
        "# llama.cpp weight repacking on vs off",
        "",
        f"- date: {datetime.now(timezone.utc).strftime('%Y-%m-%d %H:%M UTC')}",
        f"- machine: {info.model} ({info.machine}), {info.cores} logical CPUs shared with other jobs (load average "
        f"{os.getloadavg()[0]:.1f} at the end), no AMX; Python {platform.python_version()}, llama-cpp-python {llama_cpp.__version__}",
        f"- llama.cpp: `{system}`",
        f"- greedy, {first['prompt_tokens']}-token prompt, {first['tokens']} new tokens, {args.threads} threads; medians of {args.rounds} "
        "interleaved rounds (order swapped each round); ratio = median of per-round off/on ratios",
        f"- command: `{command}`",
        "",
        "| GGUF | repacked by llama.cpp | decode on (default) | decode off (--no-repack) | decode off/on | prompt on | prompt off | prompt off/on | same greedy text | ppl on | ppl off |",
        "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |",
    ]
    for r in results:
        repacked = f"{r['repack_mib']:.1f} MiB" if r["repack_mib"] else "nothing"
        lines.append(
            f"| {r['name']} | {repacked} | {r['decode_on']:.1f} tok/s | "
            f"{r['decode_off']:.1f} tok/s | **{r['decode_ratio']:.3f}×** | {r['prompt_on']:.0f} tok/s | {r['prompt_off']:.0f} tok/s | "
            f"{r['prompt_ratio']:.3f}× | {'yes' if r['same_text'] else 'no'} | {r['ppl_on']:.4f} | {r['ppl_off']:.4f} |"
        )
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text("\n".join(lines) + "\n", encoding="utf-8")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
