"""New embedding rows for a merged vocabulary (:mod:`cnllm.core.embeddings`), on the tiny models: which base pieces
each new token splits into, the rows each method writes (tied and untied, padding, special tokens, empty
decompositions), that the base model is untouched, and the errors for a tokenizer that does not belong."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from cnllm.core.embeddings import (
    NewRows,
    check_extends,
    decompose_new_tokens,
    extend_model,
    fill_new_rows,
    load_base_tokenizer,
    resize_and_fill,
)
from cnllm.core.errors import UsageError
from cnllm.core.modelio import load_tokenizer
from cnllm.core.tiny import asset


@pytest.fixture(scope="module")
def zh_model(tmp_path_factory) -> Path:
    from cnllm.core.tokenizers.train import TrainVocabOptions, train_vocab

    return train_vocab([asset("zh.txt")], tmp_path_factory.mktemp("zh") / "zh.model", TrainVocabOptions(vocab_size=2000)).output


@pytest.fixture(scope="module")
def merged_spm(tmp_path_factory, spm_tokenizer_dir, zh_model) -> Path:
    """The tiny SentencePiece tokenizer + 2,000 Chinese pieces, a <pad> special token, padded to a multiple of 64."""
    from cnllm.core.tokenizers.merge import MergeVocabOptions, merge_vocab

    options = MergeVocabOptions(add_pad_token=True, pad_to_multiple_of=64)
    return merge_vocab(spm_tokenizer_dir, [zh_model], tmp_path_factory.mktemp("merged-spm") / "tok", options).output


@pytest.fixture(scope="module")
def merged_bpe(tmp_path_factory, bpe_tokenizer_dir, zh_model) -> Path:
    """The tiny Llama-3-style byte-level BPE tokenizer extended with the Chinese pieces."""
    from cnllm.core.tokenizers.merge import merge_vocab

    return merge_vocab(bpe_tokenizer_dir, [zh_model], tmp_path_factory.mktemp("merged-bpe") / "tok").output


def _model(path: Path):
    import torch
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(str(path), dtype=torch.float32)


def _text(tokenizer, ids: list[int]) -> str:
    return tokenizer.convert_tokens_to_string(tokenizer.convert_ids_to_tokens(ids))


@pytest.mark.parametrize("which", ["spm", "bpe"])
def test_each_new_token_splits_into_base_pieces_that_spell_it(request, which):
    base_dir = request.getfixturevalue("spm_tokenizer_dir" if which == "spm" else "bpe_tokenizer_dir")
    base, merged = load_tokenizer(base_dir), load_tokenizer(request.getfixturevalue(f"merged_{which}"))
    plan = decompose_new_tokens(base, merged, check_extends(base, merged, base_name="base", name="merged"))
    assert plan.added == len(merged) - len(base) and len(plan.pieces) > 500
    assert all(i < len(base) for ids in plan.pieces.values() for i in ids)
    for token_id, ids in plan.pieces.items():
        assert _text(base, ids) == _text(merged, [token_id]), merged.convert_ids_to_tokens(token_id)
    assert max(len(ids) for ids in plan.pieces.values()) > 1  # real decompositions, not one-to-one copies


def test_byte_fallback_pieces_and_added_text_tokens_decompose(spm_tokenizer_dir, merged_spm, tmp_path):
    base = load_tokenizer(spm_tokenizer_dir)
    merged = load_tokenizer(merged_spm)
    merged.add_tokens(["中华人民"])  # a token added as text (not a vocabulary piece)
    plan = decompose_new_tokens(base, merged, len(base))
    added = merged.convert_tokens_to_ids("中华人民")
    assert _text(base, plan.pieces[added]) == "中华人民"
    # a character the English base has never seen splits into its UTF-8 byte pieces
    bytes_only = {t: ids for t, ids in plan.pieces.items() if all(base.convert_ids_to_tokens(i).startswith("<0x") for i in ids)}
    assert bytes_only and all(len(ids) == len(_text(merged, [t]).encode("utf-8")) for t, ids in bytes_only.items())
    pad = merged.convert_tokens_to_ids("<pad>")
    assert pad in plan.fallback and plan.reasons["special"] >= 1


def test_a_token_the_base_cannot_split_starts_at_the_mean():
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    def word_level(words: list[str]):
        backend = Tokenizer(models.WordLevel({w: i for i, w in enumerate(words)}, unk_token="<unk>"))
        backend.pre_tokenizer = pre_tokenizers.Whitespace()
        return PreTrainedTokenizerFast(tokenizer_object=backend, unk_token="<unk>")

    base, merged = word_level(["<unk>", "a", "b"]), word_level(["<unk>", "a", "b", "c", "ab"])
    plan = decompose_new_tokens(base, merged, 3)
    assert plan.pieces == {} and plan.fallback == [3, 4] and plan.reasons == {"empty": 2}


@pytest.mark.parametrize("tied", [False, True])
def test_subword_mean_rows_are_the_mean_of_their_pieces_rows(request, tied, spm_tokenizer_dir, merged_spm):
    import torch

    model = _model(request.getfixturevalue("tiny_tied_llama_dir" if tied else "tiny_llama_dir"))
    base_in = model.get_input_embeddings().weight.detach().clone()
    base_out = model.get_output_embeddings().weight.detach().clone()
    base, merged = load_tokenizer(spm_tokenizer_dir), load_tokenizer(merged_spm)
    before, after, plan = resize_and_fill(model, merged, base, "subword-mean", multiple=64)
    assert (before, after) == (1000, len(merged)) and after % 64 == 0  # the merge padded the tokenizer itself
    emb, head = model.get_input_embeddings().weight, model.get_output_embeddings().weight
    assert (emb.data_ptr() == head.data_ptr()) is tied
    assert torch.equal(emb[:1000], base_in) and torch.equal(head[:1000], base_out)  # the base rows are untouched
    for token_id, ids in list(plan.pieces.items())[:200]:
        assert torch.allclose(emb[token_id], base_in[ids].mean(0), atol=1e-6)
        assert torch.allclose(head[token_id], base_out[ids].mean(0), atol=1e-6)
    for token_id in plan.fallback:  # <pad> and the padding pieces
        assert torch.allclose(emb[token_id], base_in.mean(0), atol=1e-6)
        assert torch.allclose(head[token_id], base_out.mean(0), atol=1e-6)


def test_mean_rows_and_padding_rows_past_the_tokenizer(tiny_llama_dir, spm_tokenizer_dir, merged_bpe, bpe_tokenizer_dir, tiny_llama3_dir):
    import torch

    model = _model(tiny_llama3_dir)
    base_rows = model.get_input_embeddings().weight.shape[0]
    base_in = model.get_input_embeddings().weight.detach().clone()
    merged = load_tokenizer(merged_bpe)
    assert len(merged) % 64 != 0
    before, after, plan = resize_and_fill(model, merged, load_tokenizer(bpe_tokenizer_dir), "mean", multiple=64)
    assert before == base_rows and after == -(-len(merged) // 64) * 64
    emb = model.get_input_embeddings().weight
    assert torch.allclose(emb[base_rows:], base_in.mean(0).expand(after - base_rows, -1), atol=1e-6)
    assert model.config.vocab_size == after

    model = _model(tiny_llama3_dir)
    _, _, plan = resize_and_fill(model, merged, load_tokenizer(bpe_tokenizer_dir), "subword-mean", multiple=64)
    emb = model.get_input_embeddings().weight
    assert torch.allclose(emb[len(merged):], base_in.mean(0).expand(after - len(merged), -1), atol=1e-6)  # padding rows
    assert not torch.allclose(emb[base_rows], base_in.mean(0))


def test_rows_a_padded_model_had_past_its_tokenizer_are_initialised_too(spm_tokenizer_dir, merged_spm, tiny_llama_dir):
    """A model with more rows than its tokenizer (e.g. 32,064 for 32,000) never trained those rows: new tokens there
    get their subword mean, not the leftover values."""
    import torch

    model = _model(tiny_llama_dir)
    model.resize_token_embeddings(1024, mean_resizing=False)
    with torch.no_grad():
        model.get_input_embeddings().weight[1000:] = 99.0
    base, merged = load_tokenizer(spm_tokenizer_dir), load_tokenizer(merged_spm)
    _, _, plan = resize_and_fill(model, merged, base, "subword-mean", multiple=64)
    emb = model.get_input_embeddings().weight
    assert plan.base_size == 1000 and float(emb[1000:].detach().abs().max()) < 50


def test_the_extended_model_reads_english_as_the_base_did(tiny_llama_dir, spm_tokenizer_dir, merged_spm):
    """English text encodes to the same ids, and the base vocabulary's logits on it do not change."""
    import torch

    base, merged = load_tokenizer(spm_tokenizer_dir), load_tokenizer(merged_spm)
    english = asset("en.txt").read_text(encoding="utf-8")[:2000]
    ids = base(english)["input_ids"]
    assert merged(english)["input_ids"] == ids
    reference, extended = _model(tiny_llama_dir), _model(tiny_llama_dir)
    resize_and_fill(extended, merged, base, "subword-mean", multiple=64)
    with torch.no_grad():
        before = reference(torch.tensor([ids[:128]])).logits
        after = extended(torch.tensor([ids[:128]])).logits
    assert torch.allclose(after[..., :1000], before, atol=1e-5)


def test_a_tokenizer_that_does_not_extend_the_base_is_refused(spm_tokenizer_dir, bpe_tokenizer_dir, merged_spm):
    with pytest.raises(UsageError, match=r"the tokenizer M does not extend the base tokenizer B: id \d+ is .* there but"):
        check_extends(load_tokenizer(bpe_tokenizer_dir), load_tokenizer(merged_spm), base_name="B", name="M")
    with pytest.raises(UsageError, match="fewer than the base tokenizer B"):
        check_extends(load_tokenizer(merged_spm), load_tokenizer(spm_tokenizer_dir), base_name="B", name="M")


def test_the_base_tokenizer_must_be_in_the_model_folder_for_subword_mean(tmp_path):
    with pytest.raises(UsageError, match=r"has no tokenizer .*--new-row-init mean"):
        load_base_tokenizer(tmp_path, "subword-mean")
    assert load_base_tokenizer(tmp_path, "mean") is None


def test_a_base_tokenizer_larger_than_the_model_is_refused(tiny_llama_dir, merged_spm):
    model = _model(tiny_llama_dir)
    merged = load_tokenizer(merged_spm)
    with pytest.raises(UsageError, match=r"the base tokenizer of M has \d+ tokens but the model only 1000 embedding rows"):
        resize_and_fill(model, merged, merged, "subword-mean", multiple=64, base_name="M")


def test_unknown_method_is_refused():
    with pytest.raises(UsageError, match="--new-row-init 'zero' is not one of subword-mean, mean"):
        fill_new_rows(None, NewRows(1, 2), "zero")


def test_extend_model_writes_a_loadable_model_with_provenance(tiny_llama_dir, merged_spm, tmp_path):
    import torch

    out = tmp_path / "step0"
    result = extend_model(tiny_llama_dir, merged_spm, out)
    model = _model(out)
    tokenizer = load_tokenizer(out)
    assert model.get_input_embeddings().weight.shape[0] == result.rows == len(tokenizer) == model.config.vocab_size
    record = json.loads((out / "cnllm-extend-model.json").read_text(encoding="utf-8"))
    assert record["options"]["new_row_init"] == "subword-mean" and record["results"]["new_rows"]["decomposed"] > 500
    reference = _model(tiny_llama_dir)
    assert torch.equal(model.get_input_embeddings().weight[:1000], reference.get_input_embeddings().weight)
    with pytest.raises(UsageError, match="already exists"):
        extend_model(tiny_llama_dir, merged_spm, out)
    with pytest.raises(UsageError, match="adds no tokens"):
        extend_model(tiny_llama_dir, tiny_llama_dir, tmp_path / "same")
    assert not (tmp_path / "same").exists()
