"""A live ``cnllm serve`` app (uvicorn in a thread) on a random loopback port, for the official openai client."""

from __future__ import annotations

import threading
import time
from dataclasses import dataclass

import pytest

from tests.core.generation.conftest import tiny_generator, tiny_gguf  # noqa: F401 - shared session fixtures

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
    from cnllm.core.server.app import ServerConfig, bind_socket, create_app, make_server

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
