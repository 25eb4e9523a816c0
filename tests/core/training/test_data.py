"""Training data: pt blocks and their cache, SFT record parsing and loss masks."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from cnllm.core.errors import UsageError
from cnllm.core.tiny import asset
from cnllm.core.training import data


@pytest.fixture(scope="module")
def tokenizer(tiny_llama_dir):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(str(tiny_llama_dir))


@pytest.fixture(scope="module")
def llama3_tokenizer(tiny_llama3_dir):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(str(tiny_llama3_dir))


def write(path: Path, text: str | bytes) -> Path:
    if isinstance(text, bytes):
        path.write_bytes(text)
    else:
        path.write_text(text, encoding="utf-8")
    return path


# ------------------------------------------------------------------------------- data file checks


def test_missing_empty_and_non_utf8_files_are_usage_errors(tmp_path):
    with pytest.raises(UsageError, match="data file .*nope.txt does not exist"):
        data.check_data_files([tmp_path / "nope.txt"])
    with pytest.raises(UsageError, match="empty.txt is empty"):
        data.check_data_files([write(tmp_path / "empty.txt", "")])
    with pytest.raises(UsageError, match=r"latin1.txt:2 is not UTF-8"):
        data.check_data_files([write(tmp_path / "latin1.txt", "ok\ncaf\xe9\n".encode("latin-1"))])
    empty_dir = tmp_path / "empty-dir"
    empty_dir.mkdir()
    with pytest.raises(UsageError, match="no data files found"):
        data.check_data_files([empty_dir])


# -------------------------------------------------------------------------------------- pt blocks


def test_blocks_end_every_document_with_eos(tmp_path, tokenizer):
    docs = ["第一篇文章。", "second document", "第三篇"]
    path = write(tmp_path / "docs.txt", "\n".join(docs) + "\n")
    ids = [i for doc in docs for i in tokenizer(doc, add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id]]
    from cnllm.core.corpus import CorpusStats

    blocks = list(data.iter_blocks([path], tokenizer, 4, CorpusStats()))
    assert all(len(b) == 4 for b in blocks)
    assert [i for b in blocks for i in b] == ids[: len(ids) // 4 * 4]


def test_pt_cache_is_reused_and_keyed_by_contents_and_block_size(tmp_path, tokenizer):
    corpus = write(tmp_path / "zh.txt", asset("zh.txt").read_text(encoding="utf-8"))
    first = data.build_pt_data([corpus], tokenizer, block_size=64, cache_dir=tmp_path / "cache")
    second = data.build_pt_data([corpus], tokenizer, block_size=64, cache_dir=tmp_path / "cache")
    assert not first.cache_hit and second.cache_hit
    assert second.cache_path == first.cache_path
    assert second.train_blocks == first.train_blocks > 10
    assert second.stats.lines == first.stats.lines == 144
    assert second.train[3]["input_ids"] == first.train[3]["input_ids"]
    other_size = data.build_pt_data([corpus], tokenizer, block_size=32, cache_dir=tmp_path / "cache")
    assert not other_size.cache_hit and other_size.cache_path != first.cache_path
    corpus.write_text(corpus.read_text(encoding="utf-8") + "新的一行。\n", encoding="utf-8")
    changed = data.build_pt_data([corpus], tokenizer, block_size=64, cache_dir=tmp_path / "cache")
    assert not changed.cache_hit and changed.cache_path != first.cache_path
    assert not [p for p in (tmp_path / "cache").iterdir() if p.name.startswith(".")]  # no build or temp leftovers


def test_validation_split_and_streaming(tmp_path, tokenizer):
    corpus = asset("zh.txt")
    cached = data.build_pt_data([corpus], tokenizer, block_size=64, validation_split=0.1, cache_dir=tmp_path / "cache")
    assert cached.eval_blocks == round((cached.train_blocks + cached.eval_blocks) * 0.1)
    streamed = data.build_pt_data([corpus], tokenizer, block_size=64, streaming=True, cache_dir=tmp_path / "cache2")
    assert streamed.cache_path is None and not (tmp_path / "cache2").exists()
    everything = data.build_pt_data([corpus], tokenizer, block_size=64, cache_dir=tmp_path / "cache")
    assert [row["input_ids"] for row in streamed.train] == everything.train["input_ids"]


def test_too_little_data_for_one_block(tmp_path, tokenizer):
    with pytest.raises(UsageError, match="fewer than block_size 1024 tokens"):  # core names the field; the command line renders --block-size
        data.build_pt_data([write(tmp_path / "small.txt", "短短的一句话。\n")], tokenizer, block_size=1024, cache_dir=tmp_path / "cache")


# ----------------------------------------------------------------------------------- sft records


def test_alpaca_messages_and_sharegpt_records(tmp_path):
    alpaca = write(tmp_path / "alpaca.json", json.dumps([
        {"instruction": "翻译成英文。", "input": "你好", "output": "Hello"},
        {"instruction": "讲个笑话。", "input": "", "output": "好的。"},
    ], ensure_ascii=False, indent=2))
    lines = [
        {"messages": [{"role": "system", "content": "简短"}, {"role": "user", "content": "一"}, {"role": "assistant", "content": "二"}]},
        {"conversations": [{"from": "human", "value": "问"}, {"from": "gpt", "value": "答"}, {"from": "human", "value": "再问"}, {"from": "gpt", "value": "再答"}]},
    ]
    jsonl = write(tmp_path / "chat.jsonl", "\n".join(json.dumps(r, ensure_ascii=False) for r in lines) + "\n")
    records = data.read_sft_records([alpaca, jsonl]).records
    assert records[0].messages[0].content == "翻译成英文。\n你好"
    assert records[1].messages[0].content == "讲个笑话。"
    assert [m.role for m in records[2].messages] == ["system", "user", "assistant"]
    assert [m.content for m in records[3].messages] == ["问", "答", "再问", "再答"]
    assert [r.where for r in records] == [f"{alpaca}:2", f"{alpaca}:7", f"{jsonl}:1", f"{jsonl}:2"]


def test_bundled_alpaca_sample_reads():
    assert len(data.read_sft_records([asset("alpaca_zh.json")]).records) == 80


@pytest.mark.parametrize(
    ("record", "reason"),
    [
        ({"instruction": "", "output": "x"}, "'instruction' is missing or empty"),
        ({"instruction": "x", "output": ""}, "'output' is missing or empty"),
        ({"messages": [{"role": "bot", "content": "x"}]}, "unknown role 'bot'"),
        ({"messages": [{"role": "user", "content": "x"}]}, "no assistant answer"),
        ({"conversations": [{"from": "alien", "value": "x"}]}, "unknown ShareGPT speaker"),
        ({"text": "x"}, "not an Alpaca record"),
        ([1, 2], "expected a JSON object"),
    ],
)
def test_malformed_record_is_reported_with_file_and_line(tmp_path, record, reason):
    good = {"instruction": "好", "output": "好"}
    path = write(tmp_path / "bad.json", "[\n" + json.dumps(good) + ",\n" + json.dumps(record, ensure_ascii=False) + "\n]\n")
    with pytest.raises(UsageError) as caught:
        data.read_sft_records([path])
    assert caught.value.message.startswith(f"{path}:3: ")
    assert reason in caught.value.message and "(pass skip_invalid to skip such records)" in caught.value.message  # --skip-invalid on the command line
    result = data.read_sft_records([path], skip_invalid=True)
    assert len(result.records) == 1 and len(result.skipped) == 1 and result.skipped[0].startswith(f"{path}:3: ")


def test_invalid_json_names_the_line(tmp_path):
    path = write(tmp_path / "broken.jsonl", '{"instruction": "a", "output": "b"}\n{"instruction": \n')
    with pytest.raises(UsageError, match=rf"{path.name}:2: invalid JSON"):
        data.read_sft_records([path])
    array = write(tmp_path / "broken.json", '[\n  {"instruction": "a", "output": "b"},\n  {"instruction": }\n]')
    with pytest.raises(UsageError, match=rf"{array.name}:3: invalid JSON"):
        data.read_sft_records([array])


# ------------------------------------------------------------------------------------ loss masks


def _one(instruction="介绍一下长城。", answer="长城是中国古代的防御工程。"):
    return data.SftRecord("x:1", data._record_messages({"instruction": instruction, "output": answer}))


def test_prompt_tokens_are_masked_and_answer_ends_with_eos(tokenizer):
    stats = data.SftStats()
    [example] = data.tokenize_records([_one()], tokenizer, template="alpaca", system=None, max_seq_length=1024, stats=stats)
    labelled = [i for i, label in zip(example.input_ids, example.labels) if label != data.IGNORE_INDEX]
    prompt_length = next(i for i, label in enumerate(example.labels) if label != -100)
    assert example.input_ids[0] == tokenizer.bos_token_id
    assert all(label == -100 for label in example.labels[:prompt_length])
    assert labelled[-1] == tokenizer.eos_token_id
    assert tokenizer.decode(labelled[:-1]).strip() == "长城是中国古代的防御工程。"
    assert "### Response:" in tokenizer.decode(example.input_ids[:prompt_length])
    assert stats.trainable_tokens == len(labelled)


def test_llama3_template_trains_on_answer_and_eot(llama3_tokenizer):
    [example] = data.tokenize_records([_one("Say hi.", "Hi there.")], llama3_tokenizer, template="llama3", system=None, max_seq_length=512, stats=data.SftStats())
    labelled = [i for i, label in zip(example.input_ids, example.labels) if label != -100]
    assert llama3_tokenizer.decode(labelled) == "Hi there.<|eot_id|>"
    assert labelled[-1] == llama3_tokenizer.convert_tokens_to_ids("<|eot_id|>")


def test_truncation_is_counted_and_samples_without_answer_tokens_are_dropped(tokenizer):
    stats = data.SftStats()
    long_prompt = _one("很长的问题" * 100, "短答")
    long_answer = _one("短问", "很长的回答" * 100)
    examples = data.tokenize_records([long_prompt, long_answer, _one()], tokenizer, template="alpaca", system=None, max_seq_length=160, stats=stats)
    assert stats.samples == 3 and stats.truncated == 2 and stats.dropped_no_target == 1
    assert len(examples) == 2
    assert all(len(e.input_ids) <= 160 for e in examples)
    assert all(any(label != -100 for label in e.labels[1:]) for e in examples)


def test_packing_keeps_samples_whole(tokenizer):
    examples = data.tokenize_records([_one(), _one("问", "答"), _one("再问", "再答")], tokenizer, template="alpaca", system=None, max_seq_length=256, stats=data.SftStats())
    packed = data.pack_examples(examples, 256)
    assert len(packed) < len(examples)
    assert sum(len(p.input_ids) for p in packed) == sum(len(e.input_ids) for e in examples)
    assert all(len(p.input_ids) <= 256 for p in packed)


def test_auto_template_needs_a_chat_template(tokenizer):
    with pytest.raises(UsageError, match="no chat template"):
        data.segment_function("auto", tokenizer, None)


def test_sft_validation_split(tokenizer):
    built = data.build_sft_data([asset("alpaca_zh.json")], tokenizer, template="alpaca", system=None, max_seq_length=512, validation_split=0.1)
    assert built.eval_samples + len(built.train) + built.stats.dropped_no_target == 80
    assert 6 <= built.eval_samples <= 8


def test_auto_template_uses_the_tokenizers_chat_template(tiny_llama_dir):
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(str(tiny_llama_dir))
    tokenizer.chat_template = (
        "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
        "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
    )
    [example] = data.tokenize_records([_one("Name a color.", "Blue.")], tokenizer, template="auto", system=None, max_seq_length=512, stats=data.SftStats())
    labelled = [i for i, label in zip(example.input_ids, example.labels) if label != -100]
    prompt = [i for i, label in zip(example.input_ids, example.labels) if label == -100]
    assert tokenizer.decode(labelled).replace(" ", "") == "Blue.<|im_end|>\n"
    assert "Name a color." in tokenizer.decode(prompt)


def test_sft_needs_a_template(tokenizer):
    """none (plain continuation) is for chat, serve and eval: training needs a template to learn where answers end."""
    with pytest.raises(UsageError, match="unknown template 'none'; choose one of alpaca, llama2, llama3, chatml, auto$"):
        data.segment_function("none", tokenizer, None)
