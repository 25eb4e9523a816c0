"""Continuous batching on one llama.cpp context (serve --parallel): requests decoded together answer as they would
alone, join and leave between steps, free their sequence when cancelled, and reuse a cached prefix."""

from __future__ import annotations

import json
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import pytest

from cnllm.core.errors import UsageError
from cnllm.core.generation.base import LoadOptions, SamplingParams

GREEDY = SamplingParams(max_tokens=24, temperature=0)
PROMPTS = ["Hello world", "你好，世界", "The quick brown fox", "床前明月光", "1 2 3 4", "Once upon a time"]


@pytest.fixture(scope="module")
def batched(tiny_gguf):
    from cnllm.core.backends import load_model

    with load_model(tiny_gguf, LoadOptions(n_ctx=512, sequences=4, prompt_cache=True)) as model:
        yield model


@pytest.fixture(scope="module")
def single(tiny_gguf):
    from cnllm.core.backends import load_model

    with load_model(tiny_gguf, LoadOptions(n_ctx=512, prompt_cache=False)) as model:
        yield model


def answer(model, prompt: str, params: SamplingParams = GREEDY) -> list[int]:
    return model.complete(prompt, params).token_ids


def wait_for(condition, timeout: float = 30.0) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.005)


def test_each_sequence_gets_the_context_asked_for(batched):
    assert batched.context_length == 512
    assert batched.describe()["sequences"] == 4


def test_interleaved_greedy_answers_equal_one_at_a_time(batched, single):
    alone = [answer(batched, p) for p in PROMPTS]
    assert all(alone) and len({tuple(a) for a in alone}) > 1
    with ThreadPoolExecutor(len(PROMPTS)) as pool:  # six requests on four sequences: two wait, then join
        together = list(pool.map(lambda p: answer(batched, p), PROMPTS))
    assert together == alone
    assert [answer(single, p) for p in PROMPTS] == alone  # the one-sequence path samples alike


def test_a_request_joining_mid_batch_answers_as_alone(batched):
    long_params = SamplingParams(max_tokens=200, temperature=0)
    expected_long = answer(batched, PROMPTS[0], long_params)
    expected_short = answer(batched, PROMPTS[1])
    stream = batched.stream(PROMPTS[0], long_params)
    pieces = iter(stream)
    next(pieces)  # the long request is decoding
    joined = answer(batched, PROMPTS[1])
    for _ in pieces:
        pass
    assert joined == expected_short
    assert stream.completion.token_ids == expected_long


def test_a_cancelled_request_frees_its_sequence(batched):
    batcher = batched._batcher
    wait_for(lambda: batcher.running == 0)
    expected = answer(batched, PROMPTS[4])
    endless = SamplingParams(max_tokens=400, temperature=0)
    streams = [batched.stream(p, endless) for p in PROMPTS[:4]]
    iterators = [iter(s) for s in streams]
    with ThreadPoolExecutor(4) as pool:
        list(pool.map(next, iterators))  # all four sequences busy
        assert batcher.running == 4
        waiting = pool.submit(answer, batched, PROMPTS[4])  # a fifth request waits for a sequence
        time.sleep(0.2)
        assert not waiting.done()
        streams[0].cancel()
        assert waiting.result(timeout=60) == expected  # it got the freed sequence and finished
        assert not all(s.completion.finish_reason for s in streams[1:])  # while the others still decode
    for stream in streams:
        stream.close()
    wait_for(lambda: batcher.running == 0)
    assert streams[0].completion.finish_reason == "cancelled"


def test_the_next_turn_reuses_the_cached_prefix(batched):
    batcher = batched._batcher
    first = batched.encode_prompt("用户：你好，请介绍一下你自己。\n助手：")
    batched.complete(first, GREEDY)
    before = batcher.prompt_tokens_reused
    second = first + batched.text_ids("好的。\n用户：再说一遍。\n助手：", special=False)
    batched.complete(second, GREEDY)
    assert batcher.prompt_tokens_reused - before == len(first)


def test_seeded_sampling_repeats_and_schema_output_parses(batched):
    params = SamplingParams(max_tokens=16, temperature=0.9, top_k=20, top_p=0.9, seed=7)
    assert answer(batched, "Hello", params) == answer(batched, "Hello", params)
    schema = {"type": "object", "properties": {"a": {"type": "integer"}}, "required": ["a"]}
    text = batched.complete("Hello", SamplingParams(max_tokens=60, temperature=0, json_schema=schema)).text
    assert isinstance(json.loads(text)["a"], int)


def test_scoring_waits_for_running_requests_then_generation_goes_on(batched):
    stream = batched.stream(PROMPTS[2], SamplingParams(max_tokens=30, temperature=0))
    started = threading.Event()

    def run():
        for _ in stream:
            started.set()

    worker = threading.Thread(target=run)
    worker.start()
    started.wait(30)
    scored = batched.prompt_logprobs(batched.encode_prompt(PROMPTS[3]))
    worker.join()
    assert stream.completion.completion_tokens == 30  # not cut short by scoring
    assert scored[0].logprob is None and all(t.logprob is not None for t in scored[1:])
    assert answer(batched, PROMPTS[2]) == stream.completion.token_ids[: GREEDY.max_tokens]


def test_an_empty_prompt_is_refused(batched):
    with pytest.raises(UsageError, match="empty"):
        list(batched.generate_ids([], GREEDY, 4, threading.Event()))


def test_a_draft_model_cannot_batch(tiny_gguf):
    from cnllm.core.backends import load_model

    with pytest.raises(UsageError, match="one request at a time"):
        load_model(tiny_gguf, LoadOptions(sequences=2, draft_model=tiny_gguf))


def test_scores_on_the_batched_context_match_the_one_sequence_context(batched, single):
    import numpy as np

    with ThreadPoolExecutor(4) as pool:  # every sequence holds tokens the scoring must not mistake for its own
        list(pool.map(lambda p: answer(batched, p), PROMPTS[:4]))
    prompts = [batched.encode_prompt(p) for p in PROMPTS[:3]]
    assert np.allclose(batched.next_token_logprobs(prompts), single.next_token_logprobs(prompts), atol=1e-4)
    first = batched.prompt_logprobs(prompts[1])
    assert [t.logprob for t in first[1:]] == pytest.approx([t.logprob for t in single.prompt_logprobs(prompts[1])[1:]], abs=1e-4)
