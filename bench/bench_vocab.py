"""Vocabulary figures: the published Chinese-LLaMA merge, its compression, a Llama-3 extension, merge speed.

Run:  .venv/bin/python bench/bench_vocab.py [--shared ../shared] [--out bench/results/vocab.md]
Needs the reference fixtures in ../shared/fixtures (tokenizers + corpus). Side by side in one run:
  1. merge chinese_sp.model (20k) into LLaMA-2's tokenizer.model (32k): pieces (target 49,953), time of
     `cnllm vocab merge` vs the anchor — Chinese-LLaMA's published merge script (protobuf append, score 0)
     re-run inline — (target < 2 s), piece lists compared;
  2. Chinese characters per token on cnllm/assets/zh_heldout.txt: merged vs LLaMA-2 (target ≥ 1.8×), with
     the published Chinese-LLaMA-2 tokenizer as a reference;
  3. tokenizer.json vs sentencepiece agreement on Chinese/English/mixed lines: default ranked scores vs
     --scores zero (the published scores);
  4. Llama-3 extended with a vocabulary trained on zh-classical.txt (every 20th line held out): characters
     per token on the held-out lines, English (cnllm/assets/en.txt) and llama.cpp vectors unchanged.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from cnllm.core.tiny import asset  # noqa: E402
from cnllm.core.tokenizers.inspect import inspect_tokenizer  # noqa: E402
from cnllm.core.tokenizers.merge import MergeVocabOptions, merge_vocab  # noqa: E402
from cnllm.core.tokenizers.spm import model_proto_class  # noqa: E402
from cnllm.core.tokenizers.train import TrainVocabOptions, train_vocab  # noqa: E402


def published_merge(base_path: Path, add_path: Path, out: Path) -> None:
    """The anchor: Chinese-LLaMA's merge_tokenizers.py (every missing piece appended with score 0)."""
    base = model_proto_class()()
    base.ParseFromString(base_path.read_bytes())
    add = model_proto_class()()
    add.ParseFromString(add_path.read_bytes())
    existing = {p.piece for p in base.pieces}
    for piece in add.pieces:
        if piece.piece not in existing:
            base.pieces.add(piece=piece.piece, score=0)
    out.write_bytes(base.SerializeToString())


def median_time(function, repeats: int, clock=time.perf_counter) -> float:
    """Median wall time (or, with ``clock=time.process_time``, CPU time: steadier on a shared machine)."""
    times = []
    for _ in range(repeats):
        start = clock()
        function()
        times.append(clock() - start)
    return statistics.median(times)


def disagreements(directory: Path, texts: list[str]) -> int:
    import sentencepiece as spm
    from tokenizers import Tokenizer

    processor = spm.SentencePieceProcessor(model_file=str(directory / "tokenizer.model"))
    fast = Tokenizer.from_file(str(directory / "tokenizer.json"))
    return sum(processor.encode(t) != fast.encode(t, add_special_tokens=False).ids for t in texts)


def read_vectors(folder: Path) -> list[tuple[str, list[int]]]:
    inputs = (folder / "vectors.inp").read_text(encoding="utf-8").split("\n__ggml_vocab_test__\n")
    if inputs and inputs[-1] == "":
        inputs.pop()
    outputs = (folder / "vectors.out").read_text(encoding="utf-8").split("\n")[: len(inputs)]
    return [(text, [int(t) for t in ids.split()]) for text, ids in zip(inputs, outputs)]


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--shared", type=Path, default=REPO.parent / "shared")
    parser.add_argument("--out", type=Path, default=REPO / "bench" / "results" / "vocab.md")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--llama3-vocab-size", type=int, default=16000)
    args = parser.parse_args()
    tokenizers = args.shared / "fixtures" / "tokenizers"
    corpus = args.shared / "fixtures" / "corpus" / "zh-classical.txt"
    base_model = tokenizers / "llama2-spm" / "tokenizer.model"
    add_model = tokenizers / "chinese-llama-sp" / "chinese_sp.model"
    work = Path(tempfile.mkdtemp(prefix="cnllm-bench-vocab-"))
    figures: dict = {}

    # 1. The published merge, timed against the anchor script.
    ranked_dir, zero_dir = work / "ranked", work / "zero"
    result = merge_vocab(base_model, [add_model], ranked_dir)
    merge_vocab(base_model, [add_model], zero_dir, MergeVocabOptions(scores="zero"))
    timed_merge = lambda: merge_vocab(base_model, [add_model], work / "timed", force=True)  # noqa: E731
    core_seconds = median_time(timed_merge, args.repeats)
    core_cpu_seconds = median_time(timed_merge, args.repeats, clock=time.process_time)
    cli = [sys.executable, "-m", "cnllm", "vocab", "merge", "--base", str(base_model), "--add", str(add_model), "-o", str(work / "cli"), "--force"]
    cli_seconds = median_time(lambda: subprocess.run(cli, check=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL), args.repeats)
    anchor_seconds = median_time(lambda: published_merge(base_model, add_model, work / "anchor.model"), args.repeats)
    identical = (zero_dir / "tokenizer.model").read_bytes() == (work / "anchor.model").read_bytes()
    figures["published_merge"] = {
        "pieces": result.final_size,
        "added": result.added,
        "unproducible": result.unproducible,
        "zero_scores_identical_to_anchor": identical,
        "seconds_core": round(core_seconds, 3),
        "cpu_seconds_core": round(core_cpu_seconds, 3),
        "seconds_cli": round(cli_seconds, 3),
        "seconds_anchor_script": round(anchor_seconds, 3),
    }

    # 2. Compression on held-out modern Chinese.
    heldout = asset("zh_heldout.txt")
    llama2 = inspect_tokenizer(base_model, heldout).text
    merged = inspect_tokenizer(ranked_dir, heldout).text
    reference = inspect_tokenizer(tokenizers / "chinese-llama-2" / "tokenizer.model", heldout).text
    figures["zh_heldout"] = {
        "llama2_cjk_per_token": round(llama2.cjk_per_token, 4),
        "merged_cjk_per_token": round(merged.cjk_per_token, 4),
        "chinese_llama2_reference_cjk_per_token": round(reference.cjk_per_token, 4),
        "ratio_vs_llama2": round(merged.cjk_per_token / llama2.cjk_per_token, 3),
        "tokens_llama2": llama2.tokens,
        "tokens_merged": merged.tokens,
    }

    # 3. tokenizer.json vs sentencepiece.
    texts: list[str] = []
    for name in ("zh.txt", "zh_heldout.txt", "en.txt"):
        texts += asset(name).read_text(encoding="utf-8").splitlines()
    if corpus.exists():
        texts += corpus.read_text(encoding="utf-8").splitlines()[:2000]
    figures["hf_vs_sentencepiece"] = {
        "texts": len(texts),
        "ranked_disagree": disagreements(ranked_dir, texts),
        "zero_disagree": disagreements(zero_dir, texts),
    }

    # 4. Llama-3 extended with a classical-Chinese vocabulary.
    lines = corpus.read_text(encoding="utf-8").splitlines()
    (work / "train.txt").write_text("\n".join(line for i, line in enumerate(lines, 1) if i % 20) + "\n", encoding="utf-8")
    (work / "held.txt").write_text("\n".join(line for i, line in enumerate(lines, 1) if i % 20 == 0) + "\n", encoding="utf-8")
    started = time.perf_counter()
    trained = train_vocab([work / "train.txt"], work / "classical.model", TrainVocabOptions(vocab_size=args.llama3_vocab_size, threads=os.cpu_count() or 1))
    train_seconds = time.perf_counter() - started
    llama3_dir = tokenizers / "llama3-bpe"
    started = time.perf_counter()
    extension = merge_vocab(llama3_dir, [trained.output], work / "llama3-zh")
    extend_seconds = time.perf_counter() - started
    from tokenizers import Tokenizer

    base3 = Tokenizer.from_file(str(llama3_dir / "tokenizer.json"))
    ext3 = Tokenizer.from_file(str(work / "llama3-zh" / "tokenizer.json"))
    base_held = inspect_tokenizer(llama3_dir, work / "held.txt").text
    ext_held = inspect_tokenizer(work / "llama3-zh", work / "held.txt").text
    english = asset("en.txt").read_text(encoding="utf-8").splitlines()
    vectors = read_vectors(llama3_dir)
    figures["llama3_classical"] = {
        "trained_pieces": trained.pieces,
        "train_seconds": round(train_seconds, 2),
        "added": extension.added,
        "already_present": extension.already_present,
        "skipped_multi_pretoken": extension.skipped,
        "unreachable": extension.unreachable,
        "final_size": extension.final_size,
        "extend_seconds": round(extend_seconds, 2),
        "heldout_lines": base_held.lines,
        "base_chars_per_token": round(base_held.chars_per_token, 4),
        "extended_chars_per_token": round(ext_held.chars_per_token, 4),
        "improvement": round(ext_held.chars_per_token / base_held.chars_per_token, 3),
        "extended_roundtrip_failures": ext_held.roundtrip_failures,
        "english_lines_changed": sum(base3.encode(t).ids != ext3.encode(t).ids for t in english),
        "english_lines": len(english),
        "vectors_changed": sum(ext3.encode(t, add_special_tokens=False).ids != ids for t, ids in vectors),
        "vectors": len(vectors),
    }
    write_report(args.out, figures, args)
    print(json.dumps(figures, indent=2, ensure_ascii=False))


def write_report(path: Path, f: dict, args) -> None:
    p, z, h, l3 = f["published_merge"], f["zh_heldout"], f["hf_vs_sentencepiece"], f["llama3_classical"]
    cpu = platform.processor() or platform.machine()
    try:
        cpu = next(line.split(":", 1)[1].strip() for line in open("/proc/cpuinfo") if line.startswith("model name"))
    except (OSError, StopIteration):
        pass
    text = f"""# `cnllm vocab` figures

Machine: {cpu}, {os.cpu_count()} CPUs (shared with other jobs; load average {os.getloadavg()[0]:.1f} at the end), Python {platform.python_version()}, {platform.system()}.
Date: {datetime.datetime.now(datetime.timezone.utc):%Y-%m-%d %H:%M} UTC.
Command: `.venv/bin/python bench/bench_vocab.py --repeats {args.repeats} --llama3-vocab-size {args.llama3_vocab_size}`

| figure | target | measured |
| --- | --- | --- |
| pieces after merging chinese_sp.model (20k) into LLaMA-2 (32k) | 49,953 | {p['pieces']:,} ({p['added']:,} added; {p['unproducible']} of them no text can produce — unigram pieces with no split into two pieces, kept as the published method keeps them) |
| `--scores zero` tokenizer.model vs the published script's output | byte-identical | {'byte-identical' if p['zero_scores_identical_to_anchor'] else 'DIFFERENT'} |
| merge time, in-process (read, merge, write tokenizer.model + tokenizer.json + record) | < 2 s | {p['seconds_core']} s wall, {p['cpu_seconds_core']} s CPU (anchor script, tokenizer.model only: {p['seconds_anchor_script']} s) |
| merge time, `cnllm vocab merge` end to end (process start included) | — | {p['seconds_cli']} s |
| Chinese chars/token on zh_heldout.txt: merged vs LLaMA-2 | ≥ 1.8× | {z['merged_cjk_per_token']} vs {z['llama2_cjk_per_token']} = **{z['ratio_vs_llama2']}×** (tokens {z['tokens_merged']:,} vs {z['tokens_llama2']:,}); Chinese-LLaMA-2's published tokenizer: {z['chinese_llama2_reference_cjk_per_token']} |
| tokenizer.json ≠ sentencepiece, default ranked scores | 0 | {h['ranked_disagree']} of {h['texts']:,} texts |
| tokenizer.json ≠ sentencepiece, `--scores zero` (published scores) | (why ranked is the default) | {h['zero_disagree']} of {h['texts']:,} texts |
| Llama-3 + {l3['trained_pieces']:,}-piece classical vocab: chars/token on {l3['heldout_lines']} held-out classical lines | improves | {l3['base_chars_per_token']} → {l3['extended_chars_per_token']} (**{l3['improvement']}×**), round-trip failures {l3['extended_roundtrip_failures']} |
| Llama-3 extension: tokens added / already present / skipped (SentencePiece byte and control pieces, or pieces spanning pre-tokens) / unreachable | — | {l3['added']:,} / {l3['already_present']:,} / {l3['skipped_multi_pretoken']:,} / {l3['unreachable']} → {l3['final_size']:,} ids |
| Llama-3 extension: English lines (en.txt) whose encoding changed | 0 | {l3['english_lines_changed']} of {l3['english_lines']} |
| Llama-3 extension: llama.cpp vectors whose encoding changed | 0 | {l3['vectors_changed']} of {l3['vectors']} |
| training the classical vocab / extending Llama-3 | — | {l3['train_seconds']} s / {l3['extend_seconds']} s |

Notes: "Chinese chars/token" = CJK characters in the text ÷ tokens for the whole text (sentencepiece
encoding). The Llama-3 path derives each new token's merges from how the tokenizer built so far splits
it (merges ranked after all of Llama-3's, each producing a token Llama-3 lacks), so base merges run first
and text without new tokens encodes as before.
"""
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text, encoding="utf-8")


if __name__ == "__main__":
    main()
