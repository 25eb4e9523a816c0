"""The commands on the families the architecture table adds (tiny models built in code): Mistral (LLaMA with a
sliding window, SentencePiece) and Qwen2 (q/k/v biases, tied embeddings, Qwen2-style BPE, ChatML template).
gguf-to-hf's round trip runs on both in test_gguf_to_hf.py."""

from __future__ import annotations

import json

import pytest

from cnllm.core.gguf.convert import ConvertOptions, convert_to_gguf
from cnllm.core.tensors import iter_tensors
from tests.core.gguf.util import gguf_fields
from tests.lora_fixtures import ALL_LINEAR, build_adapter

pytestmark = pytest.mark.filterwarnings("ignore::UserWarning", "ignore::FutureWarning")
FAMILIES = ["tiny_mistral_dir", "tiny_qwen2_dir"]
GREEDY = ["--temperature", "0", "--repetition-penalty", "1", "--max-tokens", "6"]


@pytest.fixture(params=FAMILIES)
def family(request):
    return request.getfixturevalue(request.param)


def test_merge_lora_verifies_and_keeps_the_tied_embedding(cli, tmp_path, family):
    adapter = build_adapter(family, tmp_path / "lora")
    out = tmp_path / "merged"
    result = cli("merge-lora", "--base", family, "--lora", adapter, "-o", out, "--verify", "--json")
    assert result.exit_code == 0, result.stderr
    document = json.loads(result.stdout)
    assert document["verify"]["passed"] and document["updated"] == 2 * len(ALL_LINEAR)
    names = set(dict(iter_tensors(out)))
    tied = family.name.startswith("tiny-qwen2")
    assert ("lm_head.weight" in names) is not tied and json.loads((out / "config.json").read_text()).get("tie_word_embeddings", False) is tied
    assert tied is ("model.layers.0.self_attn.q_proj.bias" in names)  # Qwen2's biases pass through the merge
    pth = cli("merge-lora", "--base", family, "--lora", adapter, "-o", tmp_path / "pth", "--format", "pth")
    assert pth.exit_code == 2 and "Meta's LLaMA layout" in pth.stderr


def test_vocab_merge_extend_model_and_convert(cli, tmp_path, family):
    words = tmp_path / "words.txt"
    words.write_text("天气预报\n语言模型\n", encoding="utf-8")
    tokenizer = tmp_path / "tok"
    merged = cli("vocab", "merge", "--base", family, "--add", words, "-o", tokenizer, "--json")
    assert merged.exit_code == 0, merged.stderr
    document = json.loads(merged.stdout)
    assert document["added"] >= 2 and document["family"] == ("bpe" if family.name.startswith("tiny-qwen2") else "spm")
    step0 = tmp_path / "step0"
    extended = cli("vocab", "extend-model", "-m", family, "--tokenizer", tokenizer, "-o", step0)
    assert extended.exit_code == 0, extended.stderr
    gguf = tmp_path / "step0.gguf"
    assert cli("convert-gguf", step0, "-o", gguf, "--outtype", "f32").exit_code == 0
    fields = gguf_fields(gguf)
    base = gguf_fields(convert_to_gguf(family, tmp_path / "base.gguf", ConvertOptions(vocab_only=True)).output)
    assert fields["general.architecture"] == base["general.architecture"] and fields["tokenizer.ggml.pre"] == base["tokenizer.ggml.pre"]
    assert len(fields["tokenizer.ggml.tokens"]) > len(base["tokenizer.ggml.tokens"])


def test_chat_on_both_backends(cli, tmp_path, family):
    qwen2 = family.name.startswith("tiny-qwen2")
    template = [] if qwen2 else ["--template", "llama2"]  # Qwen2's tokenizer carries ChatML, which auto uses
    gguf = convert_to_gguf(family, tmp_path / "m.gguf", ConvertOptions(outtype="f32")).output
    for model in (family, gguf):
        result = cli("chat", model, "-p", "你好", *GREEDY, *template, "--json")
        assert result.exit_code == 0, result.stderr
        document = json.loads(result.stdout)
        assert document["template"] == ("auto" if qwen2 else "llama2") and document["completion_tokens"] <= 6
    plain = json.loads(cli("chat", gguf, "-p", "你好", *GREEDY, "--template", "none", "--json").stdout)
    if qwen2:  # wrapped in ChatML: the prompt grows by the role markers
        assert document["prompt_tokens"] > plain["prompt_tokens"]
