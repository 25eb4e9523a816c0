"""Peak memory and wall time of `cnllm convert-meta` against transformers' own Meta → Hugging Face conversion.

Run:  .venv/bin/python bench/bench_meta.py --transformers-python /path/to/venv/bin/python [--repeats 2] [--write bench/results/meta.md]

transformers ships `transformers.models.llama.convert_llama_weights_to_hf` in its wheels up to 4.46
(later wheels leave the conversion scripts out), so the anchor runs in a separate environment with
transformers 4.46 and the same torch (--transformers-python). Builds a random fp16 LLaMA the size of
bench_merge.py's (GQA: 4 key/value heads of 16), writes it as Meta's layout in two model-parallel parts
with merge-lora's exporter, then converts it back both ways, each run in its own subprocess (peak RSS =
VmHWM, wall time from the parent), interleaved. Both write bf16 (transformers' script always does), and
the two outputs are compared tensor by tensor, as is cnllm's output with the original model.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import platform
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_merge import mib, peak_rss, size_of, warm  # noqa: E402


def child(kind: str, args: list[str]) -> None:
    started = time.perf_counter()
    if kind == "cnllm":
        from cnllm.cli.app import main

        try:
            main(args)
        except SystemExit as exc:
            if exc.code:
                raise
    elif kind == "transformers":
        import runpy

        sys.argv = ["convert_llama_weights_to_hf", *args]
        runpy.run_module("transformers.models.llama.convert_llama_weights_to_hf", run_name="__main__")
    elif kind == "compare":
        import torch

        from cnllm.core.tensors import stream_tensors

        left, right, dtype = args
        other = dict(stream_tensors(right))
        names = differing = 0
        for name, tensor in stream_tensors(left):
            names += 1
            differing += not torch.equal(tensor.to(getattr(torch, dtype)), other.pop(name).to(getattr(torch, dtype)))
        print(json.dumps({"tensors": names, "differing": differing, "unmatched": len(other)}))
    seconds = time.perf_counter() - started
    print(json.dumps({"peak_rss": peak_rss(), "seconds": seconds}))


def run_child(python: str, kind: str, *args) -> dict:
    started = time.perf_counter()
    done = subprocess.run([python, __file__, "--child", kind, *map(str, args)], capture_output=True, text=True)
    if done.returncode:
        raise SystemExit(f"{kind} {' '.join(map(str, args))} failed:\n{done.stderr[-3000:]}")
    wall = time.perf_counter() - started
    lines = done.stdout.strip().splitlines()
    result = json.loads(lines[-1])
    if kind == "compare":
        result["document"] = json.loads(lines[-2])
    result["wall"] = wall
    return result


def build_inputs(folder: Path, hidden: int, layers: int, intermediate: int, heads: int, kv_heads: int) -> tuple[Path, Path]:
    """A random fp16 LLaMA (Hugging Face layout, SentencePiece tokenizer) and its Meta layout in two parts."""
    import torch
    from safetensors.torch import save_file
    from transformers import LlamaConfig

    from cnllm.core.merge import write_meta_checkpoint
    from cnllm.core.tiny import asset, build_spm_tokenizer

    tokenizer = build_spm_tokenizer(folder / "tokenizer", texts=[asset("en.txt"), asset("zh.txt")], vocab_size=8000)
    import sentencepiece

    vocab = sentencepiece.SentencePieceProcessor(model_file=str(tokenizer / "tokenizer.model")).get_piece_size()
    generator = torch.Generator().manual_seed(0)

    def rand(*shape):
        return (torch.randn(shape, generator=generator) * 0.02).half()

    base = folder / "base"
    base.mkdir()
    LlamaConfig(
        vocab_size=vocab, hidden_size=hidden, intermediate_size=intermediate, num_hidden_layers=layers, num_attention_heads=heads,
        num_key_value_heads=kv_heads, tie_word_embeddings=False, rms_norm_eps=1e-5, dtype="float16",
    ).save_pretrained(str(base))
    kv = hidden // heads * kv_heads
    shapes = {"self_attn.q_proj": (hidden, hidden), "self_attn.k_proj": (kv, hidden), "self_attn.v_proj": (kv, hidden),
              "self_attn.o_proj": (hidden, hidden), "mlp.gate_proj": (intermediate, hidden), "mlp.up_proj": (intermediate, hidden),
              "mlp.down_proj": (hidden, intermediate)}
    state = {"model.embed_tokens.weight": rand(vocab, hidden), "lm_head.weight": rand(vocab, hidden), "model.norm.weight": torch.ones(hidden).half()}
    for layer in range(layers):
        for module, shape in shapes.items():
            state[f"model.layers.{layer}.{module}.weight"] = rand(*shape)
        state[f"model.layers.{layer}.input_layernorm.weight"] = torch.ones(hidden).half()
        state[f"model.layers.{layer}.post_attention_layernorm.weight"] = torch.ones(hidden).half()
    save_file(state, str(base / "model.safetensors"), metadata={"format": "pt"})
    del state
    meta = folder / "meta"
    meta.mkdir()
    write_meta_checkpoint(base, meta, shards=2)
    shutil.copy2(tokenizer / "tokenizer.model", meta / "tokenizer.model")
    return base, meta


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--hidden", type=int, default=1024)
    parser.add_argument("--layers", type=int, default=16)
    parser.add_argument("--intermediate", type=int, default=2816)
    parser.add_argument("--heads", type=int, default=16)
    parser.add_argument("--kv-heads", type=int, default=4)
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--transformers-python", default=sys.executable, help="A Python whose transformers ships convert_llama_weights_to_hf (≤ 4.46).")
    parser.add_argument("--dir", type=Path, default=None)
    parser.add_argument("--write", type=Path, default=None, help="Write the Markdown results here.")
    parser.add_argument("--child", nargs=argparse.REMAINDER)
    args = parser.parse_args()
    if args.child:
        child(args.child[0], args.child[1:])
        return

    folder = Path(tempfile.mkdtemp(prefix="cnllm-bench-meta-", dir=args.dir))
    try:
        base, meta = build_inputs(folder, args.hidden, args.layers, args.intermediate, args.heads, args.kv_heads)
        meta_bytes = sum(size_of(p) for p in meta.glob("consolidated.*.pth"))
        warm(meta)
        runs: dict[str, list[dict]] = {"cnllm": [], "transformers": []}
        for number in range(args.repeats):
            ours, theirs = folder / f"ours-{number}", folder / f"theirs-{number}"
            runs["cnllm"].append(run_child(sys.executable, "cnllm", "convert-meta", meta, "-o", ours, "--dtype", "bf16"))
            runs["transformers"].append(
                run_child(args.transformers_python, "transformers", "--input_dir", meta, "--num_shards", "2", "--llama_version", "2", "--output_dir", theirs)
            )
            if number:
                shutil.rmtree(ours)
                shutil.rmtree(theirs)
        same = run_child(sys.executable, "compare", folder / "ours-0", folder / "theirs-0", "bfloat16")["document"]
        exact = run_child(sys.executable, "compare", folder / "ours-0", base, "bfloat16")["document"]
        fp16 = folder / "ours-fp16"
        run_child(sys.executable, "cnllm", "convert-meta", meta, "-o", fp16)
        round_trip = run_child(sys.executable, "compare", fp16, base, "float16")["document"]
    finally:
        shutil.rmtree(folder, ignore_errors=True)

    def median(items: list[dict], key: str) -> float:
        return statistics.median(item[key] for item in items)

    def walls(items: list[dict]) -> str:
        return "[" + ", ".join(f"{item['wall']:.1f}" for item in items) + "]"

    ours_rss, theirs_rss = median(runs["cnllm"], "peak_rss"), median(runs["transformers"], "peak_rss")
    ours_time, theirs_time = median(runs["cnllm"], "wall"), median(runs["transformers"], "wall")
    command = " ".join(["bench/bench_meta.py", *sys.argv[1:]])
    lines = [
        "# convert-meta: Meta consolidated.NN.pth → Hugging Face, cnllm vs transformers' conversion script",
        "",
        f"- Date: {dt.datetime.now(dt.timezone.utc).isoformat(timespec='minutes')}; machine: {platform.machine()}, {os.cpu_count()} CPUs, "
        f"{platform.platform()} (shared with other jobs: compare ratios).",
        f"- Command: `.venv/bin/python {command}` (from the repository root).",
        f"- Model: random fp16 LLaMA, {args.layers} layers, hidden {args.hidden}, intermediate {args.intermediate}, {args.heads} heads "
        f"({args.kv_heads} key/value heads), SentencePiece vocabulary of the bundled samples; Meta layout written by merge-lora's "
        f"exporter in 2 model-parallel parts: {mib(meta_bytes)} of consolidated.*.pth.",
        f"- Each run is a separate subprocess (peak RSS = VmHWM; wall time from the parent, imports included), {args.repeats} runs each, "
        "interleaved, inputs in the page cache; medians. Both write bf16 safetensors (the script always saves bf16; cnllm with `--dtype bf16`).",
        "",
        "| Meta → Hugging Face | wall time | runs | peak RSS |",
        "| --- | --- | --- | --- |",
        f"| transformers 4.46 `convert_llama_weights_to_hf --num_shards 2` | {theirs_time:.1f} s | {walls(runs['transformers'])} | "
        f"{mib(theirs_rss)} ({theirs_rss / meta_bytes:.2f}× checkpoint) |",
        f"| cnllm convert-meta | {ours_time:.1f} s | {walls(runs['cnllm'])} | {mib(ours_rss)} ({ours_rss / meta_bytes:.2f}× checkpoint) |",
        f"| **ratio (cnllm / transformers)** | **{ours_time / theirs_time:.2f}×** (target ≤ 1.0×) | | **{ours_rss / theirs_rss:.2f}×** (target ≤ 0.5×) |",
        "",
        f"Outputs compared tensor by tensor: cnllm vs transformers {same['differing']} of {same['tensors']} tensors differ "
        f"({same['unmatched']} unmatched names); cnllm's bf16 output vs the original model rounded to bf16: {exact['differing']} differ; "
        f"cnllm without --dtype (fp16 kept) vs the original fp16 model: {round_trip['differing']} of {round_trip['tensors']} differ "
        "(the round trip through merge-lora's Meta export is exact). cnllm's time includes hashing the inputs for "
        "cnllm-convert-meta.json and writing SHA256SUMS; the script's includes writing every layer to a temporary folder, "
        "loading the whole model back and saving it.",
    ]
    text = "\n".join(lines) + "\n"
    print(text)
    if args.write:
        args.write.write_text(text, encoding="utf-8")


if __name__ == "__main__":
    main()
