import json

import pytest

from cnllm.core.corpus import CorpusStats, iter_documents
from cnllm.core.errors import UsageError


def test_text_jsonl_and_directories_with_bad_lines_counted(tmp_path):
    folder = tmp_path / "corpus"
    folder.mkdir()
    (folder / "a.txt").write_bytes("第一行\n\n".encode() + b"\xff\xfe broken\n" + "second line\n".encode())
    records = [json.dumps({"text": "记录一"}, ensure_ascii=False), "{not json", json.dumps({"other": 1}), json.dumps({"text": "记录二"})]
    (folder / "b.jsonl").write_text("\n".join(records) + "\n", encoding="utf-8")
    (folder / "image.png").write_bytes(b"\x89PNG")
    stats = CorpusStats()
    docs = list(iter_documents([folder], stats))
    assert docs == ["第一行", "second line", "记录一", "记录二"]
    assert (stats.files, stats.invalid_utf8_lines, stats.invalid_json_lines) == (2, 1, 2)
    assert stats.characters == sum(len(d) for d in docs)


def test_missing_corpus_is_a_usage_error(tmp_path):
    with pytest.raises(UsageError, match="does not exist"):
        list(iter_documents([tmp_path / "missing.txt"]))
