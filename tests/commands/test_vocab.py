"""``cnllm vocab train / merge / inspect`` end to end, and every bad input of the issue."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest

from cnllm.core.provenance import read_file_record


def leftovers(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.iterdir() if ".cnllm-tmp-" in p.name)


def one_error_line(result) -> str:
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert len(lines) == 1, result.stderr
    assert "Traceback" not in result.stderr
    return lines[0]


def test_train_merge_inspect(cli, tmp_path, assets, spm_tokenizer_dir):
    model = tmp_path / "zh.model"
    result = cli("vocab", "train", assets / "zh.txt", "-o", model, "--vocab-size", "2000", "--json")
    assert result.exit_code == 0, result.stderr
    trained = json.loads(result.stdout)
    assert trained["pieces"] == 2000 and trained["corpus"]["lines"] == 144 and model.is_file()
    record = read_file_record(model)
    assert record["cnllm_record"] == "vocab-train" and record["results"] == trained and record["options"]["vocab_size"] == 2000

    out = tmp_path / "merged"
    result = cli("vocab", "merge", "--base", spm_tokenizer_dir, "--add", model, "-o", out, "--pad-to-multiple-of", "64", "--add-pad-token", "--json")
    assert result.exit_code == 0, result.stderr
    merged = json.loads(result.stdout)
    assert merged["base_size"] == 1000 and merged["final_size"] % 64 == 0 and merged["pad_token_id"] == 1000
    assert merged["added"] > 1000 and merged["family"] == "spm"
    names = {p.name for p in out.iterdir()}
    assert {"tokenizer.model", "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "cnllm-vocab.json"} <= names
    record = json.loads((out / "cnllm-vocab.json").read_text(encoding="utf-8"))
    assert record["results"]["final_size"] == merged["final_size"] and record["options"]["add_pad_token"] is True
    assert leftovers(tmp_path) == []

    result = cli("vocab", "inspect", out, "--text", assets / "zh_heldout.txt", "--compare", spm_tokenizer_dir, "--json")
    assert result.exit_code == 0, result.stderr
    inspected = json.loads(result.stdout)
    merged_stats, base_stats = (t["text"] for t in inspected["tokenizers"])
    assert inspected["tokenizers"][0]["vocab_size"] == merged["final_size"]
    assert inspected["token_ratio"] < 0.5 and merged_stats["cjk_chars_per_token"] > 2 * base_stats["cjk_chars_per_token"]

    result = cli("vocab", "inspect", out, "--text", assets / "zh_heldout.txt", "--compare", spm_tokenizer_dir)
    assert result.exit_code == 0 and "× the tokens of" in result.stdout and "round trip" in result.stdout


def test_merge_human_output_and_zero_scores_warning(cli, tmp_path, spm_tokenizer_dir, assets):
    words = tmp_path / "words.txt"
    words.write_text("xyzzyplugh\nfoobarbazqux\n", encoding="utf-8")
    result = cli("vocab", "merge", "--base", spm_tokenizer_dir, "--add", words, "-o", tmp_path / "out", "--scores", "zero")
    assert result.exit_code == 0, result.stderr
    assert "1000 → 1002 tokens, 2 added" in result.stdout
    assert "--scores zero" in result.stderr


def test_bpe_base(cli, tmp_path, bpe_tokenizer_dir, assets):
    words = tmp_path / "words.txt"
    words.write_text("天气预报\n语言模型\n", encoding="utf-8")
    result = cli("vocab", "merge", "--base", bpe_tokenizer_dir, "--add", words, "-o", tmp_path / "out", "--json")
    assert result.exit_code == 0, result.stderr
    document = json.loads(result.stdout)
    assert document["family"] == "bpe" and document["added"] >= 2 and document["unreachable"] == 0


def test_base_already_containing_all(cli, tmp_path, spm_tokenizer_dir):
    out = tmp_path / "out"
    result = cli("vocab", "merge", "--base", spm_tokenizer_dir, "--add", spm_tokenizer_dir / "tokenizer.model", "-o", out, "--json")
    assert result.exit_code == 0, result.stderr
    assert json.loads(result.stdout)["added"] == 0
    from transformers import AutoTokenizer

    assert len(AutoTokenizer.from_pretrained(str(out))) == 1000


@pytest.mark.parametrize(
    "make, role, message",
    [
        (lambda p: p.write_bytes(b"GGUF\x03\x00\x00\x00" + bytes(128)), "base", "is a GGUF model file"),
        (lambda p: p.write_bytes(bytes(range(256)) * 4), "base", "is not a tokenizer"),
        (lambda p: p.write_bytes(bytes(range(256)) * 4), "add", "is not a tokenizer"),
    ],
)
def test_not_a_tokenizer(cli, tmp_path, spm_tokenizer_dir, make, role, message):
    bad = tmp_path / "bad.bin"
    make(bad)
    base, add = (bad, spm_tokenizer_dir / "tokenizer.model") if role == "base" else (spm_tokenizer_dir, bad)
    result = cli("vocab", "merge", "--base", base, "--add", add, "-o", tmp_path / "out")
    assert result.exit_code == 2
    assert message in one_error_line(result)
    assert not (tmp_path / "out").exists() and leftovers(tmp_path) == []


def test_bpe_into_spm_refused(cli, tmp_path, spm_tokenizer_dir, bpe_tokenizer_dir):
    result = cli("vocab", "merge", "--base", spm_tokenizer_dir, "--add", bpe_tokenizer_dir / "tokenizer.json", "-o", tmp_path / "out")
    assert result.exit_code == 2
    assert "cannot be merged into the SentencePiece base" in one_error_line(result)
    assert not (tmp_path / "out").exists()


def test_output_exists_without_force(cli, tmp_path, spm_tokenizer_dir, assets):
    words = tmp_path / "words.txt"
    words.write_text("天气预报\n", encoding="utf-8")
    out = tmp_path / "out"
    out.mkdir()
    (out / "mine.txt").write_text("keep")
    result = cli("vocab", "merge", "--base", spm_tokenizer_dir, "--add", words, "-o", out)
    assert result.exit_code == 2 and "--force" in one_error_line(result)
    assert [p.name for p in out.iterdir()] == ["mine.txt"]
    result = cli("vocab", "merge", "--base", spm_tokenizer_dir, "--add", words, "-o", out, "--force")
    assert result.exit_code == 0 and (out / "tokenizer.json").is_file() and not (out / "mine.txt").exists()


def test_train_empty_corpus_and_existing_output(cli, tmp_path):
    empty = tmp_path / "empty.txt"
    empty.write_text("\n\n", encoding="utf-8")
    result = cli("vocab", "train", empty, "-o", tmp_path / "zh.model")
    assert result.exit_code == 2 and "no text lines" in one_error_line(result)
    assert not (tmp_path / "zh.model").exists() and leftovers(tmp_path) == []
    result = cli("vocab", "train", tmp_path / "missing.txt", "-o", tmp_path / "zh.model")
    assert result.exit_code == 2 and "does not exist" in one_error_line(result)
    result = cli("vocab", "train", empty, "-o", empty)
    assert result.exit_code == 2 and "is the input" in one_error_line(result)
    (tmp_path / "zh.model").write_text("earlier output\n")
    result = cli("vocab", "train", empty, "-o", tmp_path / "zh.model")
    assert result.exit_code == 2 and "already exists" in one_error_line(result)


def test_train_reports_invalid_utf8(cli, tmp_path, assets):
    corpus = tmp_path / "corpus.txt"
    corpus.write_bytes((assets / "zh.txt").read_bytes() + b"\xc3\x28 bad\n")
    result = cli("vocab", "train", corpus, "-o", tmp_path / "zh.model", "--vocab-size", "2000")
    assert result.exit_code == 0, result.stderr
    assert "skipped 1 lines that are not valid UTF-8" in result.stderr
    assert "2000 pieces" in result.stdout


def test_inspect_bad_input(cli, tmp_path):
    bad = tmp_path / "model.gguf"
    bad.write_bytes(b"GGUF" + bytes(32))
    result = cli("vocab", "inspect", bad)
    assert result.exit_code == 2 and "GGUF" in one_error_line(result)


def test_train_vocab_too_small_names_the_smallest_that_fits(cli, tmp_path):
    import re

    corpus = tmp_path / "chars.txt"
    corpus.write_text("\n".join("".join(chr(0x4E00 + (7 * i + j) % 600) for j in range(40)) for i in range(400)) + "\n", encoding="utf-8")
    out = tmp_path / "zh.model"
    result = cli("vocab", "train", corpus, "--vocab-size", "300", "--character-coverage", "1.0", "-o", out)
    assert result.exit_code == 2 and len(result.stderr.strip().splitlines()) == 1
    assert "--vocab-size 300 is too small for this corpus: at --character-coverage 1" in result.stderr
    assert "INTERNAL" not in result.stderr and not list(tmp_path.glob("zh.model*"))
    smallest = re.search(r"pass --vocab-size (\d+) or more", result.stderr).group(1)
    assert cli("vocab", "train", corpus, "--vocab-size", smallest, "--character-coverage", "1.0", "-o", out).exit_code == 0


def test_train_vocab_refuses_a_coverage_sentencepiece_refuses(cli, tmp_path, assets):
    """SentencePiece accepts --character-coverage 0.98..1 only: below, one line before it runs, in the CLI and in a recipe."""
    from cnllm.core.errors import UsageError
    from cnllm.core.tokenizers.train import TrainVocabOptions

    result = cli("vocab", "train", assets / "zh.txt", "--vocab-size", "800", "--character-coverage", "0.8", "-o", tmp_path / "zh.model")
    assert result.exit_code == 2 and "--character-coverage" in one_error_line(result) and not list(tmp_path.iterdir())
    with pytest.raises(UsageError, match="between 0.98 and 1, got 0.9"):
        TrainVocabOptions(character_coverage=0.9).validate()


def test_extend_model_then_eval_reports_bits_per_char(cli, tmp_path, tiny_llama_dir, assets):
    """``vocab extend-model`` writes step 0; ``eval ppl`` compares it with the base per character."""
    zh = tmp_path / "zh.model"
    assert cli("vocab", "train", assets / "zh.txt", "--vocab-size", "2000", "-o", zh).exit_code == 0
    assert cli("vocab", "merge", "--base", tiny_llama_dir, "--add", zh, "-o", tmp_path / "tok").exit_code == 0
    out = tmp_path / "step0"
    result = cli("vocab", "extend-model", "-m", tiny_llama_dir, "--tokenizer", tmp_path / "tok", "-o", out)
    assert result.exit_code == 0, result.stderr
    assert "embedding rows 1000 → " in result.stdout and "subword-mean" in result.stdout
    assert (out / "model.safetensors").is_file() and (out / "tokenizer.json").is_file()
    scores = {}
    for model in (tiny_llama_dir, out):
        ran = cli("eval", "ppl", model, "-d", assets / "zh_heldout.txt", "--ctx", "64", "--json")
        assert ran.exit_code == 0, ran.stderr
        scores[model] = json.loads(ran.stdout)["total"]
    assert scores[out]["chars_per_token"] > 2 * scores[tiny_llama_dir]["chars_per_token"]
    for total in scores.values():
        assert total["bits_per_char"] == pytest.approx(total["mean_nll"] * total["tokens_scored"] / math.log(2) / total["chars_scored"])
    again = cli("vocab", "extend-model", "-m", tiny_llama_dir, "--tokenizer", tmp_path / "tok", "-o", out, "--new-row-init", "bogus")
    assert again.exit_code == 2 and "bogus" in again.stderr
    exists = cli("vocab", "extend-model", "-m", tiny_llama_dir, "--tokenizer", tmp_path / "tok", "-o", out)
    assert exists.exit_code == 2 and "already exists" in exists.stderr
