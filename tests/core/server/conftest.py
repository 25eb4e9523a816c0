"""A live ``cnllm serve`` app (uvicorn in a thread) on a random loopback port, for the official openai client."""

from __future__ import annotations

import re
import subprocess
import sys
import threading
import time
from dataclasses import dataclass

import pytest

API_KEY = "sk-test-key"


@dataclass
class LiveServer:
    url: str
    app: object
    model_name: str

    def client(self, api_key: str = API_KEY):
        import openai

        return openai.OpenAI(base_url=f"{self.url}/v1", api_key=api_key, max_retries=0, timeout=60)


def start_server(generators, *, model_name="tiny", api_key=API_KEY, template="llama2", max_waiting=4, **config):
    """``config``: further :class:`ServerConfig` fields (``max_request_bytes``, ``allowed_hosts``)."""
    from cnllm.core.server.app import bind_socket, create_app, make_server
    from cnllm.core.server.state import ServerConfig

    app = create_app(generators, ServerConfig(model_name=model_name, api_key=api_key, template=template, max_waiting=max_waiting, **config))
    sock = bind_socket("127.0.0.1", 0)
    server = make_server(app)
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    deadline = time.monotonic() + 30
    while not server.started:
        if time.monotonic() > deadline or not thread.is_alive():
            raise RuntimeError("the test server did not start")
        time.sleep(0.02)
    host, port = sock.getsockname()[:2]

    def stop():
        server.should_exit = True
        thread.join(timeout=30)
        sock.close()

    return LiveServer(f"http://{host}:{port}", app, model_name), stop


@pytest.fixture(scope="module")
def live_server(tiny_generator):
    server, stop = start_server([tiny_generator])
    yield server
    stop()


def http_request(port: int, method: str, path: str, body: bytes | None = None, headers: dict | None = None, timeout: float = 60) -> tuple[int, bytes]:
    """(status, body) of one request to 127.0.0.1:``port`` sent with http.client: every header is the caller's to set."""
    import http.client

    connection = http.client.HTTPConnection("127.0.0.1", port, timeout=timeout)
    try:
        connection.request(method, path, body=body, headers={"Content-Type": "application/json", **(headers or {})})
        response = connection.getresponse()
        return response.status, response.read()
    finally:
        connection.close()


def spawn_serve(*args, env: dict | None = None) -> tuple[subprocess.Popen, int]:
    """``python -m cnllm serve ARGS --port 0`` as a user runs it; returns the process and the port it printed."""
    process = subprocess.Popen(
        [sys.executable, "-m", "cnllm", "serve", *map(str, args), "--port", "0"], stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=env
    )
    line = b""
    deadline = time.monotonic() + 240
    while b"serving" not in line and time.monotonic() < deadline and process.poll() is None:
        line = process.stderr.readline()
    found = re.search(rb"http://127\.0\.0\.1:(\d+)/v1", line)
    if not found:
        process.kill()
        raise AssertionError(f"cnllm serve did not start: {line!r}")
    return process, int(found.group(1))
