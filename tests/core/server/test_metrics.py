"""``GET /metrics`` on the whole app (every router, the guard, the request counter) around the fake byte model:
the text parsed as Prometheus reads it, each figure moved by exactly what the requests did."""

from __future__ import annotations

import asyncio

import pytest
from fastapi import FastAPI
from fastapi.testclient import TestClient
from prometheus_client.parser import text_string_to_metric_families

from cnllm.core.server.app import create_app
from cnllm.core.server.state import ServerConfig, install_state
from tests.fake_model import ByteModel

NAME, KEY = "bytes", "sk-metrics"
AUTH = {"Authorization": f"Bearer {KEY}"}


@pytest.fixture
def serve():
    """``serve(model)``: a client of the whole app on ``model`` (API key :data:`KEY`, template none)."""
    apps = []

    def build(model: ByteModel | None = None) -> TestClient:
        app = create_app([model or ByteModel("你好 hello".encode())], ServerConfig(model_name=NAME, api_key=KEY, template="none"))
        apps.append(app)
        return TestClient(app)

    yield build
    for app in apps:
        app.state.server.pool.close()


def samples(client: TestClient) -> dict[tuple[str, tuple], float]:
    """Every sample of ``/metrics`` (read without a key, as a scraper does), by name and sorted labels."""
    answer = client.get("/metrics")
    assert answer.status_code == 200
    return {
        (sample.name, tuple(sorted(sample.labels.items()))): sample.value
        for family in text_string_to_metric_families(answer.text)
        for sample in family.samples
    }


def value(figures: dict, name: str, **labels) -> float:
    return figures.get((name, tuple(sorted(labels.items()))), 0.0)


def test_a_completion_moves_every_figure_by_what_it_did(serve):
    client = serve()
    before = samples(client)
    chat = client.post("/v1/chat/completions", json={"model": NAME, "messages": [{"role": "user", "content": "Hi"}]}, headers=AUTH)
    assert chat.status_code == 200
    streamed = client.post("/v1/completions", json={"model": NAME, "prompt": "abc", "stream": True, "max_tokens": 4}, headers=AUTH)
    assert streamed.status_code == 200 and streamed.text.endswith("data: [DONE]\n\n")
    after = samples(client)

    def moved(name: str, **labels) -> float:
        return value(after, name, **labels) - value(before, name, **labels)

    chat_usage = chat.json()["usage"]
    assert chat_usage == {"prompt_tokens": 2, "completion_tokens": 13, "total_tokens": 15}  # "你好 hello" is 12 bytes, and EOS
    assert moved("cnllm_prompt_tokens_total") == 2 + 3
    assert moved("cnllm_completion_tokens_total") == 13 + 4  # the stream stopped at max_tokens, before EOS
    assert moved("cnllm_requests_total", route="/v1/chat/completions", status="200") == 1
    assert moved("cnllm_requests_total", route="/v1/completions", status="200") == 1
    assert moved("cnllm_requests_total", route="/metrics", status="200") == 1  # the first scrape
    assert moved("cnllm_time_to_first_token_seconds_count") == 2
    assert moved("cnllm_inter_token_latency_seconds_count") == (13 - 1) + (4 - 1)  # the gaps after each first token
    assert moved("cnllm_inter_token_latency_seconds_bucket", le="+Inf") == 15
    for route in ("/v1/chat/completions", "/v1/completions"):
        assert moved("cnllm_request_duration_seconds_count", route=route) == 1
        assert moved("cnllm_request_duration_seconds_sum", route=route) > 0
    assert value(after, "cnllm_requests_running") == 0 and value(after, "cnllm_requests_waiting") == 0


def test_refusals_are_counted_by_route_and_unknown_paths_share_one_label(serve):
    client = serve()
    assert client.post("/v1/chat/completions", json={"model": NAME, "messages": []}).status_code == 401  # no key
    assert client.post("/v1/chat/completions", json={"model": NAME, "messages": []}, headers=AUTH).status_code == 400
    assert client.get("/v1/models/other", headers=AUTH).status_code == 404
    for path in ("/wp-admin", "/.env"):
        assert client.get(path).status_code == 404
    figures = samples(client)
    assert value(figures, "cnllm_requests_total", route="/v1/chat/completions", status="401") == 1
    assert value(figures, "cnllm_requests_total", route="/v1/chat/completions", status="400") == 1
    assert value(figures, "cnllm_requests_total", route="/v1/models/{name}", status="404") == 1
    assert value(figures, "cnllm_requests_total", route="other", status="404") == 2
    assert value(figures, "cnllm_prompt_tokens_total") == 0  # nothing was generated


def test_the_key_guards_tokenize_but_not_metrics_or_health(serve):
    client = serve()
    assert client.get("/metrics").status_code == 200 and client.get("/health").status_code == 200
    for path, body in (("/tokenize", {"content": "a"}), ("/detokenize", {"tokens": [97]})):
        refused = client.post(path, json=body)
        assert refused.status_code == 401 and refused.json()["error"]["code"] == "invalid_api_key"
        assert client.post(path, json=body, headers=AUTH).status_code == 200


def test_tokenize_round_trip_on_the_whole_app(serve):
    client = serve()
    text = "中文大模型的词表扩充"
    tokens = client.post("/tokenize", json={"content": text}, headers=AUTH).json()["tokens"]
    assert client.post("/detokenize", json={"tokens": tokens}, headers=AUTH).json()["content"] == text
    outside = client.post("/detokenize", json={"tokens": [97, 10**12]}, headers=AUTH)
    assert outside.status_code == 400 and "outside this model's vocabulary" in outside.json()["error"]["message"]


def test_apps_in_one_process_keep_their_own_figures(serve):
    first, second = serve(), serve()
    first.post("/v1/completions", json={"model": NAME, "prompt": "a", "max_tokens": 2}, headers=AUTH)
    assert value(samples(first), "cnllm_completion_tokens_total") == 2
    assert value(samples(second), "cnllm_completion_tokens_total") == 0


def test_gauges_show_the_slots_in_use_and_the_requests_waiting():
    state = install_state(FastAPI(), [ByteModel()], ServerConfig(model_name=NAME, template="none"))

    def gauges() -> tuple[float, float]:
        body, _ = state.metrics.exposition()
        figures = {s.name: s.value for f in text_string_to_metric_families(body.decode()) for s in f.samples}
        return figures["cnllm_requests_running"], figures["cnllm_requests_waiting"]

    async def scenario() -> list[tuple[float, float]]:
        seen = [gauges()]
        generator = await state.pool.acquire()
        seen.append(gauges())
        waiter = asyncio.ensure_future(state.pool.acquire())
        await asyncio.sleep(0.01)
        seen.append(gauges())
        state.pool.release(generator)
        state.pool.release(await waiter)
        seen.append(gauges())
        return seen

    try:
        assert asyncio.run(scenario()) == [(0, 0), (1, 0), (1, 1), (0, 0)]
    finally:
        state.pool.close()
