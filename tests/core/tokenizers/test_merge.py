"""SentencePiece merges: base untouched, new pieces appended, exported tokenizer.json equal to sentencepiece."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import sentencepiece as spm
from tokenizers import Tokenizer

from cnllm.core.errors import OutputExistsError, UsageError
from cnllm.core.provenance import read_record
from cnllm.core.tokenizers.merge import MergeVocabOptions, merge_vocab, unused_names
from cnllm.core.tokenizers.spm import PIECE_CONTROL, PIECE_UNUSED, load_proto
from cnllm.core.tokenizers.train import TrainVocabOptions
from tests.conftest import read_vectors
from tests.core.tokenizers.conftest import sample_texts


def disagreements(directory: Path, texts: list[str]) -> list[str]:
    processor = spm.SentencePieceProcessor(model_file=str(directory / "tokenizer.model"))
    fast = Tokenizer.from_file(str(directory / "tokenizer.json"))
    return [t for t in texts if processor.encode(t) != fast.encode(t, add_special_tokens=False).ids]


def test_base_pieces_ids_and_specials_unchanged(spm_tokenizer_dir, zh_spm_model, merged_spm_dir):
    base = load_proto(spm_tokenizer_dir / "tokenizer.model")
    merged = load_proto(merged_spm_dir / "tokenizer.model")
    add = load_proto(zh_spm_model)
    n = len(base.pieces)
    assert [(p.piece, p.score, p.type) for p in merged.pieces[:n]] == [(p.piece, p.score, p.type) for p in base.pieces]
    assert merged.normalizer_spec == base.normalizer_spec and merged.trainer_spec == base.trainer_spec
    pieces = [p.piece for p in merged.pieces]
    assert len(pieces) == len(set(pieces))
    base_set = {p.piece for p in base.pieces}
    expected_new = [p.piece for p in add.pieces if p.type == 1 and p.piece not in base_set]
    assert pieces[n:] == expected_new and expected_new
    new_scores = [p.score for p in merged.pieces[n:]]
    assert min(new_scores) > max(p.score for p in base.pieces)
    assert new_scores == sorted(new_scores, reverse=True) and len(set(new_scores)) == len(new_scores)


def test_exported_tokenizer_matches_sentencepiece(merged_spm_dir, assets):
    texts = sample_texts(assets)
    assert disagreements(merged_spm_dir, texts) == []


def test_round_trip_and_transformers_load(merged_spm_dir, assets):
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(str(merged_spm_dir))
    merged = load_proto(merged_spm_dir / "tokenizer.model")
    assert len(tokenizer) == len(merged.pieces)
    assert (tokenizer.unk_token_id, tokenizer.bos_token_id, tokenizer.eos_token_id) == (0, 1, 2)
    for text in ["中文和English混合", "今天天气很好。", "Hello, world!", "表情 🦙🚀 emoji"]:
        ids = tokenizer(text, add_special_tokens=False)["input_ids"]
        assert tokenizer.decode(ids) == text
    record = read_record(merged_spm_dir, "vocab")
    assert record["results"]["final_size"] == len(merged.pieces)
    assert all(len(i["sha256"]) == 64 for i in record["inputs"])


def test_merge_shortens_chinese(spm_tokenizer_dir, merged_spm_dir, assets):
    base = spm.SentencePieceProcessor(model_file=str(spm_tokenizer_dir / "tokenizer.model"))
    merged = spm.SentencePieceProcessor(model_file=str(merged_spm_dir / "tokenizer.model"))
    text = (assets / "zh_heldout.txt").read_text(encoding="utf-8")
    assert len(merged.encode(text)) < 0.6 * len(base.encode(text))


def test_zero_scores_reproduce_published_method(spm_tokenizer_dir, zh_spm_model, tmp_path):
    result = merge_vocab(spm_tokenizer_dir, [zh_spm_model], tmp_path / "out", MergeVocabOptions(scores="zero"))
    merged = load_proto(tmp_path / "out" / "tokenizer.model")
    base_size = len(load_proto(spm_tokenizer_dir / "tokenizer.model").pieces)
    assert all(p.score == 0.0 for p in merged.pieces[base_size:])
    assert result.warnings and "--scores zero" in result.warnings[0]


def test_pad_token_and_padding(spm_tokenizer_dir, zh_spm_model, tmp_path, assets):
    from transformers import AutoTokenizer

    result = merge_vocab(spm_tokenizer_dir, [zh_spm_model], tmp_path / "out", MergeVocabOptions(add_pad_token=True, pad_to_multiple_of=64))
    merged = load_proto(tmp_path / "out" / "tokenizer.model")
    base_size = len(load_proto(spm_tokenizer_dir / "tokenizer.model").pieces)
    assert len(merged.pieces) % 64 == 0 and result.final_size == len(merged.pieces)
    assert result.pad_token_id == base_size
    assert (merged.pieces[base_size].piece, merged.pieces[base_size].type) == ("<pad>", PIECE_CONTROL)
    unused = [i for i, p in enumerate(merged.pieces) if p.type == PIECE_UNUSED]
    assert len(unused) == result.padding > 0 and unused[0] == len(merged.pieces) - result.padding
    # Neither runtime ever produces an unused piece, and they still agree.
    assert disagreements(tmp_path / "out", sample_texts(assets)) == []
    tokenizer = AutoTokenizer.from_pretrained(str(tmp_path / "out"))
    assert tokenizer.pad_token == "<pad>" and tokenizer.pad_token_id == base_size and len(tokenizer) == len(merged.pieces)
    text = "<unused0> 天气很好"
    assert not set(tokenizer(text, add_special_tokens=False)["input_ids"]) & set(unused)


def test_unused_names_cannot_be_formed():
    taken = {"<unused0>", "<unused", "1>", "<", "unused2>"}
    names = unused_names(set(taken), 3)
    assert names == ["<unused3>", "<unused4>", "<unused5>"]


def test_base_containing_everything_adds_nothing(spm_tokenizer_dir, tmp_path):
    result = merge_vocab(spm_tokenizer_dir, [spm_tokenizer_dir / "tokenizer.model"], tmp_path / "out")
    assert result.added == 0 and result.final_size == result.base_size
    assert load_proto(tmp_path / "out" / "tokenizer.model").SerializeToString() == load_proto(spm_tokenizer_dir / "tokenizer.model").SerializeToString()
    assert (tmp_path / "out" / "tokenizer.json").is_file()


def test_word_list_add(spm_tokenizer_dir, tmp_path):
    words = tmp_path / "words.txt"
    words.write_text("语言模型\n中文\n▁中文\n中文\n\nhello world\n", encoding="utf-8")
    result = merge_vocab(spm_tokenizer_dir, [words], tmp_path / "out")
    merged = load_proto(tmp_path / "out" / "tokenizer.model")
    new = [p.piece for p in merged.pieces[result.base_size :]]
    base_pieces = {p.piece for p in merged.pieces[: result.base_size]}
    words_added = [w for w in ["语言模型", "中文", "▁中文", "hello▁world"] if w not in base_pieces]
    # The words in order, then the characters neither the base nor the list has, so both runtimes can form them.
    assert new[: len(words_added)] == words_added
    assert new[len(words_added) :] == [c for c in dict.fromkeys("语言模型中文") if c not in base_pieces]
    assert result.added == len(new) == len(set(new))


def test_word_list_over_missing_characters_agrees(spm_tokenizer_dir, tmp_path):
    words = tmp_path / "words.txt"
    words.write_text("琅琊\n琅琊榜\n", encoding="utf-8")
    assert merge_vocab(spm_tokenizer_dir, [words], tmp_path / "out").unproducible == 0
    texts = ["琅琊榜", "我在看琅琊榜。", "琅琊 榜"]
    assert disagreements(tmp_path / "out", texts) == []
    processor = spm.SentencePieceProcessor(model_file=str(tmp_path / "out" / "tokenizer.model"))
    assert processor.encode("琅琊榜", out_type=str) == ["▁", "琅琊榜"]
    # Without "琅琊" (or "琊榜") no BPE merge can ever form "琅琊榜": counted, still kept.
    words.write_text("琅琊榜\n", encoding="utf-8")
    assert merge_vocab(spm_tokenizer_dir, [words], tmp_path / "alone").unproducible == 1


def test_bpe_add_into_spm_base_refused(spm_tokenizer_dir, bpe_tokenizer_dir, tmp_path):
    with pytest.raises(UsageError, match="cannot be merged into the SentencePiece base"):
        merge_vocab(spm_tokenizer_dir, [bpe_tokenizer_dir / "tokenizer.json"], tmp_path / "out")
    assert list(tmp_path.iterdir()) == []


def test_unigram_base_refused(zh_spm_model, tmp_path, assets):
    from cnllm.core.tokenizers.train import train_vocab

    unigram = train_vocab([assets / "zh.txt"], tmp_path / "uni.model", TrainVocabOptions(vocab_size=2000, model_type="unigram")).output
    with pytest.raises(UsageError, match="non-BPE SentencePiece"):
        merge_vocab(unigram, [zh_spm_model], tmp_path / "out")


def test_existing_output_refused_then_forced(spm_tokenizer_dir, zh_spm_model, tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    (out / "keep.txt").write_text("x")
    with pytest.raises(OutputExistsError):
        merge_vocab(spm_tokenizer_dir, [zh_spm_model], out)
    assert (out / "keep.txt").exists()
    merge_vocab(spm_tokenizer_dir, [zh_spm_model], out, force=True)
    assert not (out / "keep.txt").exists() and (out / "tokenizer.model").exists()


# --- the published files (skipped without ../shared) ---


@pytest.fixture(scope="module")
def published(shared_fixtures, tmp_path_factory):
    tokenizers = shared_fixtures / "tokenizers"
    base, add = tokenizers / "llama2-spm" / "tokenizer.model", tokenizers / "chinese-llama-sp" / "chinese_sp.model"
    out = tmp_path_factory.mktemp("published")
    ranked = merge_vocab(base, [add], out / "ranked")
    zero = merge_vocab(base, [add], out / "zero", MergeVocabOptions(scores="zero"))
    return tokenizers, ranked, zero


def test_published_merge_has_49953_pieces(published):
    tokenizers, ranked, zero = published
    assert ranked.final_size == zero.final_size == 49953
    assert ranked.added == 17953 and 0 < ranked.unproducible < ranked.added
    merged = load_proto(zero.output / "tokenizer.model")
    base = load_proto(tokenizers / "llama2-spm" / "tokenizer.model")
    add = load_proto(tokenizers / "chinese-llama-sp" / "chinese_sp.model")
    # The published script: every ADD piece the base lacks, in ADD's order, score 0, normal type.
    base_set = {p.piece for p in base.pieces}
    expected = [(p.piece, 0.0, 1) for p in add.pieces if p.piece not in base_set]
    assert [(p.piece, p.score, p.type) for p in merged.pieces[32000:]] == expected
    assert merged.pieces[:32000] == base.pieces[:32000]
    assert merged.normalizer_spec == base.normalizer_spec and merged.trainer_spec == base.trainer_spec
    # Chinese-LLaMA-2's published tokenizer keeps the same 32,000 base pieces.
    reference = load_proto(tokenizers / "chinese-llama-2" / "tokenizer.model")
    assert [p.piece for p in reference.pieces[:32000]] == [p.piece for p in merged.pieces[:32000]]


@pytest.mark.parametrize("which", ["base", "merged"])
def test_llama_vectors_through_hf_output(published, which, tmp_path):
    from cnllm.core.tokenizers.hf_export import write_spm_tokenizer_dir

    tokenizers, ranked, _ = published
    directory = ranked.output
    if which == "base":
        directory = tmp_path / "base"
        write_spm_tokenizer_dir(load_proto(tokenizers / "llama2-spm" / "tokenizer.model"), directory)
    fast = Tokenizer.from_file(str(directory / "tokenizer.json"))
    vectors = read_vectors(tokenizers / "llama2-spm")
    assert len(vectors) == 46
    processor = spm.SentencePieceProcessor(model_file=str(directory / "tokenizer.model"))
    for text, expected in vectors:
        ids = fast.encode(text, add_special_tokens=False).ids
        assert ids == processor.encode(text)
        if which == "base":
            assert ids == expected, text


def test_published_ranked_merge_matches_sentencepiece(published, assets, shared_fixtures):
    _, ranked, _ = published
    texts = sample_texts(assets, per_file=200)
    corpus = shared_fixtures / "corpus" / "zh-classical.txt"
    if corpus.exists():
        texts += corpus.read_text(encoding="utf-8").splitlines()[:500]
    assert disagreements(ranked.output, texts) == []
    config = json.loads((ranked.output / "tokenizer_config.json").read_text(encoding="utf-8"))
    assert config["tokenizer_class"] == "PreTrainedTokenizerFast"
