"""Small C-Eval / CMMLU / MMLU folders written in the published layouts, for the eval tests."""

from __future__ import annotations

import csv
import json
from pathlib import Path

MAPPING = {
    "computer_network": ["Computer Network", "计算机网络", "STEM"],
    "modern_chinese_history": ["Modern Chinese History", "近代史纲要", "Humanities"],
    "law": ["Law", "法学", "Humanities"],
}
# Questions of different lengths, so batches need padding.
STEMS = ["TCP 的全称是什么？", "下列哪一项描述了路由器在网络层转发数据包时所依据的主要信息？", "1+1=？", "哪个年份发生了辛亥革命？", "宪法是什么？"]
CHOICES = [("传输控制协议", "用户数据报协议", "超文本", "以太网"), ("IP 地址", "MAC 地址", "端口号", "域名"), ("1", "2", "3", "4")]


def question_rows(subject: str, count: int, *, offset: int = 0) -> list[dict]:
    rows = []
    for i in range(count):
        n = i + offset
        a, b, c, d = CHOICES[n % len(CHOICES)]
        rows.append({"id": str(n), "question": f"{STEMS[n % len(STEMS)]}（{subject} {n}）", "A": a, "B": b, "C": c, "D": d, "answer": "ABCD"[n % 4]})
    return rows


def _write(path: Path, header: list[str] | None, rows: list[list[str]]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w", encoding="utf-8", newline="") as handle:
        writer = csv.writer(handle)
        if header is not None:
            writer.writerow(header)
        writer.writerows(rows)


def write_ceval(root: Path, subjects=("computer_network", "law"), *, mapping: bool = True, val: int = 4, dev: int = 5, test: int = 3) -> Path:
    for subject in subjects:
        dev_rows = question_rows(subject, dev, offset=100)
        _write(root / "dev" / f"{subject}_dev.csv", ["id", "question", "A", "B", "C", "D", "answer", "explanation"],
               [[r["id"], r["question"], r["A"], r["B"], r["C"], r["D"], r["answer"], "因为如此"] for r in dev_rows])
        _write(root / "val" / f"{subject}_val.csv", ["id", "question", "A", "B", "C", "D", "answer"],
               [[r["id"], r["question"], r["A"], r["B"], r["C"], r["D"], r["answer"]] for r in question_rows(subject, val)])
        _write(root / "test" / f"{subject}_test.csv", ["id", "question", "A", "B", "C", "D"],  # published without answers
               [[r["id"], r["question"], r["A"], r["B"], r["C"], r["D"]] for r in question_rows(subject, test, offset=50)])
    if mapping:
        (root / "subject_mapping.json").write_text(json.dumps({s: MAPPING[s] for s in subjects}, ensure_ascii=False), encoding="utf-8")
    return root


def write_cmmlu(root: Path, subjects=("computer_network", "law"), *, test: int = 4, dev: int = 5) -> Path:
    for subject in subjects:
        for split, count, offset in (("dev", dev, 100), ("test", test, 0)):
            rows = question_rows(subject, count, offset=offset)
            _write(root / split / f"{subject}.csv", ["", "Question", "A", "B", "C", "D", "Answer"],
                   [[str(i), r["question"], r["A"], r["B"], r["C"], r["D"], r["answer"]] for i, r in enumerate(rows)])
    return root


def write_mmlu(root: Path, subjects=("astronomy",), *, val: int = 4, dev: int = 5) -> Path:
    for subject in subjects:
        for split, count, offset in (("dev", dev, 100), ("val", val, 0)):
            rows = question_rows(subject, count, offset=offset)
            _write(root / split / f"{subject}_{split}.csv", None, [[r["question"], r["A"], r["B"], r["C"], r["D"], r["answer"]] for r in rows])
    return root
