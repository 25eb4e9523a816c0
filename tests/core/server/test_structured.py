"""Structured output (``response_format``): on a GGUF model a llama.cpp grammar holds random weights to the schema;
a backend without grammars, or a schema without a grammar, is a 400 before any slot is leased."""

from __future__ import annotations

import json

import pytest
from fastapi import FastAPI
from fastapi.testclient import TestClient

from cnllm.core.server.errors import add_error_handlers
from cnllm.core.server.routes import chat, completions
from cnllm.core.server.state import ServerConfig, install_state
from tests.core.generation.test_llamacpp import PERSON, check_person
from tests.core.server.test_routes import events
from tests.fake_model import ByteModel

NAME = "tiny"
PERSON_FORMAT = {"type": "json_schema", "json_schema": {"name": "person", "schema": PERSON, "strict": True}}


def serve(model) -> tuple[TestClient, object]:
    app = FastAPI()
    pool = install_state(app, [model], ServerConfig(model_name=NAME, template="chatml")).pool
    add_error_handlers(app)
    app.include_router(chat.router)
    app.include_router(completions.router)
    return TestClient(app), pool


@pytest.fixture(scope="module")
def gguf_client(tiny_gguf):
    from cnllm.core.backends import load_model

    with load_model(tiny_gguf) as model:
        client, pool = serve(model)
        yield client
        pool.close()


def chat_body(response_format, **extra) -> dict:
    messages = [{"role": "user", "content": "Describe a person as JSON."}]
    return {"model": NAME, "messages": messages, "max_tokens": 200, "seed": 1, "response_format": response_format, **extra}


@pytest.mark.parametrize("temperature", [0, 1.0])
def test_a_json_schema_answer_follows_the_schema(gguf_client, temperature):
    answer = gguf_client.post("/v1/chat/completions", json=chat_body(PERSON_FORMAT, temperature=temperature)).json()
    choice = answer["choices"][0]
    assert choice["finish_reason"] == "stop", choice
    check_person(choice["message"]["content"])


def test_a_streamed_json_schema_answer_follows_the_schema(gguf_client):
    streamed = events(gguf_client.post("/v1/chat/completions", json=chat_body(PERSON_FORMAT, stream=True)))
    assert streamed[-1] == "[DONE]" and streamed[-2]["choices"][0]["finish_reason"] == "stop"
    check_person("".join(e["choices"][0]["delta"].get("content") or "" for e in streamed[:-1]))


def test_json_object_gives_an_object(gguf_client):
    """Random weights may ramble inside a string until max_tokens; every answer that ends is a JSON object (raw control
    characters, which llama-cpp-python's converter lets into strings, kept out)."""
    finished = 0
    for seed in range(6):
        body = chat_body({"type": "json_object"}, max_tokens=300, temperature=1.0, seed=seed)
        choice = gguf_client.post("/v1/chat/completions", json=body).json()["choices"][0]
        if choice["finish_reason"] == "stop":
            finished += 1
            assert isinstance(json.loads(choice["message"]["content"]), dict), choice
    assert finished
    text = gguf_client.post("/v1/chat/completions", json=chat_body({"type": "text"}, max_tokens=20, temperature=0)).json()
    with pytest.raises(ValueError):
        json.loads(text["choices"][0]["message"]["content"])  # without a constraint the random weights ramble


def test_completions_take_a_response_format_too(gguf_client):
    body = {"model": NAME, "prompt": "Person:", "max_tokens": 200, "temperature": 0, "response_format": PERSON_FORMAT}
    answer = gguf_client.post("/v1/completions", json=body).json()
    assert answer["choices"][0]["finish_reason"] == "stop"
    check_person(answer["choices"][0]["text"])
    streamed = events(gguf_client.post("/v1/completions", json={**body, "stream": True}))
    check_person("".join(e["choices"][0]["text"] for e in streamed[:-1]))


@pytest.mark.parametrize(
    "response_format, message",
    [
        ({"type": "json_schema", "json_schema": {"name": "x", "schema": {"type": "no-such-type"}}}, "cannot be turned into a grammar"),
        ({"type": "json_schema", "json_schema": {"name": "x", "schema": {"$ref": "#/$defs/missing"}}}, "cannot be turned into a grammar"),
        ({"type": "json_schema"}, "needs a json_schema object"),
        ({"type": "json_schema", "json_schema": {"name": "x", "schema": {"type": "string", "maxLength": 5000}}}, "too large for llama.cpp"),
    ],
)
def test_an_invalid_schema_is_a_400(gguf_client, response_format, message):
    refused = gguf_client.post("/v1/chat/completions", json=chat_body(response_format))
    assert refused.status_code == 400, refused.text
    error = refused.json()["error"]
    assert error["type"] == "invalid_request_error" and error["param"] == "response_format" and message in error["message"]
    assert gguf_client.post("/v1/chat/completions", json=chat_body(PERSON_FORMAT)).json()["choices"][0]["finish_reason"] == "stop"


def test_a_malformed_response_format_is_a_400(gguf_client):
    for response_format in ({"type": "xml"}, {"type": "json_schema", "json_schema": {"name": "x", "schema": 5}}):
        refused = gguf_client.post("/v1/chat/completions", json=chat_body(response_format))
        assert refused.status_code == 400 and refused.json()["error"]["param"].startswith("response_format"), refused.text


def test_a_backend_without_grammars_refuses_structured_output():
    client, pool = serve(ByteModel(b"hello", context_length=512))
    try:
        for path, body in (
            ("/v1/chat/completions", chat_body({"type": "json_object"})),
            ("/v1/completions", {"model": NAME, "prompt": "a", "response_format": PERSON_FORMAT, "stream": True}),
        ):
            refused = client.post(path, json=body)
            assert refused.status_code == 400 and refused.json()["error"]["param"] == "response_format"
            assert "needs a GGUF model" in refused.json()["error"]["message"]
        plain = client.post("/v1/chat/completions", json=chat_body({"type": "text"}, temperature=0))
        assert plain.json()["choices"][0]["message"]["content"] == "hello", plain.text
    finally:
        pool.close()


def test_the_openai_client_gets_a_schema_answer(tiny_gguf):
    from cnllm.core.backends import load_model
    from tests.core.server.conftest import start_server

    with load_model(tiny_gguf) as model:
        server, stop = start_server([model], model_name=NAME, template="chatml")
        try:
            client = server.client()
            messages = [{"role": "user", "content": "Describe a person as JSON."}]
            answer = client.chat.completions.create(model=NAME, messages=messages, max_tokens=200, temperature=0, response_format=PERSON_FORMAT)
            check_person(answer.choices[0].message.content)
            import openai

            with pytest.raises(openai.BadRequestError, match="cannot be turned into a grammar"):
                client.chat.completions.create(
                    model=NAME, messages=messages, response_format={"type": "json_schema", "json_schema": {"name": "x", "schema": {"type": "nope"}}}
                )
        finally:
            stop()
