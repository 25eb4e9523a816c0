"""The backend-independent parts: UTF-8-safe detokenizing, stop strings, limits, and the prompt through the one BOS rule."""

from __future__ import annotations

import threading

import pytest

from cnllm.core.errors import UsageError
from cnllm.core.generation.base import (
    REPLACEMENT,
    ContextOverflow,
    GenerationObserver,
    GenerationStream,
    IncrementalDetokenizer,
    SamplingParams,
    StopMatcher,
)
from tests.fake_model import ByteModel


def test_detokenizer_never_emits_half_a_character(spm_tokenizer_dir):
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(str(spm_tokenizer_dir))
    text = "你好，世界! hello 北京"
    ids = tokenizer(text, add_special_tokens=False)["input_ids"]
    decode = lambda i: tokenizer.decode(i, skip_special_tokens=True)  # noqa: E731
    # The tokenizer was trained on English: Chinese characters are byte-fallback tokens, which alone decode broken.
    assert any(REPLACEMENT in decode([i]) for i in ids)
    detok = IncrementalDetokenizer(decode)
    deltas = [detok.add(i) for i in ids] + [detok.flush()]
    assert all(REPLACEMENT not in d for d in deltas)
    assert "".join(deltas) == decode(ids)


def test_detokenizer_drops_an_unfinished_character_at_the_end():
    detok = IncrementalDetokenizer(ByteModel(b"").decode)
    data = "好你".encode("utf-8")
    assert [detok.add(b) for b in data[:4]] == ["", "", "好", ""]
    assert detok.flush() == ""


def test_stream_of_single_bytes_yields_whole_characters():
    generator = ByteModel("中文流式输出".encode("utf-8"))
    stream = generator.stream("提示", SamplingParams(temperature=0))
    assert list(stream) == list("中文流式输出")
    assert stream.completion.finish_reason == "stop"
    assert stream.completion.completion_tokens == len("中文流式输出".encode("utf-8"))
    assert stream.completion.prompt_tokens == len("提示".encode("utf-8"))


def test_stop_string_across_tokens_is_cut_and_never_shown():
    generator = ByteModel(b"answer one### Instruction: more")
    stream = generator.stream("x", SamplingParams(stop=("### Instruction:",)))
    deltas = list(stream)
    assert "".join(deltas) == "answer one"
    assert all("#" not in d for d in deltas)
    assert stream.completion.finish_reason == "stop"
    assert generator.produced < len(b"answer one### Instruction: more")


def test_stop_matcher_holds_back_only_possible_prefixes():
    matcher = StopMatcher(["</s>", "STOP"])
    assert matcher.feed("abc<") == ("abc", False)
    assert matcher.feed("/x") == ("</x", False)
    assert matcher.feed("ST") == ("", False)
    assert matcher.feed("OP tail") == ("", True)
    assert matcher.flush() == ""


def test_max_tokens_and_context_limit():
    stream = ByteModel(b"abcdefgh", eos=False).stream("p", SamplingParams(max_tokens=3))
    assert "".join(stream) == "abc"
    assert stream.completion.finish_reason == "length"
    room = ByteModel(b"abcdefgh", eos=False, context_length=6).stream("pp", SamplingParams(max_tokens=None))
    assert "".join(room) == "abcd"
    with pytest.raises(ContextOverflow, match="context window is 6"):
        ByteModel(b"", context_length=6).stream("long prompt", SamplingParams())
    zero = ByteModel(b"abc").stream("p", SamplingParams(max_tokens=0)).read()
    assert (zero.text, zero.finish_reason) == ("", "length")


def test_cancel_stops_the_backend():
    generator = ByteModel(b"x" * 50, eos=False)
    stream = generator.stream("p", SamplingParams(max_tokens=None))
    assert next(iter(stream)) == "x"
    stream.close()
    assert generator.produced == 1
    assert stream.completion.finish_reason == "cancelled"
    assert isinstance(stream.cancelled, threading.Event) and stream.cancelled.is_set()


@pytest.mark.parametrize(
    "params, message",
    [
        (SamplingParams(max_tokens=-1), "max_tokens"),
        (SamplingParams(temperature=-0.5), "temperature"),
        (SamplingParams(top_p=0), "top_p"),
        (SamplingParams(top_k=-1), "top_k"),
        (SamplingParams(repetition_penalty=0), "repetition_penalty"),
    ],
)
def test_invalid_sampling_params(params, message):
    with pytest.raises(UsageError, match=message):
        params.validate()


class Recorder(GenerationObserver):
    def __init__(self):
        self.tokens: list[bool] = []
        self.completions: list = []

    def token(self, seconds: float, first: bool) -> None:
        assert seconds >= 0
        self.tokens.append(first)

    def finished(self, completion) -> None:
        self.completions.append(completion)


def test_the_observer_sees_every_token_and_one_end_also_when_cut_short():
    answered = Recorder()
    completion = GenerationStream(ByteModel(b"abc"), [1], SamplingParams(max_tokens=10), observer=answered).read()
    assert answered.tokens == [True, False, False, False]  # a, b, c and the EOS
    assert answered.completions == [completion] and completion.generated_ids == [97, 98, 99, 256]

    cut = Recorder()
    stream = GenerationStream(ByteModel(b"abcdef"), [1], SamplingParams(max_tokens=10), observer=cut)
    next(iter(stream))
    stream.close()
    assert cut.tokens == [True] and len(cut.completions) == 1 and cut.completions[0].finish_reason == "cancelled"

    empty = Recorder()
    GenerationStream(ByteModel(b"abc"), [1], SamplingParams(max_tokens=0), observer=empty).read()
    assert empty.tokens == [] and len(empty.completions) == 1
