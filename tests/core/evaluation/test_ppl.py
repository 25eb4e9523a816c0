from __future__ import annotations

import json
import math
from pathlib import Path

import pytest

from cnllm.core.errors import UsageError
from cnllm.core.evaluation.ppl import PplOptions, evaluate_perplexity, plan_windows
from cnllm.core.generation.base import LoadOptions
from cnllm.core.tiny import asset


@pytest.fixture(scope="module")
def texts(tmp_path_factory) -> list[Path]:
    """An English and a Chinese excerpt of the bundled samples, long enough for a few windows, short enough for a fast test."""
    folder = tmp_path_factory.mktemp("texts")
    out = []
    for name, chars in (("en.txt", 2500), ("zh_heldout.txt", 500)):
        path = folder / name
        path.write_text(asset(name).read_text(encoding="utf-8")[:chars], encoding="utf-8")
        out.append(path)
    return out


def scored_positions(n_tokens: int, options: PplOptions) -> list[int]:
    return [w.start + t for w in plan_windows(n_tokens, options) for t in range(w.first, w.end - w.start)]


def test_non_overlapping_windows_score_all_but_each_window_start():
    windows = plan_windows(10, PplOptions(ctx=4))
    assert [(w.start, w.end, w.first) for w in windows] == [(0, 4, 1), (4, 8, 1), (8, 10, 1)]
    assert scored_positions(10, PplOptions(ctx=4)) == [1, 2, 3, 5, 6, 7, 9]


def test_sliding_windows_score_every_token_once_with_context():
    options = PplOptions(ctx=8, stride=3)
    assert scored_positions(20, options) == list(range(1, 20))
    for window in plan_windows(20, options)[1:]:
        assert window.first >= 8 - 3 or window.end == 20  # each newly scored token sees >= ctx - stride tokens


def test_llamacpp_windows_are_whole_chunks_second_half():
    windows = plan_windows(1000, PplOptions(ctx=256, llamacpp_compatible=True))
    assert [(w.start, w.end) for w in windows] == [(0, 256), (256, 512), (512, 768)]
    # llama.cpp's perplexity tool scores n_ctx - 1 - n_ctx/2 tokens per chunk.
    assert all(w.end - w.start - w.first == 256 - 1 - 128 for w in windows)


@pytest.mark.parametrize(
    "options, message",
    [
        (PplOptions(ctx=1), "--ctx"),
        (PplOptions(ctx=8, stride=9), "--stride"),
        (PplOptions(ctx=8, stride=4, llamacpp_compatible=True), "exclude"),
        (PplOptions(batch_size=0), "--batch-size"),
    ],
)
def test_bad_options(options, message):
    with pytest.raises(UsageError, match=message):
        options.validate()


def test_single_window_equals_transformers_loss(tiny_llama_dir, tmp_path):
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    text = "The quick brown fox jumps over the lazy dog. 中文也可以。"
    path = tmp_path / "short.txt"
    path.write_text(text, encoding="utf-8")
    result = evaluate_perplexity(tiny_llama_dir, [path], PplOptions(ctx=512))
    tokenizer = AutoTokenizer.from_pretrained(str(tiny_llama_dir))
    model = AutoModelForCausalLM.from_pretrained(str(tiny_llama_dir), dtype=torch.float32)
    ids = tokenizer(text, return_tensors="pt").input_ids
    with torch.no_grad():
        loss = model(ids, labels=ids).loss.item()
    score = result.files[0]
    assert score.tokens == ids.shape[1]
    assert score.tokens_scored == ids.shape[1] - 1
    assert score.mean_nll == pytest.approx(loss, rel=1e-5)
    assert score.ppl == pytest.approx(math.exp(loss), rel=1e-5)
    assert score.bytes_scored <= len(text.encode("utf-8"))
    assert score.bits_per_byte == pytest.approx(score.nll_sum / math.log(2) / score.bytes_scored)


def test_batched_and_sliding_runs_agree_with_single(tiny_llama_dir, texts):
    spec, data = tiny_llama_dir, texts[:1]
    one = evaluate_perplexity(spec, data, PplOptions(ctx=64)).total
    batched = evaluate_perplexity(spec, data, PplOptions(ctx=64, batch_size=8)).total
    assert batched.ppl == pytest.approx(one.ppl, rel=1e-5)
    sliding = evaluate_perplexity(spec, data, PplOptions(ctx=64, stride=32, batch_size=8)).total
    assert sliding.tokens_scored == sliding.tokens - 1
    assert sliding.bytes_scored == len(texts[0].read_bytes())  # every byte is covered exactly once
    assert sliding.ppl != one.ppl


def test_f32_gguf_agrees_with_its_hf_source(tiny_llama_dir, tiny_f32_gguf, texts):
    data = texts
    for options in (PplOptions(ctx=128), PplOptions(ctx=128, llamacpp_compatible=True)):
        hf = evaluate_perplexity(tiny_llama_dir, data, options)
        gguf = evaluate_perplexity(tiny_f32_gguf, data, options, LoadOptions(threads=1))
        assert gguf.model["backend"] == "llama.cpp" and hf.model["backend"] == "transformers"
        for a, b in zip(hf.files, gguf.files):
            assert a.tokens == b.tokens and a.tokens_scored == b.tokens_scored
            assert abs(b.ppl / a.ppl - 1) < 0.005


def test_lora_is_applied_unmerged(tiny_llama_dir, tmp_path, texts):
    from tests.lora_fixtures import build_adapter, load_fp32

    adapter = build_adapter(tiny_llama_dir, tmp_path / "adapter")
    merged = tmp_path / "merged"
    from peft import PeftModel

    PeftModel.from_pretrained(load_fp32(tiny_llama_dir), str(adapter)).merge_and_unload().save_pretrained(merged)
    for item in Path(tiny_llama_dir).glob("tokenizer*"):
        (merged / item.name).write_bytes(item.read_bytes())
    options, data = PplOptions(ctx=64), texts[:1]
    base = evaluate_perplexity(tiny_llama_dir, data, options)
    with_lora = evaluate_perplexity(tiny_llama_dir, data, options, LoadOptions(lora=adapter))
    reference = evaluate_perplexity(merged, data, options)
    assert with_lora.model["lora"] == str(adapter)
    assert with_lora.total.ppl != pytest.approx(base.total.ppl, rel=1e-3)
    assert with_lora.total.ppl == pytest.approx(reference.total.ppl, rel=1e-4)


def test_jsonl_texts_are_joined(tiny_llama_dir, tmp_path):
    path = tmp_path / "docs.jsonl"
    path.write_text("\n".join(json.dumps({"text": t}) for t in ["first document here", "second one"]) + "\n{bad\n", encoding="utf-8")
    plain = tmp_path / "docs.txt"
    plain.write_text("first document here\n\nsecond one", encoding="utf-8")
    spec, options = tiny_llama_dir, PplOptions(ctx=64)
    assert evaluate_perplexity(spec, [path], options).total.ppl == pytest.approx(evaluate_perplexity(spec, [plain], options).total.ppl)


@pytest.mark.parametrize(
    "content, options, message",
    [
        (b"\xff\xfe broken", PplOptions(), "not valid UTF-8"),
        (b"   \n", PplOptions(), "no text"),
        (b"short text", PplOptions(ctx=512, llamacpp_compatible=True), "at least 512"),
    ],
)
def test_bad_text_is_a_usage_error(tiny_llama_dir, tmp_path, content, options, message):
    path = tmp_path / "input.txt"
    path.write_bytes(content)
    with pytest.raises(UsageError, match=message):
        evaluate_perplexity(tiny_llama_dir, [path], options)


def test_missing_file_and_unloadable_model(tiny_llama_dir, tmp_path):
    with pytest.raises(UsageError, match="does not exist"):
        evaluate_perplexity(tiny_llama_dir, [tmp_path / "nope.txt"], PplOptions())
    fake = tmp_path / "fake.gguf"
    fake.write_bytes(b"GGUF" + b"\0" * 64)
    with pytest.raises(UsageError, match="GGUF version 0 is not supported"):
        evaluate_perplexity(fake, [asset("en.txt")], PplOptions())
    with pytest.raises(UsageError, match="neither a .gguf file"):
        evaluate_perplexity(tmp_path, [asset("en.txt")], PplOptions())


def test_target_rows_equal_the_full_log_softmax():
    import numpy as np

    from cnllm.core.generation.base import log_softmax_rows, target_logprobs_rows

    logits = np.random.default_rng(0).normal(scale=8.0, size=(21, 300)).astype(np.float32)  # not a multiple of the row block
    targets = np.arange(21) * 13 % 300
    expected = log_softmax_rows(logits)[np.arange(21), targets]
    assert np.allclose(target_logprobs_rows(logits, targets), expected, rtol=0, atol=1e-12)


@pytest.mark.parametrize("softcap", [None, 5.0])
def test_output_layer_in_slices_equals_the_causal_lm(tiny_llama_dir, tmp_path, monkeypatch, softcap):
    """Positions go through the output layer a slice at a time (long contexts never build a context × vocabulary
    matrix); the result must be the causal LM's own, Gemma's final logit soft-capping included."""
    import torch
    from transformers import AutoConfig, Gemma2Config, Gemma2ForCausalLM

    import cnllm.core.generation.hf as hf

    model_dir = tiny_llama_dir
    if softcap:
        vocab = AutoConfig.from_pretrained(tiny_llama_dir).vocab_size
        config = Gemma2Config(vocab_size=vocab, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2,
                              num_key_value_heads=1, head_dim=16, final_logit_softcapping=softcap, pad_token_id=0, bos_token_id=1, eos_token_id=2)
        torch.manual_seed(0)
        model_dir = tmp_path / "gemma2"
        Gemma2ForCausalLM(config).save_pretrained(model_dir)
        for item in Path(tiny_llama_dir).glob("tokenizer*"):
            (model_dir / item.name).write_bytes(item.read_bytes())
    monkeypatch.setattr(hf, "HEAD_ROWS", 7)
    scorer = hf.TransformersModel(model_dir, LoadOptions())
    windows = [list(range(5, 45)), list(range(105, 145))]
    with torch.no_grad():
        logits = scorer.model(input_ids=torch.tensor(windows)).logits[:, 2:-1]
    expected = torch.log_softmax(logits.double(), -1).gather(-1, torch.tensor(windows)[:, 3:, None])[..., 0].numpy()
    got = scorer.target_logprobs(windows, 3)
    assert [len(row) for row in got] == [37, 37]
    assert max(abs(a - b).max() for a, b in zip(got, expected)) < 1e-5
