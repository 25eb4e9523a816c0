"""The fixtures every later test stands on: check they are what tests/assets/README.md says."""

import json

import pytest

from cnllm.core.tokenizers.spm import load_proto
from tests.conftest import read_vectors

SAMPLES = ["Hello world", " leading space", "The year 2026 has 365 days.", "中文和English混合", "emoji 🦙 ok", "  two  spaces\nnew line"]


def test_spm_tokenizer_has_llama_settings(spm_tokenizer_dir):
    proto = load_proto(spm_tokenizer_dir / "tokenizer.model")
    spec = proto.trainer_spec
    assert (spec.model_type, spec.byte_fallback, spec.split_digits) == (2, True, True)  # 2 = BPE
    assert [proto.pieces[i].piece for i in range(3)] == ["<unk>", "<s>", "</s>"]
    assert proto.normalizer_spec.name == "identity" and not proto.normalizer_spec.remove_extra_whitespaces
    assert 900 <= len(proto.pieces) <= 2000


def test_hf_tokenizer_reproduces_sentencepiece(spm_tokenizer_dir, assets):
    import sentencepiece as spm
    from transformers import AutoTokenizer

    sp = spm.SentencePieceProcessor(model_file=str(spm_tokenizer_dir / "tokenizer.model"))
    hf = AutoTokenizer.from_pretrained(spm_tokenizer_dir)
    texts = SAMPLES + (assets / "en.txt").read_text(encoding="utf-8").splitlines()[:40] + (assets / "zh.txt").read_text(encoding="utf-8").splitlines()[:10]
    for text in texts:
        assert hf.encode(text, add_special_tokens=False) == sp.encode(text), text
        assert hf.decode(sp.encode(text)) == sp.decode(sp.encode(text))
    assert hf("Hi").input_ids[0] == 1


def test_hf_export_matches_llama_vectors(shared_fixtures, tmp_path):
    from transformers import AutoTokenizer

    from cnllm.core.tokenizers.hf_export import write_spm_tokenizer_dir

    folder = shared_fixtures / "tokenizers" / "llama2-spm"
    write_spm_tokenizer_dir(load_proto(folder / "tokenizer.model"), tmp_path)
    hf = AutoTokenizer.from_pretrained(tmp_path)
    vectors = read_vectors(folder)
    assert len(vectors) >= 46
    for text, ids in vectors:
        assert hf.encode(text, add_special_tokens=False) == ids, repr(text)


def test_tiny_llama_is_sharded_and_sized_to_its_tokenizer(tiny_llama_dir):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    index = json.loads((tiny_llama_dir / "model.safetensors.index.json").read_text())
    assert len(set(index["weight_map"].values())) > 1
    tokenizer = AutoTokenizer.from_pretrained(tiny_llama_dir)
    model = AutoModelForCausalLM.from_pretrained(tiny_llama_dir)
    config = model.config
    assert (config.hidden_size, config.num_hidden_layers, config.num_attention_heads, config.num_key_value_heads) == (64, 2, 4, 2)
    assert config.vocab_size == len(tokenizer) == model.get_input_embeddings().weight.shape[0]


@pytest.mark.parametrize("fixture", ["tiny_llama_dir", "tiny_llama3_dir"])
def test_tiny_models_are_deterministic_and_run(fixture, request, tmp_path):
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from cnllm.core.tiny import build_tiny_llama

    model_dir = request.getfixturevalue(fixture)
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    again = build_tiny_llama(tmp_path / "again", model_dir)
    ids = tokenizer("Hello world", return_tensors="pt").input_ids
    with torch.no_grad():
        first = AutoModelForCausalLM.from_pretrained(model_dir)(ids).logits
        second = AutoModelForCausalLM.from_pretrained(again)(ids).logits
    assert torch.equal(first, second)
    assert first.shape[-1] == len(tokenizer)


def test_bpe_tokenizer_is_llama3_style(bpe_tokenizer_dir):
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(bpe_tokenizer_dir)
    data = json.loads((bpe_tokenizer_dir / "tokenizer.json").read_text())
    assert data["pre_tokenizer"]["pretokenizers"][0]["type"] == "Split"
    assert tokenizer.convert_ids_to_tokens(tokenizer("Hi").input_ids[0]) == "<|begin_of_text|>"
    for text in SAMPLES:
        assert tokenizer.decode(tokenizer.encode(text, add_special_tokens=False)) == text
    assert tokenizer.convert_tokens_to_ids("<|eot_id|>") == len(tokenizer) - 1
