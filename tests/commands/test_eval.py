from __future__ import annotations

import json

import pytest

from cnllm.core.provenance import read_file_record
from cnllm.core.tiny import asset
from tests.core.evaluation.exam_data import write_ceval, write_cmmlu, write_mmlu


@pytest.fixture(scope="module")
def small_text(tmp_path_factory):
    path = tmp_path_factory.mktemp("text") / "sample.txt"
    path.write_text(asset("en.txt").read_text(encoding="utf-8")[:1500], encoding="utf-8")
    return path


@pytest.fixture(scope="module")
def exam(tmp_path_factory):
    return write_ceval(tmp_path_factory.mktemp("exam") / "ceval", val=3, test=2)


def test_ppl_json_and_output_file(cli, tiny_llama_dir, small_text, tmp_path):
    out = tmp_path / "ppl.json"
    result = cli("eval", "ppl", tiny_llama_dir, "--data", small_text, "--ctx", "64", "--json", "-o", out)
    assert result.exit_code == 0, result.stderr
    document = json.loads(result.stdout)
    assert document["settings"] == {"ctx": 64, "stride": None, "llamacpp_compatible": False, "batch_size": 1}
    assert document["files"][0]["ppl"] == pytest.approx(document["total"]["ppl"])
    assert {"ppl", "mean_nll", "tokens_scored", "bits_per_byte", "tokens_per_second"} <= set(document["total"])
    assert json.loads(out.read_text(encoding="utf-8")) == document
    record = read_file_record(out)  # the result's provenance, beside it
    assert record["cnllm_record"] == "eval-ppl" and record["results"] == document["total"] and record["inputs"][0]["sha256"]
    again = cli("eval", "ppl", tiny_llama_dir, "--data", small_text, "-o", out)
    assert again.exit_code == 2 and "already exists" in again.stderr


def test_ppl_table(cli, tiny_llama_dir, small_text):
    result = cli("eval", "ppl", tiny_llama_dir, "-d", small_text, "-d", small_text, "--ctx", "64", "--stride", "32")
    assert result.exit_code == 0, result.stderr
    assert "sample.txt" in result.stdout and "total" in result.stdout and "bits/char" in result.stdout and "bits/byte" in result.stdout


def test_mc_table_and_outputs(cli, tiny_llama_dir, exam, tmp_path):
    out = tmp_path / "run"
    result = cli("eval", "mc", tiny_llama_dir, "--data", exam, "--shots", "1", "-o", out)
    assert result.exit_code == 0, result.stderr
    assert "计算机网络" in result.stdout and "by category" in result.stdout and "average" in result.stdout
    assert sorted(p.name for p in out.iterdir()) == ["cnllm-eval-mc.json", "predictions.jsonl", "results.json"]
    results = json.loads((out / "results.json").read_text(encoding="utf-8"))
    assert results["settings"]["shots"] == 1 and results["settings"]["template"] == "none"
    assert results["model"]["backend"] == "transformers" and results["questions"] == 6


def test_mc_test_split_json(cli, tiny_llama_dir, exam, tmp_path):
    out = tmp_path / "submit"
    result = cli("eval", "mc", tiny_llama_dir, "--data", exam, "--split", "test", "--shots", "0", "--template", "llama2",
                 "--subjects", "law", "--json", "-o", out)
    assert result.exit_code == 0, result.stderr
    document = json.loads(result.stdout)
    assert document["labelled"] is False and document["settings"]["template"] == "llama2"
    assert document["output"]["files"] == ["results.json", "predictions.jsonl", "submission.json"]
    assert set(json.loads((out / "submission.json").read_text(encoding="utf-8"))) == {"law"}


@pytest.mark.parametrize(
    "args, message",
    [
        (["--subjects", "nope"], "nope_val.csv does not exist"),
        (["--template", "vicuna"], "'vicuna' is not one of"),
        (["--format", "cmmlu", "--split", "val"], "no 'val' split"),
        (["--subjects", " , "], "--subjects is empty"),
    ],
)
def test_mc_usage_errors(cli, tiny_llama_dir, exam, tmp_path, args, message):
    out = tmp_path / "out"
    result = cli("eval", "mc", tiny_llama_dir, "--data", exam, "-o", out, *args)
    assert result.exit_code == 2
    assert message in result.stderr and "Traceback" not in result.stderr
    assert len(result.stderr.strip().splitlines()) == 1
    assert not out.exists() and result.stdout == ""


@pytest.mark.parametrize("fmt, writer, split", [("cmmlu", write_cmmlu, "test"), ("mmlu", write_mmlu, "val")])
def test_mc_other_layouts(cli, tiny_llama_dir, tmp_path, fmt, writer, split):
    root = writer(tmp_path / fmt)
    result = cli("eval", "mc", tiny_llama_dir, "--data", root, "--format", fmt, "--shots", "2", "--json")
    assert result.exit_code == 0, result.stderr
    document = json.loads(result.stdout)
    assert document["settings"]["split"] == split and document["labelled"] is True
    assert document["categories"] == [] and document["overall"] is not None


def test_failure_after_loading_leaves_no_output(cli, tiny_llama_dir, exam, tmp_path):
    out = tmp_path / "out"
    result = cli("eval", "mc", tiny_llama_dir, "--data", exam, "--ctx", "16", "-o", out)
    assert result.exit_code == 2 and "raise --ctx" in result.stderr
    assert not out.exists() and list(tmp_path.iterdir()) == []


def test_mc_bad_answer_names_file_and_line(cli, tiny_llama_dir, tmp_path):
    root = write_ceval(tmp_path / "ceval", subjects=("law",))
    path = root / "val" / "law_val.csv"
    path.write_text(path.read_text(encoding="utf-8").replace(",C\n", ",X\n", 1), encoding="utf-8")
    result = cli("eval", "mc", tiny_llama_dir, "--data", root)
    assert result.exit_code == 2
    assert "law_val.csv: line 4: answer 'X' is not one of A, B, C, D" in result.stderr


def test_unloadable_models(cli, small_text, tmp_path):
    broken = tmp_path / "broken.gguf"
    broken.write_bytes(b"GGUF" + b"\0" * 32)
    result = cli("eval", "ppl", broken, "--data", small_text)
    assert result.exit_code == 2 and "GGUF version 0 is not supported" in result.stderr
    empty_dir = tmp_path / "model"
    empty_dir.mkdir()
    (empty_dir / "config.json").write_text("{}", encoding="utf-8")
    result = cli("eval", "ppl", empty_dir, "--data", small_text)
    assert result.exit_code == 2 and str(empty_dir) in result.stderr
    assert len(result.stderr.strip().splitlines()) == 1


def test_lora_is_refused_for_gguf(cli, small_text, tmp_path):
    model = tmp_path / "m.gguf"
    model.write_bytes(b"GGUF" + b"\0" * 32)
    result = cli("eval", "ppl", model, "--data", small_text, "--lora", tmp_path)
    assert result.exit_code == 2 and "--lora applies to Hugging Face" in result.stderr


def test_mc_template_auto_without_a_template_is_plain_like_everywhere(cli, tiny_llama_dir, exam):
    """A model without a chat template: --template auto falls back to none with a note, as chat and serve do."""
    auto = cli("eval", "mc", tiny_llama_dir, "--data", exam, "--shots", "0", "--template", "auto", "--json")
    assert auto.exit_code == 0, auto.stderr
    assert "no chat template" in auto.stderr
    none = cli("eval", "mc", tiny_llama_dir, "--data", exam, "--shots", "0", "--json")
    documents = [json.loads(r.stdout) for r in (auto, none)]
    assert [d["model"]["template"] for d in documents] == ["none", "none"]
    assert documents[0]["settings"]["template"] == "auto" and documents[0]["prompt_tokens"] == documents[1]["prompt_tokens"]


def test_ppl_of_an_adapter_that_extended_the_vocabulary_reads_with_its_tokenizer(cli, tiny_llama_dir, tmp_path):
    """An adapter trained with a larger tokenizer is scored with that tokenizer (as chat reads it), so --lora and
    the merged model agree."""
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(str(tiny_llama_dir))
    tokenizer.add_tokens(["中国", "天气", "我们", "今天", "可以"])
    tokenizer.save_pretrained(str(tmp_path / "tok"))
    adapter = tmp_path / "pt"
    trained = cli("pt", "-m", tiny_llama_dir, "--tokenizer", tmp_path / "tok", "-d", asset("zh.txt"), "-o", adapter, "--max-steps", "1",
                  "--block-size", "64", "--lora-rank", "4", "--validation-split", "0", "--cache-dir", tmp_path / "cache")
    assert trained.exit_code == 0, trained.stderr
    assert cli("merge-lora", "--base", tiny_llama_dir, "--lora", adapter, "-o", tmp_path / "merged").exit_code == 0
    totals = []
    for args in ((tiny_llama_dir, "--lora", adapter), (tmp_path / "merged",)):
        ran = cli("eval", "ppl", *args, "-d", asset("zh_heldout.txt"), "--ctx", "64", "--json")
        assert ran.exit_code == 0, ran.stderr
        totals.append(json.loads(ran.stdout)["total"])
    assert totals[0]["tokens"] == totals[1]["tokens"]
    assert totals[0]["bits_per_char"] == pytest.approx(totals[1]["bits_per_char"], rel=1e-4)
