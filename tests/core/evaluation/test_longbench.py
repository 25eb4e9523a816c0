"""LongBench: its metrics on hand-computed examples, middle truncation, the data format, and the command end to
end on small sample files written for these tests (LongBench's own data cannot be downloaded here)."""

from __future__ import annotations

import json

import pytest

from cnllm.core.errors import UsageError
from cnllm.core.evaluation.longbench import (
    classification,
    code_similarity,
    count,
    qa_f1,
    qa_f1_zh,
    read_dataset,
    retrieval,
    retrieval_zh,
    rouge_l,
    rouge_l_zh,
    score_prediction,
    truncate_middle,
)


def test_qa_f1_english():
    # normalised: "cat sat on mat" vs "cat on mat": 3 shared, precision 3/4, recall 1
    assert qa_f1("The cat sat on the mat.", "a cat on a mat") == pytest.approx(2 * 0.75 / 1.75)
    assert qa_f1("Paris", "paris!") == 1.0
    assert qa_f1("London", "Paris") == 0.0


def test_qa_f1_chinese_by_characters():
    # 北京是首都 vs 首都北京 (the full stop dropped): 4 shared of 5 and 4
    assert qa_f1_zh("北京是首都。", "首都北京", segmenter="char") == pytest.approx(2 * 0.8 * 1 / 1.8)
    assert qa_f1_zh("，。", "首都", segmenter="char") == 0.0


def test_rouge_l():
    # LCS "the cat on the mat" = 5 of 6 and 5
    assert rouge_l("the cat sat on the mat", "the cat on the mat") == pytest.approx(10 / 11)
    # 会议讨论了预算 vs 会议决定预算: LCS 会议预算 = 4 of 7 and 6
    assert rouge_l_zh("会议讨论了预算", "会议决定预算", segmenter="char") == pytest.approx(2 * (4 / 7) * (4 / 6) / (4 / 7 + 4 / 6))
    assert rouge_l("", "anything") == 0.0


def test_classification():
    classes = ["Location", "Human", "Description"]
    assert classification("Human being", "Human", all_classes=classes) == 1.0
    assert classification("Human or Location", "Human", all_classes=classes) == 0.5
    assert classification("Location", "Human", all_classes=classes) == 0.0
    # a class that is only part of the right one's name does not count against it
    assert classification("sports news", "sports news", all_classes=["news", "sports news"]) == 1.0


def test_retrieval_and_count():
    assert retrieval("Paragraph 12, not 3", "Paragraph 12") == 0.5
    assert retrieval("none", "Paragraph 12") == 0.0
    assert retrieval_zh("段落5", "段落5") == 1.0
    assert count("There are 7 unique; 7.", "7") == 1.0
    assert count("7 or 8", "7") == 0.5


def test_code_similarity_first_code_line():
    # the comment line is skipped; "x = foo(1)" vs "x = foo(2)": LCS 9 of 10 + 10 characters
    assert code_similarity("\n# comment\nx = foo(1)\n", "x = foo(2)") == 0.9
    assert code_similarity("```python", "x = 1") == 0.0


def test_score_takes_the_first_line_and_the_best_answer():
    assert score_prediction("trec", "\nHuman\nLocation", ["Human"], ["Human", "Location"], "char") == 1.0
    assert score_prediction("hotpotqa", "Paris", ["London", "Paris"], None, "char") == 1.0


def test_truncate_middle_keeps_both_ends():
    decode = lambda ids: "".join(chr(ord("a") + i) for i in ids)  # noqa: E731
    assert truncate_middle(list(range(10)), 4, decode) == "ab" + "ij"
    assert truncate_middle(list(range(4)), 4, decode) is None
    # byte tokens: the cuts move to whole characters instead of splitting 京 and 上
    as_bytes = lambda ids: bytes(ids).decode("utf-8", errors="replace")  # noqa: E731
    assert truncate_middle(list("北京上海".encode()), 8, as_bytes) == "北海"


def test_bad_record_names_file_and_line(tmp_path):
    path = tmp_path / "hotpotqa.jsonl"
    path.write_text(json.dumps({"input": "q", "context": "c", "answers": ["a"]}) + "\n{not json\n", encoding="utf-8")
    with pytest.raises(UsageError, match=r"hotpotqa.jsonl:2"):
        read_dataset(path, "hotpotqa")


def write_samples(folder):
    """Three datasets in LongBench's format: Chinese QA, English passage retrieval, Chinese classification."""
    folder.mkdir(parents=True, exist_ok=True)
    story = "北京是中国的首都，也是一座历史悠久的城市。" * 30
    records = {
        "multifieldqa_zh": [
            {"input": "中国的首都是哪里？", "context": story, "answers": ["北京"], "length": len(story), "dataset": "multifieldqa_zh",
             "language": "zh", "all_classes": None, "_id": "zh-1"},
            {"input": "这座城市怎么样？", "context": story[:60], "answers": ["历史悠久"], "length": 60, "dataset": "multifieldqa_zh",
             "language": "zh", "all_classes": None, "_id": "zh-2"},
        ],
        "passage_retrieval_en": [
            {"input": "A city by a river.", "context": "Paragraph 1: The sky is blue.\n\nParagraph 2: The city lies by a river.",
             "answers": ["Paragraph 2"], "length": 20, "dataset": "passage_retrieval_en", "language": "en", "all_classes": None, "_id": "en-1"},
        ],
        "lsht": [
            {"input": "新闻：球队昨晚赢得了比赛。\n类别：", "context": "新闻：股市今天上涨。\n类别：财经", "answers": ["体育"], "length": 30,
             "dataset": "lsht", "language": "zh", "all_classes": ["体育", "财经"], "_id": "cls-1"},
        ],
    }
    for name, rows in records.items():
        (folder / f"{name}.jsonl").write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows), encoding="utf-8")
    return folder


@pytest.mark.parametrize("fixture", ["tiny_f32_gguf", "tiny_llama_dir"])
def test_longbench_command_end_to_end(cli, tmp_path, request, fixture):
    model = request.getfixturevalue(fixture)
    data, out = write_samples(tmp_path / "data"), tmp_path / "lb"
    result = cli("eval", "longbench", model, "-d", data, "--max-length", "200", "--threads", "1", "-o", out, "--json")
    assert result.exit_code == 0, result.stderr
    document = json.loads(result.stdout)
    assert set(document["scores"]) == {"multifieldqa_zh", "passage_retrieval_en", "lsht"}
    assert document["segmentation"] in ("jieba", "char")
    by_name = {d["dataset"]: d for d in document["datasets"]}
    assert by_name["multifieldqa_zh"]["samples"] == 2 and by_name["multifieldqa_zh"]["truncated"] >= 1
    assert document["average"] == pytest.approx(round(sum(document["scores"].values()) / 3, 2), abs=0.01)
    assert json.loads((out / "result.json").read_text(encoding="utf-8"))["scores"] == document["scores"]
    for name, score in document["scores"].items():
        predictions = [json.loads(line) for line in (out / "pred" / f"{name}.jsonl").read_text(encoding="utf-8").splitlines()]
        rescored = [score_prediction(name, p["pred"], p["answers"], p["all_classes"], document["segmentation"]) for p in predictions]
        assert rescored == [p["score"] for p in predictions]
        assert score == round(100 * sum(rescored) / len(rescored), 2)
    assert json.loads((out / "cnllm-eval-longbench.json").read_text(encoding="utf-8"))["results"]["average"] == document["average"]
    table = cli("eval", "longbench", model, "-d", data, "--datasets", "lsht", "--max-length", "200", "--threads", "1")
    assert table.exit_code == 0 and "lsht" in table.stdout and "average" in table.stdout
    bad = cli("eval", "longbench", model, "-d", data, "--datasets", "nope")
    assert bad.exit_code == 2 and "unknown LongBench dataset" in bad.stderr
