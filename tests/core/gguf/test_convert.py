"""convert_to_gguf: llama.cpp computes and tokenizes what transformers does; metadata, types, preflight errors."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from cnllm.core.errors import UsageError
from cnllm.core.gguf.convert import ConvertOptions, convert_to_gguf, permute_for_rope
from tests.core.gguf.util import copy_model, gguf_fields, gguf_tensors

TEXTS = {
    "chinese": "你好，世界！大语言模型在中文上表现如何？",
    "english": "The quick brown fox jumps over the lazy dog.",
    "mixed": "我想在apple工作1314151天～ and 中文 mixed text",
    "leading_spaces": "   three leading spaces and  two inside",
    "digits": "3.14159, 2023年 and 1234567890",
}
PROMPT = "Once upon a time, 在一个小村庄里"


CONVERTED = {  # model folder and its f32 GGUF: LLaMA with each tokenizer family, and the other rows of the architecture table
    "spm": ("tiny_llama_dir", "tiny_spm_f32_gguf"),
    "bpe": ("tiny_llama3_dir", "tiny_bpe_f32_gguf"),
    "mistral": ("tiny_mistral_dir", "tiny_mistral_f32_gguf"),
    "qwen2": ("tiny_qwen2_dir", "tiny_qwen2_f32_gguf"),
}


@pytest.fixture(params=list(CONVERTED))
def converted(request):
    return tuple(request.getfixturevalue(name) for name in CONVERTED[request.param])


def _llama(path: Path):
    from cnllm.core.llama_loader import open_llama

    return open_llama(path, logits_all=True, verbose=False, n_ctx=256, n_threads=1)


def test_next_token_logits_match_transformers(converted):
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model_dir, gguf_path = converted
    tokenizer = AutoTokenizer.from_pretrained(str(model_dir))
    ids = tokenizer(PROMPT)["input_ids"]
    model = AutoModelForCausalLM.from_pretrained(str(model_dir), dtype=torch.float32).eval()
    with torch.no_grad():
        expected = model(torch.tensor([ids])).logits[0].numpy()
    llm = _llama(gguf_path)
    try:
        llm.eval(ids)
        actual = np.asarray(llm.scores[: len(ids)])
    finally:
        llm.close()
    assert actual.shape == expected.shape
    assert np.abs(actual - expected).max() < 1e-3


def test_llama_cpp_tokenizes_like_hugging_face(converted):
    from transformers import AutoTokenizer

    model_dir, gguf_path = converted
    tokenizer = AutoTokenizer.from_pretrained(str(model_dir))
    llm = _llama(gguf_path)
    try:
        for name, text in TEXTS.items():
            expected = tokenizer(text, add_special_tokens=False)["input_ids"]
            assert llm.tokenize(text.encode(), add_bos=False, special=False) == expected, name
    finally:
        llm.close()


def test_sentencepiece_metadata(tiny_llama_dir, tiny_spm_f32_gguf):
    import gguf

    fields = gguf_fields(tiny_spm_f32_gguf)
    config = json.loads((tiny_llama_dir / "config.json").read_text())
    assert fields["general.architecture"] == "llama"
    assert fields["general.file_type"] == gguf.LlamaFileType.ALL_F32
    assert fields["general.quantization_version"] == gguf.GGML_QUANT_VERSION
    assert fields["llama.block_count"] == config["num_hidden_layers"]
    assert fields["llama.attention.head_count"] == 4
    assert fields["llama.attention.head_count_kv"] == 2
    assert fields["llama.vocab_size"] == config["vocab_size"]
    assert fields["llama.rope.dimension_count"] == 16
    assert fields["llama.rope.freq_base"] == pytest.approx(10000.0)
    assert fields["tokenizer.ggml.model"] == "llama"
    assert fields["tokenizer.ggml.pre"] == "default"
    assert (fields["tokenizer.ggml.bos_token_id"], fields["tokenizer.ggml.eos_token_id"]) == (1, 2)
    assert fields["tokenizer.ggml.add_bos_token"] is True
    tokens, types = fields["tokenizer.ggml.tokens"], fields["tokenizer.ggml.token_type"]
    assert len(tokens) == len(types) == len(fields["tokenizer.ggml.scores"]) == config["vocab_size"]
    assert types[tokens.index("<0x41>")] == gguf.TokenType.BYTE
    assert types[tokens.index("<s>")] == gguf.TokenType.CONTROL


def test_bpe_metadata(tiny_llama3_dir, tiny_bpe_f32_gguf):
    import gguf

    fields = gguf_fields(tiny_bpe_f32_gguf)
    tokens, types = fields["tokenizer.ggml.tokens"], fields["tokenizer.ggml.token_type"]
    assert fields["tokenizer.ggml.model"] == "gpt2"
    assert fields["tokenizer.ggml.pre"] == "llama-bpe"
    assert len(fields["tokenizer.ggml.merges"]) > 100
    assert types[tokens.index("<|eot_id|>")] == gguf.TokenType.CONTROL
    assert fields["tokenizer.ggml.eos_token_id"] == tokens.index("<|eot_id|>")
    assert fields["tokenizer.ggml.bos_token_id"] == tokens.index("<|begin_of_text|>")


def test_tensors_named_permuted_and_typed_like_llama_cpp(tmp_path, tiny_llama_dir):
    from safetensors.torch import load_file

    out = convert_to_gguf(tiny_llama_dir, tmp_path / "f16.gguf", ConvertOptions(outtype="f16")).output
    tensors = gguf_tensors(out)
    state = {}
    for shard in tiny_llama_dir.glob("*.safetensors"):
        state.update(load_file(str(shard)))
    assert len(tensors) == len(state)
    assert tensors["blk.0.attn_norm.weight"][0] == "F32"
    assert tensors["output_norm.weight"][0] == "F32"
    assert tensors["token_embd.weight"][0] == "F16"
    assert tensors["token_embd.weight"][1] == tuple(state["model.embed_tokens.weight"].shape)
    q = permute_for_rope(state["model.layers.0.self_attn.q_proj.weight"], 4).half().numpy()
    k = permute_for_rope(state["model.layers.0.self_attn.k_proj.weight"], 2).half().numpy()
    assert np.array_equal(tensors["blk.0.attn_q.weight"][2], q)
    assert np.array_equal(tensors["blk.0.attn_k.weight"][2], k)
    v = state["model.layers.0.self_attn.v_proj.weight"].half().numpy()
    assert np.array_equal(tensors["blk.0.attn_v.weight"][2], v)


def test_auto_outtype_and_q8_0(tmp_path, tiny_llama_dir):
    auto = convert_to_gguf(tiny_llama_dir, tmp_path / "auto.gguf")
    assert (auto.outtype, auto.file_type) == ("f16", "MOSTLY_F16")
    q8 = convert_to_gguf(tiny_llama_dir, tmp_path / "q8.gguf", ConvertOptions(outtype="q8_0"))
    types = {name: t for name, (t, _, _) in gguf_tensors(q8.output).items()}
    assert types["blk.0.ffn_down.weight"] == "Q8_0"
    assert types["blk.0.ffn_norm.weight"] == "F32"
    assert q8.bytes_written < auto.bytes_written


def _with_config(source: Path, target: Path, **changes) -> Path:
    model = copy_model(source, target)
    config = json.loads((model / "config.json").read_text())
    config.update(changes)
    (model / "config.json").write_text(json.dumps(config))
    return model


@pytest.mark.parametrize(
    "rope, expected",
    [
        ({"rope_type": "linear", "factor": 4.0, "rope_theta": 10000.0}, {"llama.rope.scaling.type": "linear", "llama.rope.scaling.factor": 4.0}),
        (
            {"rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": 4096, "rope_theta": 500000.0},
            {
                "llama.rope.scaling.type": "yarn",
                "llama.rope.scaling.factor": 4.0,
                "llama.rope.scaling.original_context_length": 4096,
                "llama.rope.freq_base": 500000.0,
            },
        ),
    ],
)
def test_rope_scaling_metadata(tmp_path, tiny_llama_dir, rope, expected):
    model = _with_config(tiny_llama_dir, tmp_path / "model", rope_parameters=rope)
    fields = gguf_fields(convert_to_gguf(model, tmp_path / "vocab.gguf", ConvertOptions(vocab_only=True)).output)
    for key, value in expected.items():
        assert fields[key] == pytest.approx(value) if isinstance(value, float) else fields[key] == value


def test_llama3_rope_writes_rope_freqs_and_still_matches(tmp_path, tiny_llama3_dir):
    rope = {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
            "original_max_position_embeddings": 64, "rope_theta": 500000.0}
    model = _with_config(tiny_llama3_dir, tmp_path / "model", rope_parameters=rope)
    out = convert_to_gguf(model, tmp_path / "m.gguf", ConvertOptions(outtype="f32")).output
    tensors = gguf_tensors(out)
    assert tensors["rope_freqs.weight"][:2] == ("F32", (8,))
    assert float(tensors["rope_freqs.weight"][2].max()) == pytest.approx(8.0)


def test_vocab_only_has_metadata_and_no_tensors(tmp_path, tiny_llama_dir):
    result = convert_to_gguf(tiny_llama_dir, tmp_path / "vocab.gguf", ConvertOptions(vocab_only=True))
    assert result.tensor_count == 0
    assert gguf_tensors(result.output) == {}
    assert gguf_fields(result.output)["tokenizer.ggml.model"] == "llama"


def test_chat_template_is_written_when_the_tokenizer_has_one(tmp_path, tiny_llama3_dir):
    model = copy_model(tiny_llama3_dir, tmp_path / "model")
    config_path = model / "tokenizer_config.json"
    config = json.loads(config_path.read_text())
    config["chat_template"] = "{% for m in messages %}{{ m['content'] }}{% endfor %}"
    config_path.write_text(json.dumps(config))
    fields = gguf_fields(convert_to_gguf(model, tmp_path / "v.gguf", ConvertOptions(vocab_only=True)).output)
    assert fields["tokenizer.chat_template"] == config["chat_template"]


def _fails(model: Path, out: Path, match: str) -> None:
    with pytest.raises(UsageError, match=match):
        convert_to_gguf(model, out)
    assert list(out.parent.glob(f"*{out.name}*")) == []


def test_refuses_unsupported_architecture(tmp_path, tiny_llama_dir):
    model = _with_config(tiny_llama_dir, tmp_path / "model", architectures=["GPT2LMHeadModel"], model_type="gpt2")
    _fails(model, tmp_path / "out" / "x.gguf", "not supported.*LlamaForCausalLM")


def test_refuses_vocab_size_disagreement(tmp_path, tiny_llama_dir):
    model = _with_config(tiny_llama_dir, tmp_path / "model", vocab_size=1234)
    _fails(model, tmp_path / "out" / "x.gguf", r"config.vocab_size \(1234\) differs from the embedding rows")


def test_refuses_conflicting_added_tokens_json(tmp_path, tiny_llama_dir):
    model = copy_model(tiny_llama_dir, tmp_path / "model")
    (model / "added_tokens.json").write_text(json.dumps({"<pad>": 5}))
    _fails(model, tmp_path / "out" / "x.gguf", "added_tokens.json.*id 5")


def test_refuses_missing_tokenizer(tmp_path, tiny_llama_dir):
    model = copy_model(tiny_llama_dir, tmp_path / "model")
    for item in model.glob("tokenizer*"):
        item.unlink()
    _fails(model, tmp_path / "out" / "x.gguf", "no tokenizer")


def test_refuses_truncated_weights(tmp_path, tiny_llama_dir):
    model = copy_model(tiny_llama_dir, tmp_path / "model")
    shard = sorted(model.glob("*.safetensors"))[-1]
    shard.write_bytes(shard.read_bytes()[:-100])
    _fails(model, tmp_path / "out" / "x.gguf", "truncated")


def _resaved(source: Path, target: Path, *, dtype=None, pickle: bool = False) -> Path:
    """A copy of a model whose weights are re-saved (another dtype, or as a pytorch_model.bin pickle)."""
    import torch
    from safetensors.torch import load_file, save_file

    model = copy_model(source, target)
    state = {}
    for shard in sorted(model.glob("*.safetensors")):
        state.update(load_file(str(shard)))
        shard.unlink()
    (model / "model.safetensors.index.json").unlink()
    if dtype is not None:
        state = {name: tensor.to(dtype) for name, tensor in state.items()}
    if pickle:
        torch.save(state, model / "pytorch_model.bin")
    else:
        save_file(state, str(model / "model.safetensors"))
    return model


def test_bf16_checkpoint_converts_to_bf16(tmp_path, tiny_llama_dir):
    import torch

    model = _resaved(tiny_llama_dir, tmp_path / "bf16", dtype=torch.bfloat16)
    result = convert_to_gguf(model, tmp_path / "bf16.gguf")
    assert (result.outtype, result.file_type) == ("bf16", "MOSTLY_BF16")
    assert result.tensor_types == {"F32": 5, "BF16": 16}


def test_pickled_checkpoint_gives_the_same_tensors(tmp_path, tiny_llama_dir, tiny_spm_f32_gguf):
    model = _resaved(tiny_llama_dir, tmp_path / "bin", pickle=True)
    out = convert_to_gguf(model, tmp_path / "bin.gguf", ConvertOptions(outtype="f32")).output
    expected = gguf_tensors(tiny_spm_f32_gguf)
    actual = gguf_tensors(out)
    assert actual.keys() == expected.keys()
    for name, (qtype, shape, data) in actual.items():
        assert (qtype, shape) == expected[name][:2]
        assert np.array_equal(data, expected[name][2]), name


@pytest.fixture(scope="module")
def chinese_llama_2_vocab_gguf(tmp_path_factory, shared_fixtures) -> tuple[Path, Path]:
    """The published 55,296-piece Chinese-LLaMA-2 tokenizer as a vocab-only GGUF (weights are zeros):
    ``(tokenizer.model, GGUF)``."""
    import shutil

    from safetensors.numpy import save_file

    model = tmp_path_factory.mktemp("chinese-llama-2") / "model"
    model.mkdir()
    shutil.copy2(shared_fixtures / "tokenizers/chinese-llama-2/tokenizer.model", model / "tokenizer.model")
    rows, hidden = 55296, 16
    config = {
        "architectures": ["LlamaForCausalLM"], "model_type": "llama", "vocab_size": rows, "hidden_size": hidden,
        "intermediate_size": 32, "num_hidden_layers": 1, "num_attention_heads": 2, "num_key_value_heads": 2,
        "max_position_embeddings": 4096, "rms_norm_eps": 1e-5, "bos_token_id": 1, "eos_token_id": 2,
    }
    (model / "config.json").write_text(json.dumps(config))
    zeros = np.zeros((rows, hidden), dtype=np.float16)
    save_file({"model.embed_tokens.weight": zeros, "lm_head.weight": zeros}, str(model / "model.safetensors"))
    return model / "tokenizer.model", convert_to_gguf(model, model.parent / "vocab.gguf", ConvertOptions(vocab_only=True)).output


def test_chinese_llama_2_vocabulary_tokenizes_in_llama_cpp_like_sentencepiece(chinese_llama_2_vocab_gguf):
    import sentencepiece as spm

    from cnllm.core.llama_loader import open_llama

    tokenizer_model, out = chinese_llama_2_vocab_gguf
    sp = spm.SentencePieceProcessor(model_file=str(tokenizer_model))
    llm = open_llama(out, vocab_only=True, verbose=False)
    try:
        for text in TEXTS.values():
            assert llm.tokenize(text.encode(), add_bos=False, special=False) == sp.encode(text), text
    finally:
        llm.close()


def test_tokenizer_model_rebuilt_from_the_gguf_tokenizes_like_the_published_one(chinese_llama_2_vocab_gguf):
    """What gguf-to-hf writes as tokenizer.model for a SentencePiece GGUF, on the real Chinese-LLaMA-2 vocabulary."""
    import sentencepiece as spm

    from cnllm.core.gguf.to_hf import sentencepiece_model

    tokenizer_model, out = chinese_llama_2_vocab_gguf
    published = spm.SentencePieceProcessor(model_file=str(tokenizer_model))
    rebuilt = spm.SentencePieceProcessor(model_proto=sentencepiece_model(out))
    assert rebuilt.vocab_size() == published.vocab_size() == 55296
    assert [rebuilt.bos_id(), rebuilt.eos_id(), rebuilt.unk_id()] == [published.bos_id(), published.eos_id(), published.unk_id()]
    for text in TEXTS.values():
        assert rebuilt.encode(text) == published.encode(text), text
        assert rebuilt.decode(published.encode(text)) == published.decode(published.encode(text))


def test_sentencepiece_tokenizer_json_without_tokenizer_model_is_refused(tmp_path, tiny_llama_dir):
    model = copy_model(tiny_llama_dir, tmp_path / "model")
    (model / "tokenizer.model").unlink()
    _fails(model, tmp_path / "out" / "x.gguf", "no tokenizer.model")
