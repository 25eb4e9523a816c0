"""Each route alone: an app with one router, the shared state in ``app.state`` around a fake byte model
(tests/fake_model.py), and the API's error handlers — no weights, no other route, no socket."""

from __future__ import annotations

import base64
import json
import math
import struct

import pytest
from fastapi import FastAPI
from fastapi.testclient import TestClient
from prometheus_client.parser import text_string_to_metric_families

from cnllm.core.server.errors import add_error_handlers
from cnllm.core.server.routes import chat, completions, embeddings, health, metrics, models, tokenize
from cnllm.core.server.state import ServerConfig, install_state
from tests.fake_model import UNIFORM, ByteModel

NAME = "bytes"


@pytest.fixture
def mount():
    """``mount(router, model)``: a client of an app serving only ``router`` on ``model`` (template none)."""
    pools = []

    def build(router, model: ByteModel | None = None) -> TestClient:
        app = FastAPI()
        pools.append(install_state(app, [model or ByteModel(b"hello")], ServerConfig(model_name=NAME, template="none")).pool)
        add_error_handlers(app)
        app.include_router(router)
        return TestClient(app)

    yield build
    for pool in pools:
        pool.close()


def events(response) -> list:
    """The SSE payloads of a streamed answer, ``[DONE]`` as the string."""
    payloads = [line.removeprefix("data: ") for line in response.text.split("\n\n") if line]
    return [payload if payload == "[DONE]" else json.loads(payload) for payload in payloads]


def test_health_alone(mount):
    client = mount(health.router)
    answer = client.get("/health")
    assert answer.status_code == 200
    assert answer.json() == {"status": "ok", "model": NAME, "slots": {"total": 1, "busy": 0, "waiting": 0}}
    missing = client.get("/v1/models")  # no other router is mounted
    assert missing.status_code == 404 and missing.json()["error"]["type"] == "not_found_error"


def test_models_alone(mount):
    client = mount(models.router)
    listed = client.get("/v1/models").json()
    assert [card["id"] for card in listed["data"]] == [NAME]
    assert client.get(f"/v1/models/{NAME}").json()["id"] == NAME
    other = client.get("/v1/models/other")
    assert other.status_code == 404 and other.json()["error"]["code"] == "model_not_found"
    assert client.get("/health").status_code == 404


def test_chat_completions_alone(mount):
    client = mount(chat.router, ByteModel(b"hello"))
    body = {"model": NAME, "messages": [{"role": "user", "content": "Hi"}], "temperature": 0}
    answer = client.post("/v1/chat/completions", json=body).json()
    choice = answer["choices"][0]
    assert choice["message"] == {"role": "assistant", "content": "hello"} and choice["finish_reason"] == "stop"
    assert answer["usage"] == {"prompt_tokens": 2, "completion_tokens": 6, "total_tokens": 8}  # "Hi"; "hello" and its EOS

    streamed = events(client.post("/v1/chat/completions", json={**body, "stream": True, "stream_options": {"include_usage": True}}))
    assert streamed[-1] == "[DONE]" and streamed[0]["choices"][0]["delta"]["role"] == "assistant"
    assert "".join(e["choices"][0]["delta"].get("content") or "" for e in streamed[:-1] if e["choices"]) == "hello"
    assert streamed[-2]["usage"]["completion_tokens"] == 6

    refused = client.post("/v1/chat/completions", json={**body, "logprobs": True})
    assert refused.status_code == 400 and refused.json()["error"]["param"] == "logprobs"
    too_long = client.post("/v1/chat/completions", json={**body, "messages": [{"role": "user", "content": "x" * 100}]})
    assert too_long.status_code == 400 and too_long.json()["error"]["code"] == "context_length_exceeded"
    assert client.post("/v1/completions", json={"model": NAME, "prompt": "a"}).status_code == 404


def test_completions_alone(mount):
    client = mount(completions.router, ByteModel(b"xyz", eos=False))
    answer = client.post("/v1/completions", json={"model": NAME, "prompt": "ab", "max_tokens": 3, "echo": True, "logprobs": 1}).json()
    choice = answer["choices"][0]
    assert choice["text"] == "abxyz" and choice["finish_reason"] == "length"
    assert choice["logprobs"]["tokens"] == ["a", "b", "x", "y", "z"] and choice["logprobs"]["text_offset"] == [0, 1, 2, 3, 4]
    assert choice["logprobs"]["token_logprobs"] == [None] + [pytest.approx(UNIFORM)] * 4
    assert answer["usage"] == {"prompt_tokens": 2, "completion_tokens": 3, "total_tokens": 5}

    by_ids = client.post("/v1/completions", json={"model": NAME, "prompt": [97, 98], "max_tokens": 1}).json()
    assert by_ids["choices"][0]["text"] == "x"
    outside = client.post("/v1/completions", json={"model": NAME, "prompt": [97, 300]})
    assert outside.status_code == 400 and "outside this model's vocabulary" in outside.json()["error"]["message"]
    streamed_echo = client.post("/v1/completions", json={"model": NAME, "prompt": "ab", "stream": True, "echo": True})
    assert streamed_echo.status_code == 400 and streamed_echo.json()["error"]["param"] == "stream"
    streamed = events(client.post("/v1/completions", json={"model": NAME, "prompt": "ab", "max_tokens": 2, "stream": True}))
    assert "".join(e["choices"][0]["text"] for e in streamed[:-1]) == "xy" and streamed[-1] == "[DONE]"


def test_embeddings_alone(mount):
    client = mount(embeddings.router)
    answer = client.post("/v1/embeddings", json={"model": NAME, "input": ["ab", "b"]}).json()
    first, second = (item["embedding"] for item in answer["data"])
    assert first[97] == pytest.approx(1 / math.sqrt(2)) and first[98] == pytest.approx(1 / math.sqrt(2))
    assert second[98] == pytest.approx(1.0) and answer["usage"] == {"prompt_tokens": 3, "completion_tokens": 0, "total_tokens": 3}

    packed = client.post("/v1/embeddings", json={"model": NAME, "input": "b", "encoding_format": "base64"}).json()
    assert list(struct.unpack("<256f", base64.b64decode(packed["data"][0]["embedding"]))) == pytest.approx(second)
    empty = client.post("/v1/embeddings", json={"model": NAME, "input": ["a", ""]})
    assert empty.status_code == 400 and empty.json()["error"]["param"] == "input"
    sized = client.post("/v1/embeddings", json={"model": NAME, "input": "a", "dimensions": 8})
    assert sized.status_code == 400 and sized.json()["error"]["param"] == "dimensions"
    wrong = client.post("/v1/embeddings", json={"model": "other", "input": "a"})
    assert wrong.status_code == 404 and wrong.json()["error"]["code"] == "model_not_found"


def test_metrics_alone(mount):
    client = mount(metrics.router)
    answer = client.get("/metrics")
    assert answer.status_code == 200 and answer.headers["content-type"].startswith("text/plain")
    families = {family.name: family for family in text_string_to_metric_families(answer.text)}
    assert {"cnllm_requests", "cnllm_prompt_tokens", "cnllm_completion_tokens", "cnllm_requests_running", "cnllm_requests_waiting"} <= set(families)
    assert {"cnllm_time_to_first_token_seconds", "cnllm_inter_token_latency_seconds", "cnllm_request_duration_seconds"} <= set(families)
    assert families["cnllm_requests_waiting"].samples[0].value == 0 and families["cnllm_requests_running"].samples[0].value == 0
    assert client.get("/health").status_code == 404


CHINESE = "你好，世界！中文分词 abc"


def test_tokenize_and_detokenize_alone(mount):
    model = ByteModel()
    client = mount(tokenize.router, model)
    tokens = client.post("/tokenize", json={"content": CHINESE}).json()["tokens"]
    assert tokens == list(CHINESE.encode("utf-8"))
    assert client.post("/detokenize", json={"tokens": tokens}).json() == {"content": CHINESE}

    pieces = client.post("/tokenize", json={"content": "你a", "with_pieces": True}).json()["tokens"]
    assert pieces == [{"id": 228, "piece": ""}, {"id": 189, "piece": ""}, {"id": 160, "piece": "你"}, {"id": 97, "piece": "a"}]
    model.bos_id = 1  # special tokens are added only when asked, as llama-server does
    assert client.post("/tokenize", json={"content": "a"}).json()["tokens"] == [97]
    assert client.post("/tokenize", json={"content": "a", "add_special": True}).json()["tokens"] == [1, 97]
    assert client.post("/detokenize", json={"tokens": []}).json() == {"content": ""}


@pytest.mark.parametrize(
    ("path", "body", "param"),
    [
        ("/detokenize", {"tokens": [97, 257]}, "tokens"),
        ("/detokenize", {"tokens": [-1]}, "tokens"),
        ("/detokenize", {"tokens": "abc"}, "tokens"),
        ("/detokenize", {}, "tokens"),
        ("/tokenize", {"content": 5}, "content"),
        ("/tokenize", {}, "content"),
    ],
)
def test_tokenize_and_detokenize_refuse_bad_input(mount, path, body, param):
    answer = mount(tokenize.router).post(path, json=body)
    assert answer.status_code == 400
    error = answer.json()["error"]
    assert error["type"] == "invalid_request_error" and error["param"] == param
