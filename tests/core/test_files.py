"""The input readers below every floor: JSON files with errors naming the file, GGUF by its magic."""

from __future__ import annotations

import re

import pytest

from cnllm.core.errors import UsageError
from cnllm.core.files import GGUF_MAGIC, is_gguf, read_json, read_json_object


def test_json_object_is_read_and_other_documents_are_refused_by_name(tmp_path):
    good, array, broken = tmp_path / "config.json", tmp_path / "array.json", tmp_path / "broken.json"
    good.write_text('{"vocab_size": 32000}', encoding="utf-8")
    array.write_text("[1, 2]", encoding="utf-8")
    broken.write_text("{", encoding="utf-8")
    assert read_json_object(good) == {"vocab_size": 32000}
    assert read_json(array) == [1, 2]
    with pytest.raises(UsageError, match=re.escape(f"{array} is not a JSON object")):
        read_json_object(array)
    with pytest.raises(UsageError, match=re.escape(f"{broken} is not valid JSON")):
        read_json(broken)


def test_gguf_is_recognised_by_its_magic(tmp_path):
    model, other = tmp_path / "model.gguf", tmp_path / "tokenizer.model"
    model.write_bytes(GGUF_MAGIC + b"\x03\x00\x00\x00")
    other.write_bytes(b"\x0a\x0bnot gguf")
    assert is_gguf(model) and not is_gguf(other) and not is_gguf(tmp_path / "missing.gguf")
