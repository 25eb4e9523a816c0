"""The OpenAI wire format, checked with the official ``openai`` client against a live server on the tiny model."""

from __future__ import annotations

import json
import math
import time
import urllib.error
import urllib.request

import openai
import pytest
from prometheus_client.parser import text_string_to_metric_families

from tests.core.server.conftest import API_KEY, start_server

USER = [{"role": "user", "content": "你好, tell me a story"}]


def raw(server, method: str, path: str, body: bytes | dict | None = None, key: str | None = API_KEY):
    data = json.dumps(body).encode() if isinstance(body, dict) else body
    headers = {"Content-Type": "application/json", **({"Authorization": f"Bearer {key}"} if key else {})}
    request = urllib.request.Request(server.url + path, data=data, method=method, headers=headers)
    try:
        with urllib.request.urlopen(request, timeout=60) as response:
            return response.status, json.loads(response.read())
    except urllib.error.HTTPError as error:
        return error.code, json.loads(error.read())


def test_models_and_health(live_server):
    models = live_server.client().models.list()
    assert [m.id for m in models.data] == ["tiny"]
    status, body = raw(live_server, "GET", "/health", key=None)
    assert status == 200 and body["status"] == "ok" and body["slots"]["total"] == 1


def test_chat_completion_and_its_stream_agree(live_server):
    client = live_server.client()
    reply = client.chat.completions.create(model="tiny", messages=USER, max_tokens=8, temperature=0, seed=1)
    choice = reply.choices[0]
    assert reply.object == "chat.completion" and choice.message.role == "assistant"
    assert choice.finish_reason in ("stop", "length") and choice.message.content
    assert reply.usage.completion_tokens <= 8 and reply.usage.total_tokens == reply.usage.prompt_tokens + reply.usage.completion_tokens

    chunks = list(
        client.chat.completions.create(
            model="tiny", messages=USER, max_tokens=8, temperature=0, stream=True, stream_options={"include_usage": True}
        )
    )
    assert chunks[0].choices[0].delta.role == "assistant"
    content = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert content == choice.message.content
    finals = [c.choices[0].finish_reason for c in chunks if c.choices and c.choices[0].finish_reason]
    assert finals == [choice.finish_reason]
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens == reply.usage.completion_tokens


def test_stream_ends_with_done_marker(live_server):
    request = urllib.request.Request(
        live_server.url + "/v1/chat/completions",
        data=json.dumps({"model": "tiny", "messages": USER, "max_tokens": 3, "stream": True}).encode(),
        headers={"Content-Type": "application/json", "Authorization": f"Bearer {API_KEY}"},
    )
    with urllib.request.urlopen(request, timeout=60) as response:
        assert response.headers["content-type"].startswith("text/event-stream")
        events = [line for line in response.read().decode().split("\n\n") if line]
    assert all(e.startswith("data: ") for e in events)
    assert events[-1] == "data: [DONE]"


def test_completion_echo_logprobs_match_the_model(live_server, tiny_generator):
    client = live_server.client()
    prompt = "The quick brown fox"
    result = client.completions.create(model="tiny", prompt=prompt, max_tokens=0, echo=True, logprobs=2)
    choice = result.choices[0]
    assert choice.text == prompt
    ids = tiny_generator.encode_prompt(prompt)
    expected = tiny_generator.prompt_logprobs(ids)
    assert choice.logprobs.token_logprobs[0] is None
    assert choice.logprobs.token_logprobs[1:] == pytest.approx([e.logprob for e in expected[1:]], abs=1e-4)
    assert "".join(choice.logprobs.tokens) == prompt
    assert all(len(top) == 2 for top in choice.logprobs.top_logprobs[1:])

    generated = client.completions.create(model="tiny", prompt=prompt, max_tokens=5, temperature=0, logprobs=1)
    assert len(generated.choices[0].logprobs.token_logprobs) == generated.usage.completion_tokens
    streamed = client.completions.create(model="tiny", prompt=prompt, max_tokens=5, temperature=0, stream=True)
    assert "".join(c.choices[0].text for c in streamed if c.choices) == generated.choices[0].text


def test_embeddings_float_and_base64(live_server):
    client = live_server.client()
    default = client.embeddings.create(model="tiny", input=["hello", "北京"])  # the client asks for base64
    floats = client.embeddings.create(model="tiny", input="hello", encoding_format="float")
    assert len(default.data) == 2 and len(default.data[0].embedding) == 64
    assert default.data[0].embedding == pytest.approx(floats.data[0].embedding, abs=1e-6)
    assert math.isclose(sum(x * x for x in floats.data[0].embedding), 1.0, rel_tol=1e-4)
    assert default.usage.prompt_tokens > 0


@pytest.mark.parametrize(
    "body, status, needle",
    [
        (b"{not json", 400, "not valid JSON"),
        ({"model": "tiny", "messages": []}, 400, "messages"),
        ({"model": "tiny", "messages": [{"role": "wizard", "content": "x"}]}, 400, "unknown role"),
        ({"model": "tiny", "messages": [{"role": "user", "content": 5}]}, 400, "content"),
        ({"model": "tiny", "messages": USER, "max_tokens": -1}, 400, "max_tokens"),
        ({"model": "tiny", "messages": USER, "temperature": "hot"}, 400, "temperature"),
        ({"model": "tiny", "messages": USER, "n": 3}, 400, "n > 1"),
        ({"model": "gpt-4", "messages": USER}, 404, "does not exist"),
        ({"model": "tiny", "messages": [{"role": "user", "content": "word " * 2000}]}, 400, "context window"),
    ],
)
def test_client_mistakes_get_openai_errors_and_the_server_keeps_serving(live_server, body, status, needle):
    code, document = raw(live_server, "POST", "/v1/chat/completions", body)
    assert code == status
    assert needle in document["error"]["message"] and document["error"]["type"]
    assert raw(live_server, "GET", "/health")[0] == 200


def scraped(server) -> dict[str, float]:
    """``/metrics`` of a live server, read without a key: each unlabelled sample's value, labelled ones summed."""
    with urllib.request.urlopen(server.url + "/metrics", timeout=60) as response:
        text = response.read().decode()
    figures: dict[str, float] = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            figures[sample.name] = figures.get(sample.name, 0.0) + sample.value
    return figures


def tokenize_round_trip(server, text: str) -> list[int]:
    """With BOS: without it, a SentencePiece model's ids stand for the text after its space prefix (llama.cpp keeps it)."""
    status, body = raw(server, "POST", "/tokenize", {"content": text, "with_pieces": True, "add_special": True})
    assert status == 200
    ids, pieces = [t["id"] for t in body["tokens"]], [t["piece"] for t in body["tokens"]]
    assert "".join(pieces) == text
    assert raw(server, "POST", "/detokenize", {"tokens": ids}) == (200, {"content": text})
    return ids


def test_tokenize_and_metrics_on_the_tiny_model(live_server, tiny_generator):
    text = "中文大模型：你好，世界"
    assert tokenize_round_trip(live_server, text) == tiny_generator.tokenize(text)
    without_bos = raw(live_server, "POST", "/tokenize", {"content": text})[1]["tokens"]
    assert without_bos == tiny_generator.tokenize(text, add_bos=False)
    status, body = raw(live_server, "POST", "/detokenize", {"tokens": [tiny_generator.vocab_size]})
    assert status == 400 and body["error"]["param"] == "tokens"

    before = scraped(live_server)
    reply = live_server.client().chat.completions.create(model="tiny", messages=USER, max_tokens=5, temperature=0)
    after = scraped(live_server)
    assert after["cnllm_prompt_tokens_total"] - before["cnllm_prompt_tokens_total"] == reply.usage.prompt_tokens
    assert after["cnllm_completion_tokens_total"] - before["cnllm_completion_tokens_total"] == reply.usage.completion_tokens
    assert after["cnllm_time_to_first_token_seconds_count"] - before["cnllm_time_to_first_token_seconds_count"] == 1


def test_api_key_is_required(live_server):
    assert raw(live_server, "GET", "/v1/models", key=None)[0] == 401
    with pytest.raises(openai.AuthenticationError):
        live_server.client(api_key="wrong").models.list()


def test_the_chat_page_needs_no_key_and_talks_only_to_this_server(live_server):
    """The page at ``/`` (driven in a browser in test_chat_page.py) loads without the key; its policy allows no other origin."""
    with urllib.request.urlopen(live_server.url + "/", timeout=60) as response:
        page, headers = response.read().decode(), response.headers
    assert headers["Content-Type"].startswith("text/html") and "/v1/chat/completions" in page and "http" not in page.split("<body>")[1]
    assert "connect-src 'self'" in headers["Content-Security-Policy"] and "default-src 'none'" in headers["Content-Security-Policy"]


def wait_until_idle(server, limit=30.0) -> dict:
    deadline = time.monotonic() + limit
    while True:
        body = raw(server, "GET", "/health")[1]
        if body["slots"]["busy"] == 0 or time.monotonic() > deadline:
            return body
        time.sleep(0.05)


def test_full_queue_is_503_and_a_disconnect_frees_the_slot(tiny_llama_dir):
    from cnllm.core.backends import load_model

    with load_model(tiny_llama_dir) as generator:
        server, stop = start_server([generator], max_waiting=0)
        try:
            client = server.client()
            long = client.chat.completions.create(model="tiny", messages=USER, max_tokens=400, temperature=1.0, stream=True)
            next(iter(long))  # the slot is now busy generating
            with pytest.raises(openai.APIStatusError) as busy:
                client.chat.completions.create(model="tiny", messages=USER, max_tokens=2)
            assert busy.value.status_code == 503
            long.close()
            assert wait_until_idle(server)["slots"]["busy"] == 0
            assert client.chat.completions.create(model="tiny", messages=USER, max_tokens=2).choices[0].message.content is not None
        finally:
            stop()


def test_gguf_server_with_two_slots(tiny_gguf):
    from concurrent.futures import ThreadPoolExecutor

    from cnllm.core.backends import load_model
    from cnllm.core.generation.base import LoadOptions

    first = load_model(tiny_gguf, LoadOptions(sequences=2))
    generators = [first, first]
    server, stop = start_server(generators, template="chatml")
    try:
        client = server.client()

        def ask(index: int) -> str:
            stream = client.chat.completions.create(model="tiny", messages=USER, max_tokens=6, temperature=0, stream=True)
            return "".join(c.choices[0].delta.content or "" for c in stream if c.choices)

        with ThreadPoolExecutor(4) as pool:
            answers = list(pool.map(ask, range(4)))
        assert len(set(answers)) == 1 and answers[0]
        echo = client.completions.create(model="tiny", prompt="Hello world", max_tokens=0, echo=True, logprobs=1)
        assert echo.choices[0].logprobs.token_logprobs[0] is None and len(echo.choices[0].logprobs.token_logprobs) > 2
        assert len(client.embeddings.create(model="tiny", input="hi").data[0].embedding) == 64
        tokenize_round_trip(server, "你好，llama.cpp 的分词器")
        figures = scraped(server)
        assert figures["cnllm_time_to_first_token_seconds_count"] == 4  # the four streams (the echo's empty answer has no token)
        assert figures["cnllm_completion_tokens_total"] >= 4 and figures["cnllm_requests_running"] == 0
    finally:
        stop()
        first.close()


def test_completions_accept_several_prompts_and_token_ids(live_server, tiny_generator):
    client = live_server.client()
    ids = tiny_generator.encode_prompt("Hello world")
    batch = client.completions.create(model="tiny", prompt=["Hello world", "你好"], max_tokens=3, temperature=0)
    assert [c.index for c in batch.choices] == [0, 1]
    by_ids = client.completions.create(model="tiny", prompt=ids, max_tokens=3, temperature=0)
    assert by_ids.choices[0].text == batch.choices[0].text
    status, body = raw(live_server, "POST", "/v1/completions", {"model": "tiny", "prompt": "x", "stream": True, "echo": True})
    assert status == 400 and body["error"]["param"] == "stream"
    status, body = raw(live_server, "POST", "/v1/completions", {"model": "tiny", "prompt": [-5]})
    assert status == 400 and "token" in body["error"]["message"]


def test_template_none_serves_chat_as_plain_continuation(tiny_generator, monkeypatch):
    """``--template none``: chat requests are the plain conversation text even when the model has a chat template."""
    from fastapi.testclient import TestClient

    from cnllm.core.server.app import create_app
    from cnllm.core.server.state import ServerConfig

    monkeypatch.setattr(tiny_generator.tokenizer, "chat_template", "{% for m in messages %}<{{ m.role }}>{{ m.content }}{% endfor %}")
    body = {"model": "tiny", "messages": [{"role": "user", "content": "Hello there"}], "max_tokens": 2, "temperature": 0}
    for template, prompt in (("none", "Hello there"), ("auto", "<user>Hello there")):
        app = create_app([tiny_generator], ServerConfig(model_name="tiny", template=template))
        assert app.state.server.prompt_format.name == template
        with TestClient(app) as client:
            answer = client.post("/v1/chat/completions", json=body).json()
        assert answer["usage"]["prompt_tokens"] == len(tiny_generator.encode_prompt(prompt))
