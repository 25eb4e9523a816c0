"""``vocab inspect`` figures: sizes, special tokens, compression, byte and unknown rates, round trip."""

from __future__ import annotations

import pytest

from cnllm.core.errors import UsageError
from cnllm.core.tokenizers.inspect import inspect_tokenizer, token_ratio


def test_spm_base_and_merge_on_chinese(spm_tokenizer_dir, merged_spm_dir, assets):
    text = assets / "zh_heldout.txt"
    base = inspect_tokenizer(spm_tokenizer_dir, text)
    merged = inspect_tokenizer(merged_spm_dir, text)
    assert base.kind == merged.kind == "SentencePiece (bpe)"
    assert base.special_tokens == merged.special_tokens == {"<unk>": 0, "<s>": 1, "</s>": 2}
    assert base.text.characters == merged.text.characters == len(text.read_text(encoding="utf-8").replace("\n", ""))
    # An English-only vocabulary spells most Chinese characters as UTF-8 bytes; the merge far less (held-out text has characters zh.txt lacks).
    assert base.text.byte_rate > 0.5 and merged.text.byte_rate < 0.2
    assert merged.text.cjk_per_token > 2 * base.text.cjk_per_token
    assert base.text.roundtrip_failures == merged.text.roundtrip_failures == 0
    assert token_ratio(merged, base) == pytest.approx(merged.text.tokens / base.text.tokens)
    assert merged.to_dict()["text"]["roundtrip_ok"] is True


def test_byte_level_bpe(bpe_tokenizer_dir, assets):
    result = inspect_tokenizer(bpe_tokenizer_dir / "tokenizer.json", assets / "zh_heldout.txt")
    assert result.kind == "byte-level BPE" and result.vocab_size == 1029
    assert result.special_tokens["<|begin_of_text|>"] == 1024
    assert result.text.byte_rate > 0.5 and result.text.unknown_tokens == 0 and result.text.roundtrip_failures == 0


def test_unknown_rate_without_byte_fallback(tmp_path, assets):
    from cnllm.core.tokenizers.spm import train_spm

    model = train_spm((assets / "en.txt").read_text(encoding="utf-8").splitlines(), vocab_size=300, byte_fallback=False, hard_vocab_limit=False)
    (tmp_path / "en.model").write_bytes(model)
    result = inspect_tokenizer(tmp_path / "en.model", assets / "zh_heldout.txt")
    assert result.text.unknown_rate > 0.1 and result.text.roundtrip_failures > 0


def test_no_text_and_empty_text(spm_tokenizer_dir, tmp_path):
    assert inspect_tokenizer(spm_tokenizer_dir).text is None
    empty = tmp_path / "empty.txt"
    empty.write_text("")
    with pytest.raises(UsageError, match="no text lines"):
        inspect_tokenizer(spm_tokenizer_dir, empty)
