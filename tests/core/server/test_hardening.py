"""One request never kills or stalls the server (issue 13), on a real llama.cpp model: the tiny GGUF.

Token ids outside the vocabulary, empty prompts, non-finite numbers, oversized bodies, foreign Host
headers and clients that hang up all get an answer (or a freed slot), and the server keeps serving.
lm-evaluation-harness's log-likelihood request agrees with ``cnllm eval``'s scorer, also when the
model's next token is EOS.
"""

from __future__ import annotations

import http.client
import json
import shutil
import socket
import threading
import time
from pathlib import Path
from urllib.parse import urlsplit

import numpy as np
import pytest

from tests.core.server.conftest import API_KEY, http_request, start_server

LIMIT = 64 * 1024


def request(server, method: str, path: str, body: bytes | dict | None = None, *, headers: dict | None = None, timeout: float = 60):
    """(status, JSON body) of one request to a live test server, the API key sent unless ``headers`` replace it."""
    data = json.dumps(body).encode() if isinstance(body, dict) else body
    status, payload = http_request(urlsplit(server.url).port, method, path, data, {"Authorization": f"Bearer {API_KEY}", **(headers or {})}, timeout=timeout)
    return status, json.loads(payload) if payload else None


def healthy(server) -> bool:
    status, body = request(server, "GET", "/health")
    return status == 200 and body["status"] == "ok"


@pytest.fixture(scope="module")
def gguf_generator(tiny_gguf):
    from cnllm.core.backends import load_model

    with load_model(tiny_gguf) as generator:
        yield generator


@pytest.fixture(scope="module")
def gguf_server(gguf_generator):
    from cnllm.core.server.app import default_allowed_hosts

    server, stop = start_server([gguf_generator], template="chatml", max_request_bytes=LIMIT, allowed_hosts=default_allowed_hosts("127.0.0.1"))
    yield server
    stop()


def bad_id_requests(vocab: int) -> list[tuple[str, dict]]:
    return [
        ("/v1/embeddings", {"input": [vocab]}),
        ("/v1/embeddings", {"input": [-5]}),
        ("/v1/embeddings", {"input": [[1, 2], [3, vocab + 10]]}),
        ("/v1/completions", {"prompt": [100000000], "max_tokens": 0}),
        ("/v1/completions", {"prompt": [1, vocab], "max_tokens": 4}),
        ("/v1/completions", {"prompt": [[5, 6], [-1]], "max_tokens": 2}),
        ("/v1/completions", {"prompt": [2**31 + 7], "max_tokens": 1, "echo": True, "logprobs": 1}),
    ]


def test_token_ids_outside_the_vocabulary_are_400_and_the_server_lives(gguf_server, gguf_generator):
    vocab = gguf_generator.vocab_size
    for path, body in bad_id_requests(vocab):
        status, document = request(gguf_server, "POST", path, {"model": "tiny", **body})
        assert status == 400, (path, body, document)
        assert "vocabulary" in document["error"]["message"] and document["error"]["param"] in ("input", "prompt")
    assert healthy(gguf_server)
    status, document = request(gguf_server, "POST", "/v1/completions", {"model": "tiny", "prompt": [1, vocab - 1], "max_tokens": 2})
    assert status == 200 and document["usage"]["prompt_tokens"] == 2


@pytest.mark.parametrize(
    "body, param",
    [
        ({"prompt": ""}, "prompt"),
        ({"prompt": ["fine", ""]}, "prompt"),
        ({"prompt": []}, "prompt"),
        ({"prompt": [[]]}, "prompt"),
        ({"prompt": "x", "top_k": 2**40}, "top_k"),
        ({"prompt": "\ud800"}, "prompt"),  # a lone surrogate: no tokenizer (nor the JSON answer) can take it
        ({"model": "\udfff", "prompt": "x"}, "model"),
    ],
)
def test_empty_prompts_bad_text_and_impossible_fields_are_400(gguf_server, body, param):
    status, document = request(gguf_server, "POST", "/v1/completions", {"model": "tiny", "max_tokens": 2, **body})
    assert status == 400 and document["error"]["param"] == param, document


@pytest.mark.parametrize("literal", [b"NaN", b"Infinity", b"-Infinity"])
def test_non_finite_numbers_are_400(gguf_server, literal):
    body = b'{"model": "tiny", "prompt": "hi", "max_tokens": 2, "repetition_penalty": ' + literal + b"}"
    status, document = request(gguf_server, "POST", "/v1/completions", body)
    assert status == 400 and document["error"]["param"] == "repetition_penalty"


def test_any_integer_seed_is_accepted(gguf_server):
    for seed in (-1, 2**80):
        status, document = request(gguf_server, "POST", "/v1/completions", {"model": "tiny", "prompt": "hi", "max_tokens": 2, "seed": seed})
        assert status == 200, document


def test_bodies_over_the_limit_are_413_whether_announced_or_streamed(gguf_server):
    padding = "x" * (LIMIT + 1)
    status, document = request(gguf_server, "POST", "/v1/completions", {"model": "tiny", "prompt": padding})
    assert status == 413 and document["error"]["code"] == "request_too_large"

    address = urlsplit(gguf_server.url)
    connection = http.client.HTTPConnection(address.hostname, address.port, timeout=60)
    try:  # 20 MB announced: answered before a byte of it is read
        connection.putrequest("POST", "/v1/completions")
        connection.putheader("Content-Length", str(20_000_000))
        connection.putheader("Authorization", f"Bearer {API_KEY}")
        connection.endheaders()
        assert connection.getresponse().status == 413
    finally:
        connection.close()

    chunks = (b"x" * 8192 for _ in range(LIMIT // 8192 + 2))
    connection = http.client.HTTPConnection(address.hostname, address.port, timeout=60)
    try:  # chunked, no Content-Length: counted as it arrives
        connection.request("POST", "/v1/completions", body=chunks, headers={"Authorization": f"Bearer {API_KEY}"}, encode_chunked=True)
        assert connection.getresponse().status == 413
    except (BrokenPipeError, ConnectionResetError):
        pass  # the server answered and closed while the rest was still being sent
    finally:
        connection.close()
    assert healthy(gguf_server)


def test_a_foreign_host_header_is_refused_on_loopback(gguf_server):
    port = urlsplit(gguf_server.url).port
    for host in ("attacker.example", f"attacker.example:{port}", "127.0.0.1.nip.io"):
        status, document = request(gguf_server, "GET", "/v1/models", headers={"Host": host})
        assert status == 403 and document["error"]["code"] == "host_not_allowed"
    for host in (f"localhost:{port}", f"127.0.0.1:{port}", f"[::1]:{port}", "LOCALHOST"):
        assert request(gguf_server, "GET", "/v1/models", headers={"Host": host})[0] == 200


def test_any_host_when_allowed(gguf_generator):
    server, stop = start_server([gguf_generator], template="chatml", allowed_hosts=("*",))
    try:
        assert request(server, "GET", "/v1/models", headers={"Host": "my-box.lan:8000"})[0] == 200
    finally:
        stop()


def wait_for(condition, limit: float = 60.0) -> bool:
    deadline = time.monotonic() + limit
    while not condition():
        if time.monotonic() > deadline:
            return False
        time.sleep(0.02)
    return True


def test_a_non_streaming_client_that_hangs_up_frees_its_slot(tiny_gguf):
    from cnllm.core.backends import load_model

    waits_timed_out: list[int] = []
    with load_model(tiny_gguf) as generator:
        original = generator.generate_ids

        def generate_ids(prompt_ids, params, max_tokens, cancel):
            # Each token waits for the cancel flag (up to 60 s): only a hang-up noticed by the server ends this soon.
            for token in original(prompt_ids, params, max_tokens, cancel):
                yield token
                if not cancel.wait(60):
                    waits_timed_out.append(token)

        generator.generate_ids = generate_ids
        generator.eos_ids = frozenset()  # no early EOS either
        server, stop = start_server([generator], template="chatml")
        try:
            address = urlsplit(server.url)
            body = json.dumps({"model": "tiny", "prompt": "Once upon a time", "max_tokens": 200, "temperature": 0}).encode()
            client = socket.create_connection((address.hostname, address.port))
            client.sendall(
                b"POST /v1/completions HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\n"
                + f"Authorization: Bearer {API_KEY}\r\nContent-Length: {len(body)}\r\n\r\n".encode()
                + body
            )
            assert wait_for(lambda: request(server, "GET", "/health")[1]["slots"]["busy"] == 1)
            client.close()
            assert wait_for(lambda: request(server, "GET", "/health")[1]["slots"]["busy"] == 0)
            assert waits_timed_out == []
            status, document = request(server, "POST", "/v1/completions", {"model": "tiny", "prompt": "hi", "max_tokens": 1})
            assert status == 200
        finally:
            stop()


# --- lm-evaluation-harness's log-likelihood request ------------------------------------------------------

CASES = [("Question: what is the capital of France?\nAnswer:", " Paris"), ("天下大势，分久必合，", "合久必分")]


def gguf_with_eos(source: Path, target: Path, eos_id: int) -> Path:
    """A copy of ``source`` whose EOS token is ``eos_id`` (makes a chosen greedy next token end the answer)."""
    import gguf

    shutil.copyfile(source, target)
    reader = gguf.GGUFReader(target, "r+")
    field = reader.fields["tokenizer.ggml.eos_token_id"]
    field.parts[field.data[0]][0] = eos_id
    reader.data.flush()
    del reader
    return target


def lm_eval_request(server, pairs: list[tuple[list[int], list[int]]]) -> dict:
    """The body lm-eval 0.4 (``local-completions``) sends for loglikelihood: context + answer ids, one generated token."""
    body = {"model": "tiny", "prompt": [c + a for c, a in pairs], "temperature": 0, "max_tokens": 1, "logprobs": 1, "seed": 1234, "echo": True}
    status, document = request(server, "POST", "/v1/completions", body)
    assert status == 200, document
    return document


def lm_eval_parse(document: dict, ctxlens: list[int]) -> list[tuple[float, bool]]:
    """lm-eval's own parsing: the sum of ``token_logprobs[ctxlen:-1]`` (the last entry is the generated token)."""
    result = []
    for choice, ctxlen in zip(sorted(document["choices"], key=lambda c: c["index"]), ctxlens):
        logprobs = choice["logprobs"]["token_logprobs"][ctxlen:-1]
        tops = choice["logprobs"]["top_logprobs"][ctxlen:-1]
        result.append((sum(logprobs), all(value == max(top.values()) for value, top in zip(logprobs, tops))))
    return result


def test_lm_eval_loglikelihood_agrees_with_the_eval_scorer_also_before_eos(tiny_gguf, tmp_path):
    from cnllm.core.backends import load_model
    from cnllm.core.generation.base import LoadOptions

    with load_model(tiny_gguf, LoadOptions(n_ctx=512)) as scorer:
        pairs = [(scorer.tokenize(context), scorer.tokenize(answer, add_bos=False)) for context, answer in CASES]
        expected = [float(scorer.target_logprobs([c + a], len(c))[0].sum()) for c, a in pairs]
        next_ids = [int(np.argmax(scorer.next_token_logprobs([c + a])[0])) for c, a in pairs]
    ctxlens = [len(c) for c, _ in pairs]

    # The answer's next token is an ordinary one, then (same weights, that token made EOS) the end of the text.
    eos_model = gguf_with_eos(tiny_gguf, tmp_path / "eos-after-answer.gguf", next_ids[1])
    for model, ends in ((tiny_gguf, False), (eos_model, True)):
        with load_model(model) as generator:
            server, stop = start_server([generator], template="chatml")
            try:
                document = lm_eval_request(server, pairs)
                eos_text = generator.token_text(next_ids[1])
            finally:
                stop()
        scores = lm_eval_parse(document, ctxlens)
        assert [score for score, _ in scores] == pytest.approx(expected, abs=2e-3)
        choice = sorted(document["choices"], key=lambda c: c["index"])[1]
        logprobs = choice["logprobs"]
        assert len(logprobs["token_logprobs"]) == len(pairs[1][0]) + len(pairs[1][1]) + 1
        assert document["usage"]["completion_tokens"] == 2  # one generated token per prompt, EOS included
        if ends:
            assert choice["finish_reason"] == "stop" and logprobs["tokens"][-1] == eos_text != ""
            assert eos_text in logprobs["top_logprobs"][-1] and logprobs["token_logprobs"][-1] is not None
        else:
            assert choice["finish_reason"] == "length"


# --- prompt processing is cancellable; connections are bounded (issue 26) -------------------------------------

LONG_PROMPT = [1] + [3 + (i * 7) % 990 for i in range(3000)]


@pytest.fixture
def slow_prompt_generator(tiny_gguf):
    """The tiny GGUF evaluating prompts at 2 ms a token (6 s for LONG_PROMPT in one pass, 1 s a 512-token piece),
    as a real model on a CPU does; returns the generator and the prompt sizes llama.cpp was given."""
    from cnllm.core.backends import load_model
    from cnllm.core.generation.base import LoadOptions

    with load_model(tiny_gguf, LoadOptions(n_ctx=4096, prompt_cache=False)) as generator:
        llama, sizes = generator._llama, []
        original = llama.eval

        def slow_eval(tokens):
            sizes.append(len(tokens))
            time.sleep(0.002 * len(tokens))
            return original(tokens)

        llama.eval = slow_eval
        yield generator, sizes


def busy_slots(server) -> int:
    return request(server, "GET", "/health")[1]["slots"]["busy"]


def raw_request(server, path: str, body: dict) -> socket.socket:
    """A request sent on a raw socket, left unread (close the socket to hang up)."""
    address = urlsplit(server.url)
    data = json.dumps(body).encode()
    client = socket.create_connection((address.hostname, address.port))
    client.sendall(
        f"POST {path} HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\nAuthorization: Bearer {API_KEY}\r\n"
        f"Content-Length: {len(data)}\r\n\r\n".encode() + data
    )
    return client


@pytest.mark.parametrize("stream", [False, True])
def test_a_client_that_hangs_up_during_prompt_processing_frees_its_slot_within_2_s(slow_prompt_generator, stream):
    generator, sizes = slow_prompt_generator
    server, stop = start_server([generator], template="chatml")
    try:
        client = raw_request(server, "/v1/completions", {"model": "tiny", "prompt": LONG_PROMPT, "max_tokens": 50, "stream": stream})
        assert wait_for(lambda: busy_slots(server) == 1)
        time.sleep(0.3)  # into the prompt
        client.close()
        hung_up = time.monotonic()
        assert wait_for(lambda: busy_slots(server) == 0, limit=2.0), "the slot was still busy 2 s after the hang-up"
        status, _ = request(server, "POST", "/v1/completions", {"model": "tiny", "prompt": "hi", "max_tokens": 1})
        assert status == 200 and time.monotonic() - hung_up < 2.5
        assert sum(sizes[:-1]) < len(LONG_PROMPT) and max(sizes) <= 512  # cut short, in pieces
    finally:
        stop()
        server.app.state.server.pool.close()  # the slot's thread is done before the model is closed


def test_a_server_stopping_during_prompt_processing_answers_at_once(slow_prompt_generator):
    generator, _ = slow_prompt_generator
    server, stop = start_server([generator], template="chatml")
    answers: list[tuple[int, dict]] = []
    body = {"model": "tiny", "prompt": LONG_PROMPT, "max_tokens": 50}
    worker = threading.Thread(target=lambda: answers.append(request(server, "POST", "/v1/completions", body)))
    worker.start()
    try:
        assert wait_for(lambda: busy_slots(server) == 1)
        time.sleep(0.3)
    finally:
        stopping = time.monotonic()
        stop()
        server.app.state.server.pool.close()  # what serve does next: wait for the slot's thread
        stopped = time.monotonic() - stopping
        worker.join(30)
    assert stopped < 2.5
    status, document = answers[0]
    assert status == 200 and document["choices"][0]["finish_reason"] == "cancelled"


def closed_within(client: socket.socket, seconds: float) -> bool:
    """Whether the server closes ``client`` within ``seconds`` (whatever it sends first is read and dropped)."""
    client.settimeout(seconds)
    deadline = time.monotonic() + seconds
    try:
        while time.monotonic() < deadline:
            if client.recv(4096) == b"":
                return True
    except (TimeoutError, socket.timeout):
        return False
    except ConnectionResetError:
        return True
    return False


def test_connections_that_never_finish_a_request_head_are_closed(gguf_generator):
    server, stop = start_server([gguf_generator], template="chatml", read_timeout=0.5)
    address = urlsplit(server.url)
    try:
        silent = [socket.create_connection((address.hostname, address.port)) for _ in range(3)]
        loris = [socket.create_connection((address.hostname, address.port)) for _ in range(3)]
        for client in loris:
            client.sendall(b"POST /v1/completions HTTP/1.1\r\nHost: 127.0.0.1\r\nX-Slow: ")
        kept_alive = socket.create_connection((address.hostname, address.port))
        kept_alive.sendall(b"GET /health HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n")
        assert kept_alive.recv(4096).startswith(b"HTTP/1.1 200")
        kept_alive.sendall(b"GET /health HTTP/1.1\r\n")  # the next request's head, never finished
        started = time.monotonic()
        for client in silent + loris + [kept_alive]:
            assert closed_within(client, 2.0)
            client.close()
        assert time.monotonic() - started < 2.0
        assert healthy(server)
    finally:
        stop()


def test_a_body_sent_slowly_within_the_timeout_is_served_and_a_stalled_one_is_408(gguf_generator):
    server, stop = start_server([gguf_generator], template="chatml", read_timeout=0.5)
    address = urlsplit(server.url)
    data = json.dumps({"model": "tiny", "prompt": "Once upon a time", "max_tokens": 1}).encode()
    head = (
        "POST /v1/completions HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\n"
        f"Authorization: Bearer {API_KEY}\r\nContent-Length: {len(data)}\r\n\r\n"
    ).encode()
    try:
        client = socket.create_connection((address.hostname, address.port))
        client.sendall(head)
        for at in range(0, len(data), 10):  # over 1 s in all, but never 0.5 s without a byte
            time.sleep(0.2)
            client.sendall(data[at : at + 10])
        client.settimeout(10)
        assert client.recv(4096).startswith(b"HTTP/1.1 200")
        client.close()

        client = socket.create_connection((address.hostname, address.port))
        client.sendall(head + data[:5])
        client.settimeout(10)
        answer = b""
        while b"}}" not in answer:
            answer += client.recv(4096)
        assert answer.startswith(b"HTTP/1.1 408") and b'"code":"request_timeout"' in answer
        assert closed_within(client, 2.0)
        client.close()
    finally:
        stop()


def test_at_max_connections_requests_get_503_and_beyond_it_connections_are_closed(gguf_generator):
    server, stop = start_server([gguf_generator], template="chatml", max_connections=3)
    address = urlsplit(server.url)
    try:
        idle = [socket.create_connection((address.hostname, address.port)) for _ in range(2)]
        time.sleep(0.2)
        assert http_request(address.port, "GET", "/health")[0] == 503  # the third connection: uvicorn's own answer (plain text)
        idle.append(socket.create_connection((address.hostname, address.port)))
        time.sleep(0.2)
        beyond = socket.create_connection((address.hostname, address.port))
        assert closed_within(beyond, 2.0)
        for client in idle + [beyond]:
            client.close()
        assert wait_for(lambda: http_request(address.port, "GET", "/health")[0] == 200, limit=5)
    finally:
        stop()


def test_urllib_and_requests_see_the_413_not_a_reset(gguf_server):
    import urllib.error
    import urllib.request

    body = json.dumps({"model": "tiny", "prompt": "x" * 5_000_000}).encode()  # far over the limit, all sent before reading
    headers = {"Content-Type": "application/json", "Authorization": f"Bearer {API_KEY}"}
    with pytest.raises(urllib.error.HTTPError) as refused:
        urllib.request.urlopen(urllib.request.Request(f"{gguf_server.url}/v1/completions", data=body, headers=headers), timeout=60)
    assert refused.value.code == 413 and json.loads(refused.value.read())["error"]["code"] == "request_too_large"

    requests = pytest.importorskip("requests")
    for data in (body, (body[at : at + 65536] for at in range(0, len(body), 65536))):  # announced, then chunked
        response = requests.post(f"{gguf_server.url}/v1/completions", data=data, headers=headers, timeout=60)
        assert response.status_code == 413 and response.json()["error"]["code"] == "request_too_large"
    assert healthy(gguf_server)
