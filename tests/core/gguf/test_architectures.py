"""convert-gguf reads every family from the architecture table: byte-identical to llama.cpp's reference converter on
tiny LLaMA, Mistral and Qwen2 models (test_convert.py's ``converted`` models show llama.cpp computing what transformers
computes on each)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from cnllm.core.architectures import (
    ARCHITECTURES,
    LLAMA,
    MISTRAL,
    QWEN2,
    find_architecture,
    require_architecture,
    ties_by_default,
)
from cnllm.core.errors import UsageError
from cnllm.core.gguf.convert import ConvertOptions, convert_to_gguf
from tests.conftest import run_reference_converter
from tests.core.gguf.util import gguf_fields, gguf_tensors


@pytest.fixture(scope="session")
def tiny_qwen2_spm_dir(tmp_path_factory, spm_tokenizer_dir) -> Path:
    """A tied Qwen2 with the SentencePiece tokenizer: the reference converter names a byte-level BPE pre-tokenizer
    by hashing known vocabularies, so a tokenizer trained here is one it refuses; SentencePiece it takes as it is.
    Its tokenizer_config says ``add_prefix_space: false``, as Qwen2's does."""
    import json

    from cnllm.core.tiny import build_tiny_llama

    model = build_tiny_llama(tmp_path_factory.mktemp("tiny-qwen2-spm"), spm_tokenizer_dir, architecture="qwen2", tie_word_embeddings=True)
    settings = json.loads((model / "tokenizer_config.json").read_text())
    # Qwen2's own tokenizer_config says this; the reference's Qwen2 class (unlike its LLaMA one) does not copy it
    (model / "tokenizer_config.json").write_text(json.dumps({**settings, "add_prefix_space": False}))
    return model


MODELS = {
    "llama": "tiny_llama_dir",
    "llama-tied": "tiny_tied_llama_dir",
    "mistral": "tiny_mistral_dir",
    "qwen2-tied": "tiny_qwen2_spm_dir",
}


@pytest.mark.parametrize("outtype", ["f16", "f32"])
@pytest.mark.parametrize("model", list(MODELS))
def test_byte_identical_to_the_reference_converter(request, tmp_path, llamacpp_reference, model, outtype):
    model_dir = request.getfixturevalue(MODELS[model])
    ours = convert_to_gguf(model_dir, tmp_path / "ours.gguf", ConvertOptions(outtype=outtype)).output
    theirs = run_reference_converter(llamacpp_reference, model_dir, tmp_path / "theirs.gguf", outtype)
    assert ours.read_bytes() == theirs.read_bytes()


@pytest.mark.slow
def test_qwen2_with_its_real_vocabulary_is_byte_identical(tmp_path, llamacpp_reference):
    """Byte-level BPE too: Qwen2's 151,936-token vocabulary (llama.cpp's models/ggml-vocab-qwen2.gguf, which the
    reference recognises by its hash) with Qwen2.5's tokenizer settings, ChatML template, tied embeddings."""
    import json

    from transformers import AutoTokenizer

    from cnllm.core.tiny import build_tiny_llama

    vocab = llamacpp_reference / "models" / "ggml-vocab-qwen2.gguf"
    if not vocab.is_file():
        pytest.skip(f"{vocab} is not in this copy of the reference")
    tokenizer_dir = tmp_path / "tokenizer"
    AutoTokenizer.from_pretrained(str(vocab.parent), gguf_file=vocab.name).save_pretrained(str(tokenizer_dir))
    settings = json.loads((tokenizer_dir / "tokenizer_config.json").read_text())
    qwen25 = {"add_bos_token": False, "add_prefix_space": False, "bos_token": None, "eos_token": "<|im_end|>", "pad_token": "<|endoftext|>"}
    (tokenizer_dir / "tokenizer_config.json").write_text(json.dumps({**settings, **qwen25}))
    model = build_tiny_llama(tmp_path / "qwen2", tokenizer_dir, architecture="qwen2", tie_word_embeddings=True, hidden_size=32,
                             intermediate_size=64, heads=2, kv_heads=1, max_shard_size="2GB")
    ours = convert_to_gguf(model, tmp_path / "ours.gguf", ConvertOptions(outtype="f16")).output
    theirs = run_reference_converter(llamacpp_reference, model, tmp_path / "theirs.gguf")
    assert gguf_fields(ours)["tokenizer.ggml.pre"] == "qwen2" and "tokenizer.chat_template" in gguf_fields(ours)
    assert ours.read_bytes() == theirs.read_bytes()


def test_qwen2_keeps_its_biases_unpermuted_and_its_tied_embedding(tmp_path, tiny_qwen2_dir):
    from safetensors.torch import load_file

    gguf_path = convert_to_gguf(tiny_qwen2_dir, tmp_path / "q.gguf", ConvertOptions(outtype="f32")).output
    fields, tensors = gguf_fields(gguf_path), gguf_tensors(gguf_path)
    assert fields["general.architecture"] == "qwen2" and fields["tokenizer.ggml.pre"] == "qwen2"
    assert "qwen2.vocab_size" not in fields and "qwen2.rope.dimension_count" not in fields  # the reference writes neither
    assert "output.weight" not in tensors  # llama.cpp reads the tied output embedding from token_embd
    weights = {}
    for shard in tiny_qwen2_dir.glob("*.safetensors"):
        weights.update(load_file(shard))
    for part in ("q", "k", "v"):
        name = f"model.layers.0.self_attn.{part}_proj"
        assert np.array_equal(tensors[f"blk.0.attn_{part}.weight"][2], weights[f"{name}.weight"].numpy())
        assert np.array_equal(tensors[f"blk.0.attn_{part}.bias"][2], weights[f"{name}.bias"].numpy())


def test_mistral_is_written_as_llama(tmp_path, tiny_mistral_dir):
    fields = gguf_fields(convert_to_gguf(tiny_mistral_dir, tmp_path / "m.gguf", ConvertOptions(vocab_only=True)).output)
    assert fields["general.architecture"] == "llama" and fields["llama.vocab_size"] == 1000
    assert not any("sliding_window" in key for key in fields)  # llama.cpp attends to the whole context, as the reference writes


def test_rows_are_found_by_class_then_model_type():
    assert find_architecture({"architectures": ["Qwen2ForCausalLM"]}) is QWEN2
    assert find_architecture({"model_type": "mistral"}) is MISTRAL
    assert find_architecture({"architectures": ["LLaMAForCausalLM"], "model_type": "whatever"}) is LLAMA
    assert find_architecture({"architectures": ["GPT2LMHeadModel"], "model_type": "llama"}) is None
    with pytest.raises(UsageError, match="GPT2LMHeadModel is not supported by convert-gguf; supported: LlamaForCausalLM, .*Qwen2ForCausalLM"):
        require_architecture({"architectures": ["GPT2LMHeadModel"]}, "model", "convert-gguf")
    assert len({row.model_type for row in ARCHITECTURES}) == len(ARCHITECTURES)


def test_tied_embedding_rule():
    assert ties_by_default({"model_type": "qwen2"}) is False
    assert ties_by_default({"model_type": "qwen2", "tie_word_embeddings": True}) is True
    assert ties_by_default({"model_type": "gpt2"}) is False
