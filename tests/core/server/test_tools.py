"""Tool calls on ``/v1/chat/completions``: a scripted byte model writes the calls (tests/fake_model.py) and records the
prompt and schema it was given; on the tiny GGUF a forced call's grammar holds random weights to a parseable call."""

from __future__ import annotations

import json

import pytest
from fastapi import FastAPI
from fastapi.testclient import TestClient

from cnllm.core.server.errors import add_error_handlers
from cnllm.core.server.routes import chat
from cnllm.core.server.state import ServerConfig, install_state
from cnllm.core.tool_calls import HERMES, LLAMA3_JSON
from tests.core.server.test_routes import events
from tests.fake_model import ByteModel

NAME = "tiny"
WEATHER = {
    "type": "function",
    "function": {
        "name": "get_weather",
        "description": "今天的天气",
        "parameters": {"type": "object", "properties": {"city": {"type": "string", "maxLength": 8}}, "required": ["city"]},
    },
}
NOW = {"type": "function", "function": {"name": "now", "description": "the time"}}
ASK = [{"role": "user", "content": "北京天气?"}]
HERMES_CALL = '<tool_call>\n{"name": "get_weather", "arguments": {"city": "北京"}}\n</tool_call>'
HISTORY = [
    *ASK,
    {"role": "assistant", "content": None, "tool_calls": [{"id": "call_1", "type": "function", "function": {"name": "get_weather", "arguments": '{"city": "北京"}'}}]},
    {"role": "tool", "tool_call_id": "call_1", "content": "晴，25°C"},
]


class ToolModel(ByteModel):
    """Writes ``script`` and records each prompt and JSON schema; ``grammar``: takes a schema as a GGUF model does
    (the script stands for what the grammar let through)."""

    def __init__(self, script: str, *, grammar: bool = False):
        super().__init__(script.encode("utf-8"), context_length=8192)
        self.grammar = grammar
        self.prompts: list[str] = []
        self.schemas: list[dict | None] = []

    def check_sampling(self, params):
        if not self.grammar:
            super().check_sampling(params)

    def generate_ids(self, prompt_ids, params, max_tokens, cancel):
        self.prompts.append(self.decode(prompt_ids))
        self.schemas.append(params.json_schema)
        yield from super().generate_ids(prompt_ids, params, max_tokens, cancel)


def chat_app(model, template: str = "chatml") -> tuple[FastAPI, object]:
    app = FastAPI()
    pool = install_state(app, [model], ServerConfig(model_name=NAME, template=template)).pool
    add_error_handlers(app)
    app.include_router(chat.router)
    return app, pool


@pytest.fixture
def serve():
    """``serve(model, template)``: a client of an app with the chat route on ``model``. The client is entered, so all
    its requests share one event loop: a streamed answer's slot is given back on the loop that leased it, which a
    client without one closes as soon as the response is read (then the next request would wait for the slot forever)."""
    opened = []

    def build(model, template: str = "chatml") -> TestClient:
        app, pool = chat_app(model, template)
        client = TestClient(app)
        client.__enter__()
        opened.append((client, pool))
        return client

    yield build
    for client, pool in opened:
        client.__exit__(None, None, None)
        pool.close()


def body(messages=ASK, **extra) -> dict:
    return {"model": NAME, "messages": messages, "max_tokens": 300, **extra}


def answer(client, **extra) -> dict:
    response = client.post("/v1/chat/completions", json=body(**extra))
    assert response.status_code == 200, response.text
    return response.json()["choices"][0]


def test_a_hermes_call_comes_back_as_tool_calls(serve):
    model = ToolModel(HERMES_CALL)
    choice = answer(serve(model), tools=[WEATHER, NOW])
    assert choice["finish_reason"] == "tool_calls"
    message = choice["message"]
    assert message["content"] is None
    [call] = message["tool_calls"]
    assert call["id"].startswith("call_") and call["type"] == "function"
    assert call["function"] == {"name": "get_weather", "arguments": '{"city": "北京"}'}
    prompt = model.prompts[-1]
    assert "<tools>\n" + json.dumps(WEATHER, ensure_ascii=False) + "\n" + json.dumps(NOW, ensure_ascii=False) + "\n</tools>" in prompt
    assert prompt.endswith("<|im_start|>user\n北京天气?<|im_end|>\n<|im_start|>assistant\n") and model.schemas[-1] is None


def test_text_around_calls_is_the_content(serve):
    choice = answer(serve(ToolModel("我查一下。\n" + HERMES_CALL + "\n" + HERMES_CALL.replace("北京", "上海"))), tools=[WEATHER])
    assert choice["message"]["content"] == "我查一下。" and choice["finish_reason"] == "tool_calls"
    assert [json.loads(c["function"]["arguments"])["city"] for c in choice["message"]["tool_calls"]] == ["北京", "上海"]
    assert len({c["id"] for c in choice["message"]["tool_calls"]}) == 2


def test_parallel_tool_calls_false_keeps_the_first(serve):
    client = serve(ToolModel(HERMES_CALL + "\n" + HERMES_CALL.replace("北京", "上海")))
    choice = answer(client, tools=[WEATHER], parallel_tool_calls=False)
    assert [json.loads(c["function"]["arguments"])["city"] for c in choice["message"]["tool_calls"]] == ["北京"]
    streamed = events(client.post("/v1/chat/completions", json=body(tools=[WEATHER], parallel_tool_calls=False, stream=True)))
    assert {d["index"] for e in streamed[:-1] for d in e["choices"][0]["delta"].get("tool_calls") or []} == {0}


def test_an_answer_without_calls_keeps_its_shape(serve):
    choice = answer(serve(ToolModel("北京今天晴。")), tools=[WEATHER])
    assert choice == {"index": 0, "message": {"role": "assistant", "content": "北京今天晴。"}, "finish_reason": "stop", "logprobs": None}


def test_a_call_to_a_function_not_offered_is_text(serve):
    text = HERMES_CALL.replace("get_weather", "delete_files")
    choice = answer(serve(ToolModel(text)), tools=[WEATHER])
    assert choice["message"] == {"role": "assistant", "content": text} and choice["finish_reason"] == "stop"


def test_tool_choice_none_shows_no_tools_and_reads_no_calls(serve):
    model = ToolModel(HERMES_CALL)
    choice = answer(serve(model), tools=[WEATHER], tool_choice="none")
    assert choice["message"] == {"role": "assistant", "content": HERMES_CALL} and "<tools>" not in model.prompts[-1]


def test_calls_and_results_in_the_history_are_rendered(serve):
    model = ToolModel("北京晴，25°C。")
    choice = answer(serve(model), messages=HISTORY, tools=[WEATHER])
    assert choice["message"]["content"] == "北京晴，25°C。"
    assert model.prompts[-1].endswith(
        "<|im_start|>assistant\n" + HERMES_CALL + "<|im_end|>\n<|im_start|>user\n<tool_response>\n晴，25°C\n</tool_response><|im_end|>\n"
        "<|im_start|>assistant\n"
    )


def test_streamed_calls_arrive_as_openai_deltas(serve):
    from openai.lib.streaming.chat import ChatCompletionStreamState
    from openai.types.chat import ChatCompletionChunk

    response = serve(ToolModel("我查一下。" + HERMES_CALL)).post("/v1/chat/completions", json=body(tools=[WEATHER], stream=True))
    streamed = events(response)
    assert streamed[-1] == "[DONE]"
    deltas = [e["choices"][0]["delta"] for e in streamed[:-1]]
    assert deltas[0] == {"role": "assistant", "content": ""}
    content = [d["content"] for d in deltas if d.get("content")]
    assert "".join(content) == "我查一下。"
    calls = [d["tool_calls"][0] for d in deltas if "tool_calls" in d]
    assert calls[0]["index"] == 0 and calls[0]["id"].startswith("call_") and calls[0]["type"] == "function"
    assert calls[0]["function"] == {"name": "get_weather", "arguments": ""}
    assert calls[1] == {"index": 0, "function": {"arguments": '{"city": "北京"}'}}
    assert deltas.index(next(d for d in deltas if d.get("content"))) < deltas.index(next(d for d in deltas if "tool_calls" in d))
    assert streamed[-2]["choices"][0]["finish_reason"] == "tool_calls"
    state = ChatCompletionStreamState()  # the openai SDK's own accumulation reads the deltas back
    for event in streamed[:-1]:
        state.handle_chunk(ChatCompletionChunk.model_validate(event))
    message = state.get_final_completion().choices[0].message
    assert message.content == "我查一下。" and message.tool_calls[0].function.name == "get_weather"
    assert json.loads(message.tool_calls[0].function.arguments) == {"city": "北京"}


def test_llama3_json_calls(serve):
    model = ToolModel('{"name": "get_weather", "parameters": {"city": "北京"}}')
    choice = answer(serve(model, "llama3"), tools=[WEATHER])
    assert choice["finish_reason"] == "tool_calls" and choice["message"]["content"] is None
    assert choice["message"]["tool_calls"][0]["function"] == {"name": "get_weather", "arguments": '{"city": "北京"}'}
    assert "Given the following functions" in model.prompts[-1]


@pytest.mark.parametrize("stream", [False, True])
def test_a_required_call_is_forced_by_a_schema_after_the_opening_tag(serve, stream):
    model = ToolModel('{"name": "get_weather", "arguments": {"city": "北京"}}', grammar=True)
    client = serve(model)
    response = client.post("/v1/chat/completions", json=body(tools=[WEATHER, NOW], tool_choice="required", stream=stream))
    assert model.schemas[-1] == HERMES.call_schema([WEATHER["function"], NOW["function"]])
    assert model.prompts[-1].endswith("<|im_start|>assistant\n<tool_call>\n")
    if stream:
        streamed = events(response)
        calls = [d for e in streamed[:-1] for d in e["choices"][0]["delta"].get("tool_calls") or []]
        assert calls[0]["function"]["name"] == "get_weather" and calls[1]["function"]["arguments"] == '{"city": "北京"}'
        assert streamed[-2]["choices"][0]["finish_reason"] == "tool_calls"
    else:
        choice = response.json()["choices"][0]
        assert choice["finish_reason"] == "tool_calls" and choice["message"]["tool_calls"][0]["function"]["name"] == "get_weather"


def test_a_named_tool_choice_forces_that_function(serve):
    model = ToolModel('{"name": "now", "parameters": {}}', grammar=True)
    choice = answer(serve(model, "llama3"), tools=[WEATHER, NOW], tool_choice={"type": "function", "function": {"name": "now"}})
    assert model.schemas[-1] == LLAMA3_JSON.call_schema([NOW["function"]])
    assert choice["message"]["tool_calls"][0]["function"] == {"name": "now", "arguments": "{}"}
    assert model.prompts[-1].endswith("<|start_header_id|>assistant<|end_header_id|>\n\n")  # Llama-3 calls are bare JSON


@pytest.mark.parametrize(
    "template, extra, param, message",
    [
        ("llama2", {"tools": [WEATHER]}, "tools", "the llama2 template has no tool calls"),
        ("none", {"tools": [WEATHER]}, "tools", "plain continuation"),
        ("llama2", {"messages": HISTORY}, "messages", "has no tool calls"),
        ("chatml", {"tools": [WEATHER], "tool_choice": {"type": "function", "function": {"name": "nope"}}}, "tool_choice", "'nope', which is not among"),
        ("chatml", {"tool_choice": "required"}, "tool_choice", "has no tools"),
        ("chatml", {"tools": [WEATHER], "tool_choice": "required"}, "tool_choice", "needs a GGUF model"),
        ("chatml", {"tools": [WEATHER], "tool_choice": "sometimes"}, "tool_choice", ""),
        ("chatml", {"tools": [{"type": "function"}]}, "tools.0.function", "Field required"),
        ("chatml", {"tools": [{"type": "function", "function": {"name": "get weather!"}}]}, "tools.0.function.name", "pattern"),
        ("chatml", {"tools": [{"type": "retrieval", "function": {"name": "x"}}]}, "tools.0.type", ""),
        ("chatml", {"tools": [WEATHER, WEATHER]}, "tools", "more than one function is named 'get_weather'"),
        ("chatml", {"tools": [WEATHER], "response_format": {"type": "json_object"}}, "response_format", "cannot be combined"),
        ("chatml", {"messages": [*HISTORY[:2], {"role": "tool", "content": "晴"}]}, "messages.2.tool_call_id", "needs the tool_call_id"),
        ("chatml", {"messages": [*ASK, {"role": "tool", "tool_call_id": "x", "content": "晴"}]}, "messages", "expected a assistant message, got tool"),
        (
            "chatml",
            {"messages": [*ASK, {"role": "assistant", "tool_calls": [{"id": "c", "function": {"name": "now", "arguments": "{oops"}}]}]},
            "messages",
            "not valid JSON",
        ),
    ],
)
def test_tool_requests_that_cannot_be_served_are_400s(serve, template, extra, param, message):
    model = ToolModel(HERMES_CALL)
    client = serve(model, template)
    refused = client.post("/v1/chat/completions", json=body(**extra))
    assert refused.status_code == 400, refused.text
    error = refused.json()["error"]
    assert error["type"] == "invalid_request_error" and error["param"] == param and message in error["message"], error
    assert model.prompts == []  # refused before generation
    assert client.post("/v1/chat/completions", json=body(tools=[WEATHER], tool_choice="none")).status_code == 200  # the server goes on


def test_the_openai_client_gets_tool_calls():
    from tests.core.server.conftest import start_server

    server, stop = start_server([ToolModel("好的。" + HERMES_CALL)], model_name=NAME, template="chatml")
    try:
        client = server.client()
        message = client.chat.completions.create(model=NAME, messages=ASK, tools=[WEATHER]).choices[0].message
        assert message.content == "好的。" and message.tool_calls[0].function.name == "get_weather"
        followed = client.chat.completions.create(
            model=NAME, messages=[*ASK, message.model_dump(exclude_none=True), {"role": "tool", "tool_call_id": message.tool_calls[0].id, "content": "晴"}]
        )
        assert followed.choices[0].finish_reason == "stop"  # no tools in this request: the scripted call is plain text
        with client.chat.completions.stream(model=NAME, messages=ASK, tools=[WEATHER]) as stream:
            final = stream.get_final_completion()
        assert json.loads(final.choices[0].message.tool_calls[0].function.arguments) == {"city": "北京"}
    finally:
        stop()


@pytest.fixture(scope="module")
def gguf_client(tiny_gguf):
    from cnllm.core.backends import load_model
    from cnllm.core.generation.base import LoadOptions

    with load_model(tiny_gguf, LoadOptions(n_ctx=2048)) as model:  # the tools prompt alone is about 480 of its tokens
        app, pool = chat_app(model)
        with TestClient(app) as client:  # one event loop for every request (see serve)
            yield client
        pool.close()


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_a_grammar_forced_call_on_random_weights_parses(gguf_client, seed):
    """The tiny GGUF's random weights cannot choose a tool; the grammar makes every answer a call that the schema accepts."""
    choice = gguf_client.post("/v1/chat/completions", json=body(tools=[WEATHER, NOW], tool_choice="required", temperature=1.0, seed=seed)).json()["choices"][0]
    assert choice["finish_reason"] == "tool_calls", choice
    [call] = choice["message"]["tool_calls"]
    arguments = json.loads(call["function"]["arguments"])
    if call["function"]["name"] == "get_weather":
        assert set(arguments) == {"city"} and isinstance(arguments["city"], str) and len(arguments["city"]) <= 8
    else:
        assert call["function"]["name"] == "now" and arguments == {}


def test_a_named_grammar_forced_call_on_random_weights_streams(gguf_client):
    named = {"type": "function", "function": {"name": "get_weather"}}
    streamed = events(gguf_client.post("/v1/chat/completions", json=body(tools=[WEATHER, NOW], tool_choice=named, temperature=0, stream=True)))
    assert streamed[-1] == "[DONE]" and streamed[-2]["choices"][0]["finish_reason"] == "tool_calls"
    calls = [d for e in streamed[:-1] for d in e["choices"][0]["delta"].get("tool_calls") or []]
    assert calls[0]["function"]["name"] == "get_weather"
    assert set(json.loads(calls[1]["function"]["arguments"])) == {"city"}
    auto = gguf_client.post("/v1/chat/completions", json=body(tools=[WEATHER], temperature=0, max_tokens=20)).json()["choices"][0]
    assert auto["finish_reason"] in ("stop", "length") and "tool_calls" not in auto["message"]  # unforced, random weights ramble
