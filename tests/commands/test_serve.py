"""``cnllm serve`` as a user runs it: a subprocess on a free loopback port, driven by the openai client."""

from __future__ import annotations

import json
import os
import signal
import socket
import threading
import time

import openai
import pytest

from tests.core.server.conftest import http_request, spawn_serve


def test_serve_answers_and_stops_cleanly(tiny_llama_dir):
    process, port = spawn_serve(tiny_llama_dir, "--model-name", "tiny", "--template", "alpaca", env={**os.environ, "CNLLM_API_KEY": "sk-env"})
    url = f"http://127.0.0.1:{port}/v1"
    try:
        client = openai.OpenAI(base_url=url, api_key="sk-env", max_retries=0)
        reply = client.chat.completions.create(model="tiny", messages=[{"role": "user", "content": "你好"}], max_tokens=4)
        assert reply.choices[0].message.role == "assistant"
        try:
            openai.OpenAI(base_url=url, api_key="nope", max_retries=0).models.list()
            raise AssertionError("a wrong key was accepted")
        except openai.AuthenticationError:
            pass
    finally:
        process.send_signal(signal.SIGINT)
        stdout, stderr = process.communicate(timeout=60)
    assert process.returncode == 0, stderr.decode()
    assert b"Traceback" not in stderr
    assert stdout == b""


def test_busy_port_is_a_usage_error(cli, tiny_llama_dir):
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen(1)
        port = taken.getsockname()[1]
        result = cli("serve", tiny_llama_dir, "--port", str(port))
    assert result.exit_code == 2
    assert f"127.0.0.1:{port}" in result.stderr


@pytest.mark.parametrize("value", ["nan", "inf"])
def test_a_read_timeout_that_is_not_a_number_is_a_usage_error(cli, tiny_llama_dir, value):
    result = cli("serve", tiny_llama_dir, "--port", "0", "--read-timeout", value)
    assert result.exit_code == 2 and "--read-timeout" in result.stderr


def test_serve_rejects_an_unknown_model_format(cli, tmp_path):
    (tmp_path / "weights.txt").write_text("hello")
    result = cli("serve", tmp_path / "weights.txt", "--port", "0")
    assert result.exit_code == 2 and "not a GGUF file" in result.stderr


@pytest.mark.parametrize("signal_number, exit_code", [(signal.SIGINT, 0), (signal.SIGTERM, 143)])
def test_a_signal_while_generating_cancels_answers_and_exits_cleanly(tiny_gguf, signal_number, exit_code):
    """Issue 13: Ctrl-C while two slots decode used to close the models under the threads (exit -11, a traceback)."""
    # Greedy decoding of the tiny model never reaches EOS: both requests would run ~16k tokens without the signal.
    process, port = spawn_serve(tiny_gguf, "--model-name", "tiny", "--template", "chatml", "--parallel", "2", "--n-ctx", "16384")
    results: dict[str, tuple[int, bytes]] = {}
    prompt = {"model": "tiny", "temperature": 0, "max_tokens": 100000}
    requests = {
        "stream": ("/v1/chat/completions", {**prompt, "messages": [{"role": "user", "content": "hi"}], "stream": True}),
        "plain": ("/v1/completions", {**prompt, "prompt": "Once upon a time"}),
    }
    workers = [
        threading.Thread(target=lambda k=k, path=path, body=body: results.__setitem__(k, http_request(port, "POST", path, json.dumps(body).encode(), timeout=120)))
        for k, (path, body) in requests.items()
    ]
    try:
        for worker in workers:
            worker.start()
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline and json.loads(http_request(port, "GET", "/health")[1])["slots"]["busy"] < 2:
            time.sleep(0.05)
    finally:
        process.send_signal(signal_number)
        stdout, stderr = process.communicate(timeout=120)
        for worker in workers:
            worker.join(60)
    assert process.returncode == exit_code, stderr.decode()
    assert b"Traceback" not in stderr and stdout == b""
    status, body = results["plain"]
    assert status == 200 and json.loads(body)["choices"][0]["finish_reason"] == "cancelled"
    status, body = results["stream"]
    events = [line for line in body.decode().split("\n\n") if line]
    assert status == 200 and events[-1] == "data: [DONE]"
    assert json.loads(events[-2][len("data: ") :])["choices"][0]["finish_reason"] == "cancelled"
