"""Peak memory and wall time of `cnllm merge-lora` / `cnllm diff-recover` against the load-everything paths.

Run:  .venv/bin/python bench/bench_merge.py [--hidden 1024 --layers 16 --vocab 32000] [--repeats 2] [--write bench/results/merge.md]

Builds a random fp16 LLaMA (default ≈ 540 MB) and a LoRA adapter (r=8 on every linear layer)
that also carries full embed_tokens/lm_head (modules_to_save), then measures side by side,
each in its own subprocess (peak RSS from getrusage, wall time from the parent), interleaved:
  1. merge: `cnllm merge-lora` vs transformers from_pretrained + PEFT merge_and_unload + save_pretrained;
  2. diff: `cnllm diff-recover` vs loading base and diff whole (safetensors load_file) + add + save_file,
     and a plain copy of the diff file as the disk-speed anchor.
Also prints the merged-vs-unmerged max logit difference (PEFT, fp32) and checks that the
diff round trip is bit-identical. Everything is written under one temporary folder, removed at
the end (--keep to keep it).
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

TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


# --- children (each run measures its own peak RSS) ---------------------------------------------------


def child(kind: str, args: list[str]) -> None:
    started = time.perf_counter()
    if kind == "baseline":
        import safetensors.torch  # noqa: F401
        import torch  # noqa: F401
    elif kind == "cnllm":
        from cnllm.cli.app import main

        try:
            main(args)
        except SystemExit as exc:
            if exc.code:
                raise
    elif kind == "naive-merge":
        import torch
        from peft import PeftModel
        from transformers import AutoModelForCausalLM

        base, adapter, out = args
        model = AutoModelForCausalLM.from_pretrained(base, dtype=torch.float16)
        model = PeftModel.from_pretrained(model, adapter).merge_and_unload()
        model.save_pretrained(out)
    elif kind == "naive-recover":
        from safetensors.torch import load_file, save_file

        base, diff, out = args
        raw, delta = load_file(f"{base}/model.safetensors"), load_file(f"{diff}/model.safetensors")
        save_file({name: (raw[name].float() + value).half() for name, value in delta.items()}, out)
    elif kind == "copy":
        shutil.copyfile(args[0], args[1])
    elif kind == "verify":
        from cnllm.core.merge import verify_merge

        base, adapter, merged = args
        report = verify_merge(Path(base), [Path(adapter)], Path(merged), tolerance=float("inf"))
        print(json.dumps({"max_abs_diff": report.max_abs_diff}))
    elif kind == "compare":
        import torch

        from cnllm.core.tensors import stream_tensors

        left, right, mode = args
        other = dict(stream_tensors(right))
        if mode == "max-diff":
            worst = max(float((t.float() - other[n].float()).abs().max()) for n, t in stream_tensors(left))
            print(json.dumps({"max_abs_diff": worst}))
        else:
            values = signs = 0
            for name, tensor in stream_tensors(left):
                differ = tensor.view(torch.int16) != other[name].view(torch.int16)
                zeros = (tensor == 0) & (other[name] == 0)
                values += int((differ & ~zeros).sum())
                signs += int((differ & zeros).sum())
            print(json.dumps({"values_differing": values, "zero_signs_differing": signs}))
    seconds = time.perf_counter() - started
    print(json.dumps({"peak_rss": peak_rss(), "seconds": seconds}))


def peak_rss() -> int:
    """This process's peak resident set (VmHWM). Not getrusage's ru_maxrss: Linux carries that across
    exec, so a child spawned from the (large) benchmark process would report the parent's peak."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) * 1024
    raise RuntimeError("no VmHWM in /proc/self/status")


def run_child(kind: str, *args) -> dict:
    started = time.perf_counter()
    done = subprocess.run([sys.executable, __file__, "--child", kind, *map(str, args)], capture_output=True, text=True)
    if done.returncode:
        raise SystemExit(f"{kind} {' '.join(map(str, args))} failed:\n{done.stderr[-3000:]}")
    wall = time.perf_counter() - started
    lines = done.stdout.strip().splitlines()
    result = json.loads(lines[-1])
    if lines[:-1] and lines[0].startswith("{"):
        result["document"] = json.loads("\n".join(lines[:-1]))
    result["wall"] = wall
    return result


# --- building the inputs -------------------------------------------------------------------------------


def build_inputs(folder: Path, hidden: int, layers: int, vocab: int, intermediate: int, heads: int) -> tuple[Path, Path]:
    import torch
    from peft import LoraConfig
    from safetensors.torch import save_file
    from transformers import LlamaConfig

    generator = torch.Generator().manual_seed(0)

    def rand(*shape, std=0.02):
        return (torch.randn(shape, generator=generator) * std).half()

    base = folder / "base"
    base.mkdir()
    LlamaConfig(
        vocab_size=vocab, hidden_size=hidden, intermediate_size=intermediate, num_hidden_layers=layers,
        num_attention_heads=heads, num_key_value_heads=heads, tie_word_embeddings=False, dtype="float16",
    ).save_pretrained(str(base))
    shapes = {"self_attn.q_proj": (hidden, hidden), "self_attn.k_proj": (hidden, hidden), "self_attn.v_proj": (hidden, hidden),
              "self_attn.o_proj": (hidden, hidden), "mlp.gate_proj": (intermediate, hidden), "mlp.up_proj": (intermediate, hidden),
              "mlp.down_proj": (hidden, intermediate)}
    state = {"model.embed_tokens.weight": rand(vocab, hidden), "lm_head.weight": rand(vocab, hidden), "model.norm.weight": torch.ones(hidden).half()}
    for layer in range(layers):
        for module, shape in shapes.items():
            state[f"model.layers.{layer}.{module}.weight"] = rand(*shape)
        state[f"model.layers.{layer}.input_layernorm.weight"] = torch.ones(hidden).half()
        state[f"model.layers.{layer}.post_attention_layernorm.weight"] = torch.ones(hidden).half()
    save_file(state, str(base / "model.safetensors"), metadata={"format": "pt"})

    adapter = folder / "adapter"
    adapter.mkdir()
    rank = 8
    weights = {
        "base_model.model.model.embed_tokens.weight": state["model.embed_tokens.weight"] + rand(vocab, hidden, std=0.005),
        "base_model.model.lm_head.weight": state["lm_head.weight"] + rand(vocab, hidden, std=0.005),
    }
    del state
    for layer in range(layers):
        for module, (rows, columns) in shapes.items():
            prefix = f"base_model.model.model.layers.{layer}.{module}"
            weights[f"{prefix}.lora_A.weight"] = rand(rank, columns, std=0.05)
            weights[f"{prefix}.lora_B.weight"] = rand(rows, rank, std=0.05)
    save_file(weights, str(adapter / "adapter_model.safetensors"), metadata={"format": "pt"})
    LoraConfig(
        r=rank, lora_alpha=16, target_modules=list(TARGETS), modules_to_save=["embed_tokens", "lm_head"],
        task_type="CAUSAL_LM", base_model_name_or_path=str(base),
    ).save_pretrained(str(adapter))
    return base, adapter


def warm(*paths: Path) -> None:
    for path in paths:
        for file in sorted(Path(path).rglob("*")) if Path(path).is_dir() else [Path(path)]:
            if file.is_file():
                with open(file, "rb") as handle:
                    while handle.read(16 << 20):
                        pass


def size_of(path: Path) -> int:
    return sum(f.stat().st_size for f in Path(path).rglob("*") if f.is_file()) if Path(path).is_dir() else Path(path).stat().st_size


def mib(count: float) -> str:
    return f"{count / 2**20:,.0f} MiB"


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--hidden", type=int, default=1024)
    parser.add_argument("--layers", type=int, default=16)
    parser.add_argument("--vocab", type=int, default=32000)
    parser.add_argument("--intermediate", type=int, default=2816)
    parser.add_argument("--heads", type=int, default=16)
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--dir", type=Path, default=None)
    parser.add_argument("--keep", action="store_true")
    parser.add_argument("--write", type=Path, default=None, help="Write the Markdown results here.")
    parser.add_argument("--child", nargs=argparse.REMAINDER)
    args = parser.parse_args()
    if args.child:
        child(args.child[0], args.child[1:])
        return

    folder = Path(tempfile.mkdtemp(prefix="cnllm-bench-merge-", dir=args.dir))
    try:
        base, adapter = build_inputs(folder, args.hidden, args.layers, args.vocab, args.intermediate, args.heads)
        model_bytes, adapter_bytes = size_of(base / "model.safetensors"), size_of(adapter / "adapter_model.safetensors")
        largest = args.vocab * args.hidden * 2
        warm(base, adapter)
        baseline = run_child("baseline")
        runs: dict[str, list[dict]] = {"cnllm": [], "naive": []}
        for number in range(args.repeats):
            out = folder / f"ours-{number}"
            runs["cnllm"].append(run_child("cnllm", "merge-lora", "--base", base, "--lora", adapter, "-o", out))
            runs["naive"].append(run_child("naive-merge", base, adapter, folder / f"naive-{number}"))
            if number:
                shutil.rmtree(out)
                shutil.rmtree(folder / f"naive-{number}")
        merged, naive = folder / "ours-0", folder / "naive-0"
        logits = run_child("verify", base, adapter, merged)["document"]["max_abs_diff"]
        versus_naive = run_child("compare", merged, naive, "max-diff")["document"]["max_abs_diff"]
        shutil.rmtree(naive)

        diff_dir = folder / "diff"
        make = run_child("cnllm", "diff-recover", "--make-diff", "--base", base, "--tuned", merged, "-o", diff_dir, "--json")
        warm(base, diff_dir)
        diff_runs: dict[str, list[dict]] = {"cnllm": [], "naive": [], "copy": []}
        diff_bytes = size_of(diff_dir / "model.safetensors")
        for number in range(args.repeats):
            out = folder / f"recovered-{number}"
            diff_runs["cnllm"].append(run_child("cnllm", "diff-recover", "--base", base, "--diff", diff_dir, "-o", out, "--dtype", "fp16"))
            diff_runs["naive"].append(run_child("naive-recover", base, diff_dir, folder / f"naive-recovered-{number}.safetensors"))
            diff_runs["copy"].append(run_child("copy", diff_dir / "model.safetensors", folder / f"copy-{number}.safetensors"))
            (folder / f"naive-recovered-{number}.safetensors").unlink()
            (folder / f"copy-{number}.safetensors").unlink()
            if number:
                shutil.rmtree(out)
        identical = run_child("compare", folder / "recovered-0", merged, "bits")["document"]
    finally:
        if not args.keep:
            shutil.rmtree(folder, ignore_errors=True)

    def median(items: list[dict], key: str) -> float:
        return statistics.median(item[key] for item in items)

    def walls(items: list[dict]) -> str:
        return "[" + ", ".join(f"{item['wall']:.1f}" for item in items) + "]"

    ours_rss, naive_rss = median(runs["cnllm"], "peak_rss"), median(runs["naive"], "peak_rss")
    ours_time, naive_time = median(runs["cnllm"], "wall"), median(runs["naive"], "wall")
    bound = largest + adapter_bytes + baseline["peak_rss"]
    recover_rss, naive_recover_rss = median(diff_runs["cnllm"], "peak_rss"), median(diff_runs["naive"], "peak_rss")
    recover_time, naive_recover_time = median(diff_runs["cnllm"], "wall"), median(diff_runs["naive"], "wall")
    recover_work, naive_recover_work = median(diff_runs["cnllm"], "seconds"), median(diff_runs["naive"], "seconds")
    copy_time = median(diff_runs["copy"], "seconds")
    recover_io = model_bytes + diff_bytes + model_bytes  # read base and diff, write the fp16 model
    command = " ".join(["bench/bench_merge.py", *sys.argv[1:]])
    lines = [
        "# merge-lora and diff-recover: streaming vs load-everything",
        "",
        f"- Date: {dt.datetime.now(dt.timezone.utc).isoformat(timespec='minutes')}; machine: {platform.machine()}, {os.cpu_count()} CPUs, "
        f"{platform.platform()} (shared with other jobs: compare ratios).",
        f"- Command: `.venv/bin/python {command}` (from the repository root).",
        f"- Model: random fp16 LLaMA, {args.layers} layers, hidden {args.hidden}, intermediate {args.intermediate}, vocab {args.vocab:,}: "
        f"{mib(model_bytes)} in one safetensors file. Adapter: LoRA r=8 on all 7 linear layers of every block plus full "
        f"embed_tokens and lm_head (modules_to_save): {mib(adapter_bytes)}.",
        f"- Each run is a separate subprocess (peak RSS = VmHWM; wall time from the parent, imports included), "
        f"{args.repeats} runs each, interleaved, inputs in the page cache; medians.",
        "",
        "| merge | wall time | runs | peak RSS |",
        "| --- | --- | --- | --- |",
        f"| transformers + PEFT merge_and_unload + save_pretrained | {naive_time:.1f} s | {walls(runs['naive'])} | {mib(naive_rss)} ({naive_rss / model_bytes:.2f}× model) |",
        f"| cnllm merge-lora | {ours_time:.1f} s | {walls(runs['cnllm'])} | {mib(ours_rss)} ({ours_rss / model_bytes:.2f}× model) |",
        f"| **ratio (cnllm / naive)** | **{ours_time / naive_time:.2f}×** (target ≤ 1.2×) | | **{ours_rss / naive_rss:.2f}×** |",
        "",
        f"Memory bound from the issue: largest input tensor ({mib(largest)}) + adapter ({mib(adapter_bytes)}) + interpreter/torch "
        f"baseline ({mib(baseline['peak_rss'])}) = {mib(bound)}; measured {mib(ours_rss)} ({'within' if ours_rss <= bound else 'ABOVE'} the bound). "
        f"cnllm's time includes hashing inputs for cnllm-merge.json and writing SHA256SUMS.",
        "",
        f"Merged-vs-unmerged max logit difference (PEFT base+adapter in fp32 vs the fp16 merged output, 1 prompt): {logits:.3g}. "
        f"Max weight difference between cnllm's and PEFT's merged fp16 checkpoints: {versus_naive:.3g}.",
        "",
        "| diff-recover (fp32 diff → fp16 model) | wall time | runs | in-process time | peak RSS | throughput in-process (read + written) |",
        "| --- | --- | --- | --- | --- | --- |",
        f"| load_file both + add + save_file | {naive_recover_time:.1f} s | {walls(diff_runs['naive'])} | {naive_recover_work:.1f} s | {mib(naive_recover_rss)} ({naive_recover_rss / model_bytes:.2f}× model) | {recover_io / naive_recover_work / 2**20:,.0f} MiB/s |",
        f"| cnllm diff-recover | {recover_time:.1f} s | {walls(diff_runs['cnllm'])} | {recover_work:.1f} s | {mib(recover_rss)} ({recover_rss / model_bytes:.2f}× model) | {recover_io / recover_work / 2**20:,.0f} MiB/s |",
        f"| **ratio (cnllm / naive)** | **{recover_time / naive_recover_time:.2f}×** | | {recover_work / naive_recover_work:.2f}× | **{recover_rss / naive_recover_rss:.2f}×** | |",
        f"| disk anchor: copy of the {mib(diff_bytes)} diff file | | {walls(diff_runs['copy'])} | {copy_time:.1f} s | | {2 * diff_bytes / copy_time / 2**20:,.0f} MiB/s |",
        "",
        "In-process time is measured inside the subprocess, without the interpreter's start but with the imports (torch "
        "for both). cnllm's also includes hashing both inputs (1.5 GiB) "
        "for cnllm-diff-recover.json and writing SHA256SUMS, which the anchor does not do. Inputs are in the page cache, so "
        "the copy anchor measures memory bandwidth rather than a disk.",
        "",
        f"`--make-diff` of the merged model: {make['wall']:.1f} s, peak RSS {mib(make['peak_rss'])} (fp32 diff of {mib(diff_bytes)}); "
        f"recovering it with `--dtype fp16` gives the merged checkpoint back with {identical['values_differing']} values differing "
        f"and {identical['zero_signs_differing']} zeros differing in sign only (make-diff reported "
        f"{make['document']['negative_zeros_recovered_as_positive']} negative zeros that addition recovers as +0.0).",
    ]
    text = "\n".join(lines) + "\n"
    print(text)
    if args.write:
        args.write.write_text(text, encoding="utf-8")


if __name__ == "__main__":
    main()
