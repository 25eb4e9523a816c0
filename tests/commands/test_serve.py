"""``cnllm serve`` as a user runs it: a subprocess on a free loopback port, driven by the openai client."""

from __future__ import annotations

import os
import re
import signal
import socket
import subprocess
import sys
import time

import openai


def test_serve_answers_and_stops_cleanly(tiny_llama_dir):
    env = {**os.environ, "CNLLM_API_KEY": "sk-env"}
    process = subprocess.Popen(
        [sys.executable, "-m", "cnllm", "serve", str(tiny_llama_dir), "--port", "0", "--model-name", "tiny", "--template", "alpaca"],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        env=env,
    )
    try:
        line = b""
        deadline = time.monotonic() + 240
        while b"serving" not in line and time.monotonic() < deadline and process.poll() is None:
            line = process.stderr.readline()
        url = re.search(rb"http://127\.0\.0\.1:(\d+)/v1", line)
        assert url, line
        client = openai.OpenAI(base_url=url.group(0).decode(), api_key="sk-env", max_retries=0)
        reply = client.chat.completions.create(model="tiny", messages=[{"role": "user", "content": "你好"}], max_tokens=4)
        assert reply.choices[0].message.role == "assistant"
        try:
            openai.OpenAI(base_url=url.group(0).decode(), api_key="nope", max_retries=0).models.list()
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


def test_serve_rejects_an_unknown_model_format(cli, tmp_path):
    (tmp_path / "weights.txt").write_text("hello")
    result = cli("serve", tmp_path / "weights.txt", "--port", "0")
    assert result.exit_code == 2 and "not a GGUF file" in result.stderr
