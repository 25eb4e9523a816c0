"""Tied input/output embeddings (SmolLM2, Llama-3.2-1B) through pt, merge-lora, diff-recover and convert-gguf.

A merge unties them only when training made them differ (``lm_head.weight`` written,
``tie_word_embeddings`` false); otherwise the model stays tied, as it came.
"""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from cnllm.core.tensors import iter_tensors, tensor_infos
from cnllm.core.tiny import asset
from tests.commands.test_pt import TINY_RUN
from tests.core.gguf.util import gguf_tensors
from tests.core.training.conftest import one_torch_thread  # noqa: F401  (fixture)
from tests.lora_fixtures import build_adapter, extend_tokenizer, model_logits, peft_logits

pytestmark = pytest.mark.filterwarnings("ignore::UserWarning", "ignore::FutureWarning")
EMBEDDINGS = ["embed_tokens", "lm_head"]


@pytest.fixture(scope="module")
def untying_adapter(tmp_path_factory, tiny_tied_llama_dir):
    """LoRA plus embed_tokens and lm_head trained apart, on a vocabulary extended by 24 tokens."""
    root = tmp_path_factory.mktemp("untying")
    tokenizer = extend_tokenizer(tiny_tied_llama_dir, root / "tokenizer", 24)
    return build_adapter(tiny_tied_llama_dir, root / "adapter", vocab=1024, modules_to_save=EMBEDDINGS, tokenizer_dir=tokenizer)


@pytest.fixture(scope="module")
def lora_only(tmp_path_factory, tiny_tied_llama_dir):
    return build_adapter(tiny_tied_llama_dir, tmp_path_factory.mktemp("lora-only") / "adapter")


def _config(model_dir) -> dict:
    return json.loads((model_dir / "config.json").read_text())


def test_trained_apart_embeddings_are_untied_and_match_peft(cli, tmp_path, tiny_tied_llama_dir, untying_adapter):
    out = tmp_path / "merged"
    result = cli("merge-lora", "--base", tiny_tied_llama_dir, "--lora", untying_adapter, "-o", out, "--verify", "--json")
    assert result.exit_code == 0, result.stderr
    document = json.loads(result.stdout)
    assert document["verify"]["passed"] and any("tie_word_embeddings false" in note for note in document["notes"])
    assert "lm_head.weight" in tensor_infos(out) and _config(out)["tie_word_embeddings"] is False
    assert torch.allclose(model_logits(out), peft_logits(tiny_tied_llama_dir, [untying_adapter]), atol=1e-4)


def test_lora_only_adapter_keeps_the_model_tied(cli, tmp_path, tiny_tied_llama_dir, lora_only):
    out = tmp_path / "merged"
    result = cli("merge-lora", "--base", tiny_tied_llama_dir, "--lora", lora_only, "-o", out, "--verify", "--json")
    assert result.exit_code == 0, result.stderr
    assert json.loads(result.stdout)["verify"]["passed"]
    assert "lm_head.weight" not in tensor_infos(out) and _config(out)["tie_word_embeddings"] is True


def test_two_adapters_in_order(cli, tmp_path, tiny_tied_llama_dir, untying_adapter):
    from cnllm.core.merge import merge_lora

    first = merge_lora(tiny_tied_llama_dir, [untying_adapter], tmp_path / "first").output
    second = build_adapter(first, tmp_path / "second", seed=7)
    out = tmp_path / "merged"
    result = cli("merge-lora", "-b", tiny_tied_llama_dir, "-l", untying_adapter, "-l", second, "-o", out, "--verify", "--json")
    assert result.exit_code == 0, result.stderr
    assert json.loads(result.stdout)["verify"]["passed"]
    assert torch.allclose(model_logits(out), peft_logits(first, [second]), atol=1e-4)


@pytest.mark.parametrize("untied", [True, False])
def test_meta_pth_always_has_its_output_embedding(cli, tmp_path, tiny_tied_llama_dir, untying_adapter, lora_only, untied):
    out = tmp_path / "pth"
    result = cli("merge-lora", "-b", tiny_tied_llama_dir, "-l", untying_adapter if untied else lora_only, "-o", out, "--format", "pth")
    assert result.exit_code == 0, result.stderr
    state = torch.load(out / "consolidated.00.pth", weights_only=True)
    assert state["output.weight"].shape == state["tok_embeddings.weight"].shape
    assert torch.equal(state["output.weight"], state["tok_embeddings.weight"]) is not untied


def test_make_diff_and_recover_an_untied_model(cli, tmp_path, tiny_tied_llama_dir, untying_adapter):
    from cnllm.core.merge import merge_lora

    tuned = merge_lora(tiny_tied_llama_dir, [untying_adapter], tmp_path / "tuned").output
    made = cli("diff-recover", "--make-diff", "--base", tiny_tied_llama_dir, "--tuned", tuned, "-o", tmp_path / "diff")
    assert made.exit_code == 0, made.stderr
    result = cli("diff-recover", "--base", tiny_tied_llama_dir, "--diff", tmp_path / "diff", "-o", tmp_path / "out", "--reference", tuned, "--json")
    assert result.exit_code == 0, result.stderr
    assert json.loads(result.stdout)["reference"]["max_abs_diff"] == 0.0
    expected, actual = dict(iter_tensors(tuned)), dict(iter_tensors(tmp_path / "out"))
    assert expected.keys() == actual.keys() and all(torch.equal(expected[n], actual[n]) for n in expected)
    assert _config(tmp_path / "out")["tie_word_embeddings"] is False


def _llama_cpp_logits(path, ids):
    from cnllm.core.llama_loader import open_llama

    llm = open_llama(path, logits_all=True, verbose=False, n_ctx=64, n_threads=1)
    try:
        llm.eval(ids)
        return np.asarray(llm.scores[: len(ids)])
    finally:
        llm.close()


@pytest.mark.parametrize("untied", [False, True])
def test_convert_gguf_computes_what_transformers_does(cli, tmp_path, tiny_tied_llama_dir, untied):
    from cnllm.core.merge import merge_lora

    adapter = build_adapter(tiny_tied_llama_dir, tmp_path / "adapter", modules_to_save=EMBEDDINGS)
    model = merge_lora(tiny_tied_llama_dir, [adapter], tmp_path / "merged").output if untied else tiny_tied_llama_dir
    result = cli("convert-gguf", model, "-o", tmp_path / "m.gguf", "--outtype", "f32")
    assert result.exit_code == 0, result.stderr
    assert ("output.weight" in gguf_tensors(tmp_path / "m.gguf")) is untied
    ids = [1, 17, 42, 311, 7, 99, 512, 3, 250, 64]
    expected = model_logits(model, ids)[0].numpy()
    assert np.abs(_llama_cpp_logits(tmp_path / "m.gguf", ids) - expected).max() < 1e-3


def test_pt_with_trainable_embeddings_then_merge_verifies(cli, tmp_path, tiny_tied_llama_dir, untying_adapter):
    tokenizer = untying_adapter.parent / "tokenizer"
    out = tmp_path / "pt"
    trained = cli("pt", "-m", tiny_tied_llama_dir, "--tokenizer", tokenizer, "-d", asset("zh.txt"), "-o", out, "--train-embeddings",
                  "--max-steps", "2", "--cache-dir", tmp_path / "cache", *TINY_RUN)
    assert trained.exit_code == 0, trained.stderr
    merged = cli("merge-lora", "-b", tiny_tied_llama_dir, "-l", out, "-o", tmp_path / "merged", "--verify", "--json")
    assert merged.exit_code == 0, merged.stderr
    assert json.loads(merged.stdout)["verify"]["passed"] and _config(tmp_path / "merged")["tie_word_embeddings"] is False
