"""GGUF: `cnllm convert-gguf` vs llama.cpp's reference convert_hf_to_gguf.py, then `cnllm quantize` Q8_0 / Q4_K_M.

Run:  .venv/bin/python bench/bench_gguf.py [--layers 14] [--repeats 2] [--dir /tmp] [--ref-dir DIR] [--write bench/results/gguf.md]

1. Builds a random-weight fp16 LLaMA checkpoint (hidden 1024, GQA 16/4 heads, 32,000-token LLaMA-2 SentencePiece
   tokenizer from ../shared exported with cnllm.core.tokenizers.hf_export; ≈446 MB with 14 layers) in sharded safetensors.
2. Converts it to f16 GGUF with both converters, alternating, each in its own process; wall time (median) and peak
   RSS (max over runs, from wait4) per side. The reference is extracted from the llama-cpp-python sdist on PyPI with
   ../shared/tools/get-llamacpp-ref.sh. Targets: time ≤ 1.0×, memory ≤ 1.0× the reference's.
3. Compares the two files with gguf.GGUFReader: tensor names, shapes, types and bytes; metadata keys and values;
   and whether the files are byte-identical.
4. Llama-3 byte-level BPE: a tiny model with the real 128,256-token Llama-3 tokenizer converted by both (compared
   the same way), then the same tokenizer extended with Chinese tokens: the reference, which recognises the
   pre-tokenizer by hashing sample-text ids, refuses it; cnllm reads the pre-tokenizer definition and converts, and
   llama.cpp then tokenizes Chinese text exactly as the Hugging Face tokenizer does.
5. Quantizes our GGUF to Q8_0 and Q4_K_M (sizes, bits per weight, time) and generates a few tokens from each with
   llama-cpp-python. All big files are deleted at the end.
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
from importlib import metadata
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
SHARED = Path(os.environ.get("CNLLM_SHARED_DIR", REPO.parent / "shared"))
SPM_MODEL = SHARED / "fixtures/tokenizers/llama2-spm/tokenizer.model"
LLAMA3_TOKENIZER = SHARED / "fixtures/tokenizers/llama3-bpe"
CHINESE_TOKENS = ["中文", "模型", "工作", "我想"]  # the last two occur in the reference's hash text
GET_REF = SHARED / "tools/get-llamacpp-ref.sh"


def build_checkpoint(folder: Path, layers: int) -> int:
    """Random N(0, 0.02) fp16 weights for a LlamaForCausalLM, written shard by shard; returns the weight bytes."""
    import torch
    from transformers import LlamaConfig

    from cnllm.core.tensors import ShardWriter
    from cnllm.core.tokenizers.hf_export import write_spm_tokenizer_dir
    from cnllm.core.tokenizers.spm import load_proto

    hidden, inter, heads, kv_heads, vocab = 1024, 2816, 16, 4, 32000
    config = LlamaConfig(
        vocab_size=vocab, hidden_size=hidden, intermediate_size=inter, num_hidden_layers=layers,
        num_attention_heads=heads, num_key_value_heads=kv_heads, max_position_embeddings=4096,
        bos_token_id=1, eos_token_id=2, tie_word_embeddings=False, dtype="float16",
    )
    config.architectures = ["LlamaForCausalLM"]
    config.save_pretrained(folder)
    shutil.copy2(SPM_MODEL, folder / "tokenizer.model")
    write_spm_tokenizer_dir(load_proto(folder / "tokenizer.model"), folder)
    generator = torch.Generator().manual_seed(0)
    kv = hidden // heads * kv_heads

    def weight(*shape: int) -> torch.Tensor:
        return (torch.randn(*shape, generator=generator) * 0.02).half()

    writer = ShardWriter(folder, max_shard_size="200MB")
    writer.add("model.embed_tokens.weight", weight(vocab, hidden))
    for i in range(layers):
        prefix = f"model.layers.{i}."
        writer.add(prefix + "input_layernorm.weight", torch.ones(hidden).half())
        writer.add(prefix + "post_attention_layernorm.weight", torch.ones(hidden).half())
        writer.add(prefix + "self_attn.q_proj.weight", weight(hidden, hidden))
        writer.add(prefix + "self_attn.k_proj.weight", weight(kv, hidden))
        writer.add(prefix + "self_attn.v_proj.weight", weight(kv, hidden))
        writer.add(prefix + "self_attn.o_proj.weight", weight(hidden, hidden))
        writer.add(prefix + "mlp.gate_proj.weight", weight(inter, hidden))
        writer.add(prefix + "mlp.up_proj.weight", weight(inter, hidden))
        writer.add(prefix + "mlp.down_proj.weight", weight(hidden, inter))
    writer.add("model.norm.weight", torch.ones(hidden).half())
    writer.add("lm_head.weight", weight(vocab, hidden))
    writer.close()
    return writer.total_size


def measured(command: list[str], env: dict | None = None) -> tuple[float, int]:
    """Wall seconds and peak RSS (bytes) of one child process."""
    start = time.perf_counter()
    process = subprocess.Popen(command, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    stderr = process.stderr.read()
    _, status, usage = os.wait4(process.pid, 0)
    seconds = time.perf_counter() - start
    process.returncode = os.waitstatus_to_exitcode(status)
    if process.returncode != 0:
        sys.exit(f"{' '.join(command)} failed ({process.returncode}):\n{stderr.decode(errors='replace')[-3000:]}")
    return seconds, usage.ru_maxrss * 1024


def compare(ours: Path, reference: Path) -> dict:
    from gguf import GGUFReader

    a, b = GGUFReader(ours), GGUFReader(reference)
    fa = {f.name: f.contents() for f in a.fields.values() if not f.name.startswith("GGUF.")}
    fb = {f.name: f.contents() for f in b.fields.values() if not f.name.startswith("GGUF.")}
    ta = {t.name: t for t in a.tensors}
    tb = {t.name: t for t in b.tensors}
    mismatched = [
        n for n in ta.keys() & tb.keys()
        if ta[n].tensor_type != tb[n].tensor_type or list(ta[n].shape) != list(tb[n].shape) or ta[n].data.tobytes() != tb[n].data.tobytes()
    ]
    return {
        "tensors": len(ta),
        "same_tensor_names": ta.keys() == tb.keys(),
        "tensor_mismatches": sorted(mismatched),
        "metadata_only_ours": sorted(fa.keys() - fb.keys()),
        "metadata_only_reference": sorted(fb.keys() - fa.keys()),
        "metadata_value_differences": sorted(k for k in fa.keys() & fb.keys() if fa[k] != fb[k]),
        "byte_identical": ours.stat().st_size == reference.stat().st_size and _same_bytes(ours, reference),
    }


def _same_bytes(a: Path, b: Path) -> bool:
    with open(a, "rb") as fa, open(b, "rb") as fb:
        while True:
            x, y = fa.read(16 << 20), fb.read(16 << 20)
            if x != y:
                return False
            if not x:
                return True


def llama3_check(folder: Path, ref_cmd_prefix: list[str], ref_env: dict) -> dict:
    """Tiny models with the real Llama-3 tokenizer, plain and extended with Chinese tokens (see the module docstring)."""
    from tokenizers import Tokenizer
    from transformers import AutoTokenizer

    from cnllm.core.gguf.convert import ConvertOptions, convert_to_gguf
    from cnllm.core.llama_loader import open_llama
    from cnllm.core.tiny import build_tiny_llama

    plain_tok, extended_tok = folder / "llama3-tok", folder / "llama3-zh-tok"
    for target in (plain_tok, extended_tok):
        target.mkdir()
        for item in LLAMA3_TOKENIZER.glob("tokenizer*.json"):
            shutil.copy2(item, target / item.name)
    tokenizer = Tokenizer.from_file(str(extended_tok / "tokenizer.json"))
    tokenizer.add_tokens(CHINESE_TOKENS)
    tokenizer.save(str(extended_tok / "tokenizer.json"))
    result = {}
    for name, tok_dir in (("plain", plain_tok), ("extended", extended_tok)):
        model = build_tiny_llama(folder / f"llama3-{name}", tok_dir)
        ours = convert_to_gguf(model, folder / f"llama3-{name}.gguf", ConvertOptions(outtype="f16")).output
        ref_out = folder / f"llama3-{name}-ref.gguf"
        ref = subprocess.run([*ref_cmd_prefix, str(model), "--outfile", str(ref_out), "--outtype", "f16"], env=ref_env, capture_output=True, text=True)
        entry = {"vocab": len(AutoTokenizer.from_pretrained(str(model))), "reference_exit_code": ref.returncode}
        if ref.returncode == 0:
            entry["parity"] = compare(ours, ref_out)
        else:
            entry["reference_error"] = next((line for line in reversed(ref.stderr.splitlines()) if "Error" in line), ref.stderr[-200:])
        hf = AutoTokenizer.from_pretrained(str(model))
        llm = open_llama(ours, vocab_only=True, verbose=False)
        text = "我想在大语言模型的中文能力上工作 and English text, 2024年"
        entry["llama_cpp_tokenizes_like_hf"] = llm.tokenize(text.encode(), add_bos=False, special=False) == hf(text, add_special_tokens=False)["input_ids"]
        llm.close()
        result[name] = entry
    return result


def generate(path: Path) -> str:
    from cnllm.core.llama_loader import open_llama

    llm = open_llama(path, n_ctx=128, verbose=False)
    try:
        return llm("The capital of China is", max_tokens=8, temperature=0.0)["choices"][0]["text"]
    finally:
        llm.close()


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--layers", type=int, default=14)
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--dir", type=Path, default=None, help="where the temporary model and GGUFs go")
    parser.add_argument("--ref-dir", type=Path, default=None, help="an existing get-llamacpp-ref.sh output")
    parser.add_argument("--write", type=Path, default=None, help="write the markdown report here")
    parser.add_argument("--build-only", type=Path, default=None, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.build_only:
        # In a child process, so the measuring parent stays small: ru_maxrss survives fork + exec.
        print(build_checkpoint(args.build_only, args.layers))
        return
    if not SPM_MODEL.exists() or not GET_REF.exists():
        sys.exit(f"needs the shared fixtures and tools ({SHARED})")

    folder = Path(tempfile.mkdtemp(prefix="cnllm-bench-gguf-", dir=args.dir))
    try:
        ref_dir = args.ref_dir or folder / "llamacpp-ref"
        if not (ref_dir / "convert_hf_to_gguf.py").exists():
            subprocess.run(["bash", str(GET_REF), str(ref_dir)], check=True, stdout=subprocess.DEVNULL)
        model = folder / "model"
        model.mkdir()
        build = [sys.executable, __file__, "--build-only", str(model), "--layers", str(args.layers)]
        weight_bytes = int(subprocess.run(build, check=True, capture_output=True, text=True).stdout.split()[-1])
        print(f"checkpoint: {weight_bytes / 1e6:.0f} MB fp16 in {model}", file=sys.stderr)

        ref_env = {**os.environ, "PYTHONPATH": str(ref_dir / "gguf-py")}
        ref_cmd = [sys.executable, str(ref_dir / "convert_hf_to_gguf.py"), str(model), "--outfile", str(folder / "ref.gguf"), "--outtype", "f16"]
        our_cmd = [sys.executable, "-m", "cnllm", "convert-gguf", str(model), "-o", str(folder / "ours.gguf"), "--outtype", "f16", "--force"]
        runs: dict[str, list[tuple[float, int]]] = {"reference": [], "cnllm": []}
        for _ in range(args.repeats):
            (folder / "ref.gguf").unlink(missing_ok=True)
            runs["reference"].append(measured(ref_cmd, ref_env))
            runs["cnllm"].append(measured(our_cmd))
        convert = {
            side: {"seconds": statistics.median(s for s, _ in r), "peak_rss": max(m for _, m in r), "all_seconds": [round(s, 2) for s, _ in r]}
            for side, r in runs.items()
        }
        parity = compare(folder / "ours.gguf", folder / "ref.gguf")
        (folder / "ref.gguf").unlink()
        llama3 = llama3_check(folder, ref_cmd[:2], ref_env)

        from cnllm.core.gguf.quantize import QuantizeOptions, quantize_gguf

        quant = {}
        for quant_type in ("Q8_0", "Q4_K_M"):
            result = quantize_gguf(folder / "ours.gguf", folder / f"{quant_type}.gguf", QuantizeOptions(type=quant_type))
            quant[quant_type] = {
                "input_mb": result.input_size / 1e6,
                "output_mb": result.output_size / 1e6,
                "ratio": result.ratio,
                "bits_per_weight": result.bits_per_weight,
                "seconds": result.seconds,
                "fallbacks": result.fallbacks,
                "generated": generate(result.output),
            }
            result.output.unlink()
        report = {
            "date": dt.datetime.now(dt.timezone.utc).isoformat(timespec="minutes"),
            "machine": f"{platform.machine()}, {os.cpu_count()} CPUs, {platform.platform()}",
            "versions": {name: metadata.version(name) for name in ("gguf", "llama_cpp_python", "torch", "safetensors")},
            "checkpoint_mb": weight_bytes / 1e6,
            "layers": args.layers,
            "convert": convert,
            "time_ratio": convert["cnllm"]["seconds"] / convert["reference"]["seconds"],
            "memory_ratio": convert["cnllm"]["peak_rss"] / convert["reference"]["peak_rss"],
            "parity": parity,
            "llama3_bpe": llama3,
            "quantize": quant,
        }
    finally:
        shutil.rmtree(folder, ignore_errors=True)
    print(json.dumps(report, indent=2, ensure_ascii=False))
    if args.write:
        args.write.write_text(markdown(report, " ".join(sys.argv)), encoding="utf-8")


def markdown(r: dict, command: str) -> str:
    c, p = r["convert"], r["parity"]
    lines = [
        "# GGUF: convert-gguf vs llama.cpp's convert_hf_to_gguf.py, quantize",
        "",
        f"- Date: {r['date']}; machine: {r['machine']} (shared with other jobs: compare ratios).",
        f"- Command: `.venv/bin/python {command}` (from the repository root).",
        f"- Reference: `convert_hf_to_gguf.py` + its `gguf-py` from the llama-cpp-python {r['versions']['llama_cpp_python']} sdist "
        f"(../shared/tools/get-llamacpp-ref.sh); cnllm uses gguf {r['versions']['gguf']}, torch {r['versions']['torch']}, "
        f"safetensors {r['versions']['safetensors']}; quantize runs llama.cpp from llama-cpp-python {r['versions']['llama_cpp_python']}.",
        f"- Checkpoint: random fp16 LLaMA, {r['layers']} layers, hidden 1024, 16 heads / 4 KV heads, 32,000-token LLaMA-2 "
        f"SentencePiece tokenizer; {r['checkpoint_mb']:.0f} MB of weights in 200 MB safetensors shards. Output: f16 GGUF.",
        "",
        "| converter | wall time (median) | runs | peak RSS |",
        "| --- | --- | --- | --- |",
        f"| llama.cpp convert_hf_to_gguf.py | {c['reference']['seconds']:.1f} s | {c['reference']['all_seconds']} | {c['reference']['peak_rss'] / 2**20:.0f} MiB |",
        f"| cnllm convert-gguf | {c['cnllm']['seconds']:.1f} s | {c['cnllm']['all_seconds']} | {c['cnllm']['peak_rss'] / 2**20:.0f} MiB |",
        f"| **ratio (cnllm / reference)** | **{r['time_ratio']:.2f}×** (target ≤ 1.0×) | | **{r['memory_ratio']:.2f}×** (target ≤ 1.0×) |",
        "",
        f"Parity ({p['tensors']} tensors, compared with gguf.GGUFReader): same tensor names: {p['same_tensor_names']}; "
        f"tensors differing in shape, type or bytes: {len(p['tensor_mismatches'])}; metadata keys only in ours: "
        f"{p['metadata_only_ours'] or 'none'}; only in the reference: {p['metadata_only_reference'] or 'none'}; "
        f"keys with different values: {p['metadata_value_differences'] or 'none'}; files byte-identical: {p['byte_identical']}.",
        "",
        "Llama-3 byte-level BPE (tiny random model, real tokenizer):",
        "",
        "| tokenizer | vocab | reference converter | cnllm vs reference | llama.cpp tokenizes like HF (on cnllm's GGUF) |",
        "| --- | --- | --- | --- | --- |",
    ]
    for name, entry in r["llama3_bpe"].items():
        label = "Llama-3" if name == "plain" else f"Llama-3 + {len(CHINESE_TOKENS)} Chinese tokens"
        if entry["reference_exit_code"] == 0:
            q = entry["parity"]
            outcome, versus = "converts", f"byte-identical: {q['byte_identical']}, differing tensors: {len(q['tensor_mismatches'])}"
        else:
            outcome, versus = f"fails: `{entry['reference_error']}`", "cnllm converts"
        lines.append(f"| {label} | {entry['vocab']:,} | {outcome} | {versus} | {entry['llama_cpp_tokenizes_like_hf']} |")
    lines += [
        "",
        "| quantize (llama.cpp's quantizer) | input | output | ratio | bits/weight | time | fallback tensors | generates |",
        "| --- | --- | --- | --- | --- | --- | --- | --- |",
    ]
    for name, q in r["quantize"].items():
        lines.append(
            f"| {name} | {q['input_mb']:.0f} MB | {q['output_mb']:.0f} MB | {q['ratio']:.2f}× | {q['bits_per_weight']:.2f} | "
            f"{q['seconds']:.1f} s | {q['fallbacks']} | {json.dumps(q['generated'], ensure_ascii=False)} |"
        )
    lines += [
        "",
        "Random weights generate noise; the point is that llama.cpp loads and runs both files. Compare quantization quality",
        "on a real model with `cnllm eval ppl`.",
        "",
    ]
    return "\n".join(lines)


if __name__ == "__main__":
    main()
