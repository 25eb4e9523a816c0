"""Preference records: the plain and TRL conversational shapes, the prompt they share, and bad records by line."""

from __future__ import annotations

import json

import pytest

from cnllm.core.errors import UsageError
from cnllm.core.templates import TEMPLATES, Message
from cnllm.core.tiny import asset
from cnllm.core.training.preference import read_preference_pairs, record_pair, render_pair, split_pairs


def test_plain_record_with_system_and_history():
    pair = record_pair({"system": "简短回答。", "history": [["你好", "你好！"]], "prompt": "一加一？", "chosen": "二。", "rejected": "三。"}, "f:1")
    assert [m.role for m in pair.prompt] == ["system", "user", "assistant", "user"]
    assert (pair.chosen, pair.rejected) == ("二。", "三。")


def test_conversational_records_with_implicit_and_explicit_prompt():
    user = {"role": "user", "content": "一加一？"}
    implicit = record_pair({"chosen": [user, {"role": "assistant", "content": "二。"}], "rejected": [user, {"role": "assistant", "content": "三。"}]}, "f:1")
    explicit = record_pair({"prompt": [user], "chosen": [{"role": "assistant", "content": "二。"}], "rejected": [{"role": "assistant", "content": "三。"}]}, "f:2")
    assert implicit.prompt == explicit.prompt == [Message("user", "一加一？")]
    assert (implicit.chosen, implicit.rejected) == (explicit.chosen, explicit.rejected) == ("二。", "三。")


@pytest.mark.parametrize(
    ("record", "reason"),
    [
        ({"prompt": "问", "chosen": "答"}, "needs 'chosen' and 'rejected'"),
        ({"prompt": "问", "chosen": "答", "rejected": ""}, "'rejected' is missing or empty"),
        ({"prompt": "问", "chosen": "答", "rejected": "答"}, "the same answer"),
        ({"prompt": "问", "chosen": "答", "rejected": "错", "history": ["x"]}, "'history' must be a list"),
        ({"chosen": [{"role": "user", "content": "问"}], "rejected": [{"role": "user", "content": "问"}, {"role": "assistant", "content": "错"}]},
         "'chosen' must end in exactly one assistant message"),
        (["prompt"], "expected a JSON object"),
    ],
)
def test_bad_records_say_why(record, reason):
    with pytest.raises(ValueError, match=reason.replace("(", r"\(").replace("'", "'")):
        record_pair(record, "f:1")


def test_bad_record_is_named_by_line_or_skipped_and_counted(tmp_path):
    good = json.dumps({"prompt": "问", "chosen": "好答案", "rejected": "坏答案"}, ensure_ascii=False)
    data = tmp_path / "pairs.jsonl"
    data.write_text("\n".join([good, good, '{"prompt": "问", "chosen": "好"}', "not json", good]) + "\n", encoding="utf-8")
    with pytest.raises(UsageError, match=rf"{data}:3: a preference record needs"):
        read_preference_pairs([data])
    read = read_preference_pairs([data], skip_invalid=True)
    assert len(read.pairs) == 3 and len(read.skipped) == 2 and read.skipped[1].startswith(f"{data}:4: invalid JSON")


def test_bundled_set_reads_whole_and_renders_with_the_sft_template():
    read = read_preference_pairs([asset("pref_zh.jsonl"), asset("pref_zh_heldout.jsonl")])
    assert len(read.pairs) == 52 and not read.skipped
    prompt, chosen, rejected = render_pair(read.pairs[0], lambda messages: TEMPLATES["alpaca"].segments(messages, add_generation_prompt=False))
    assert "".join(s.text for s in prompt).endswith("### Response: ") and chosen.endswith("</s>") and rejected.endswith("</s>")
    train, held = split_pairs(read.pairs, 0.25, seed=7)
    assert len(held) == 13 and len(train) + len(held) == len(read.pairs) and not set(map(id, train)) & set(map(id, held))
