"""The OpenAI-compatible HTTP API of ``cnllm serve`` (FastAPI), assembled from its parts.

Routes (one router each in :mod:`cnllm.core.server.routes`): ``GET /`` (a chat page), ``GET /health``, ``GET /metrics`` (Prometheus),
``GET /v1/models``, ``POST /v1/chat/completions`` (JSON or SSE stream), ``POST /v1/completions`` (echo + prompt
logprobs for log-likelihood evaluation), ``POST /v1/embeddings``, ``POST /tokenize`` and ``/detokenize``. What they
share lives in ``app.state`` (:mod:`.state`); every error is OpenAI's error JSON (:mod:`.errors`). Every answer is
counted and timed (:mod:`.metrics`); a guard in front of the routes checks the Host header (DNS rebinding), the API key and
the body size and time; templating and tokenising run off the event loop. This module also runs the app (uvicorn,
signals), with a deadline for request heads (slow-loris) and a connection limit.
"""

from __future__ import annotations

import asyncio
import secrets
import signal
import threading
from contextlib import contextmanager, nullcontext
from typing import Any, Sequence

from fastapi import FastAPI
from fastapi.responses import JSONResponse
from starlette.datastructures import Headers

from cnllm.core.generation.base import LoadedModel
from cnllm.core.server import LOOPBACK_HOSTS
from cnllm.core.server.errors import add_error_handlers, error_response
from cnllm.core.server.metrics import RequestMetrics
from cnllm.core.server.routes import chat, completions, embeddings, health, metrics, models, page, tokenize
from cnllm.core.server.state import ServerConfig, install_state

ROUTERS = (page.router, health.router, metrics.router, models.router, chat.router, completions.router, embeddings.router, tokenize.router)
KEYED_PATHS = ("/tokenize", "/detokenize")  # beside /v1/: they run the model's tokenizer on client text (llama-server keys them too)


def default_allowed_hosts(host: str) -> tuple[str, ...] | None:
    """A server bound to loopback answers only requests addressed to a loopback name: a web page whose DNS name
    was rebound to 127.0.0.1 sends its own name as Host and is refused. Other bindings accept any Host."""
    return LOOPBACK_HOSTS if host in LOOPBACK_HOSTS else None


def host_name(header: str) -> str:
    """The name in a Host header, without the port (``[::1]:8000`` → ``::1``)."""
    header = header.strip().lower()
    if header.startswith("["):
        return header[1 : header.find("]")] if "]" in header else header
    return header.rsplit(":", 1)[0] if header.count(":") == 1 else header


class RequestGuard:
    """ASGI middleware in front of the routes: Host allow-list, API key on ``/v1/`` and :data:`KEYED_PATHS` (not on
    ``/health`` and ``/metrics``, which monitors read), request-body limit (413), body
    read timeout (408), and a JSON 503 for a request still running when the server stops.

    The body is read here, up to the limit, before any parsing: a client announcing or sending more is answered at
    once and never buffered (what it still sends is read and dropped, see :func:`refuse_body`).
    """

    def __init__(self, app, config: ServerConfig):
        self.app = app
        self.config = config
        self.allowed = None if config.allowed_hosts is None or "*" in config.allowed_hosts else {h.lower().strip("[]") for h in config.allowed_hosts}

    def refusal(self, scope, headers: Headers) -> JSONResponse | None:
        if self.allowed is not None and host_name(headers.get("host", "")) not in self.allowed:
            shown = headers.get("host", "")[:100]
            return error_response(403, f"Host '{shown}' is not allowed (allowed: {', '.join(sorted(self.allowed))}; see --allowed-host)", code="host_not_allowed")
        if self.config.api_key and (scope["path"].startswith("/v1/") or scope["path"] in KEYED_PATHS):
            header = headers.get("authorization", "")
            given = header[7:] if header.lower().startswith("bearer ") else ""
            if not secrets.compare_digest(given.encode(), self.config.api_key.encode()):
                message = "missing API key (send 'Authorization: Bearer KEY')" if not given else "incorrect API key"
                return error_response(401, message, code="invalid_api_key")
        return None

    def too_large(self) -> JSONResponse:
        limit = self.config.max_request_bytes
        return error_response(413, f"the request body is larger than {limit} bytes (the server's --max-request-bytes)", code="request_too_large")

    def too_slow(self) -> JSONResponse:
        response = error_response(408, f"the request body stopped arriving for {self.config.read_timeout:g} s (the server's --read-timeout)", code="request_timeout")
        response.headers["connection"] = "close"
        return response

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        headers = Headers(scope=scope)
        refused = self.refusal(scope, headers)
        if refused is not None:
            return await refused(scope, receive, send)
        declared = headers.get("content-length")
        if declared is not None and not declared.isdigit():
            return await error_response(400, "invalid Content-Length header")(scope, receive, send)
        if declared is not None and int(declared) > self.config.max_request_bytes:
            return await refuse_body(self.too_large(), headers, receive, send, self.config.read_timeout)
        chunks, size = [], 0
        while True:
            try:
                message = await asyncio.wait_for(receive(), self.config.read_timeout)
            except asyncio.TimeoutError:
                return await self.too_slow()(scope, receive, send)
            if message["type"] != "http.request":
                return  # the client went away before its body arrived
            chunk = message.get("body", b"")
            size += len(chunk)
            if size > self.config.max_request_bytes:
                more = message.get("more_body", False)
                return await refuse_body(self.too_large(), headers, receive if more else None, send, self.config.read_timeout)
            chunks.append(chunk)
            if not message.get("more_body", False):
                break
        body: dict[str, object] | None = {"type": "http.request", "body": b"".join(chunks), "more_body": False}

        async def replay():
            nonlocal body
            if body is not None:
                message, body = body, None
                return message
            return await receive()

        started = False

        async def watched_send(message):
            nonlocal started
            started = started or message["type"] == "http.response.start"
            await send(message)

        try:
            await self.app(scope, replay, watched_send)
        except asyncio.CancelledError:
            # uvicorn cancels what still runs when the graceful-shutdown time is over: answer it (a stream already
            # started just ends, its connection closed) instead of uvicorn's plain-text 500 and its traceback.
            if not scope["app"].state.server.pool.closing:
                raise
            if not started:
                await error_response(503, "the server is shutting down", type="server_overloaded", code="shutting_down")(scope, receive, send)


DRAIN_BYTES = 64 * 1024 * 1024  # what is read and dropped of a refused body at most; beyond it the connection is reset


async def refuse_body(response: JSONResponse, headers: Headers, receive, send, seconds: float) -> None:
    """Answer ``response`` at once, then read and drop the rest of the request body (at most :data:`DRAIN_BYTES`,
    for at most ``seconds``; ``receive`` None: nothing is left) before ending the answer.

    A server that closes with unread data resets the connection, and clients that read the answer only after sending
    the whole body (urllib) see that reset instead of the answer. A client waiting for ``100 Continue`` sends no body.
    """
    await send({"type": "http.response.start", "status": response.status_code, "headers": response.raw_headers})
    await send({"type": "http.response.body", "body": response.body, "more_body": True})
    if receive is not None and headers.get("expect", "").lower() != "100-continue":
        loop = asyncio.get_running_loop()
        deadline, drained = loop.time() + seconds, 0
        while drained <= DRAIN_BYTES and loop.time() < deadline:
            try:
                message = await asyncio.wait_for(receive(), deadline - loop.time())
            except asyncio.TimeoutError:
                break
            drained += len(message.get("body", b""))
            if message["type"] != "http.request" or not message.get("more_body", False):
                break
    await send({"type": "http.response.body", "body": b"", "more_body": False})


def create_app(models: list[LoadedModel], config: ServerConfig) -> FastAPI:
    """The app serving ``models`` (one per ``--parallel`` slot; they may be the same object)."""
    app = FastAPI(title="cnllm serve", version="1", docs_url=None, redoc_url=None, openapi_url=None)
    install_state(app, models, config)
    app.add_middleware(RequestGuard, config=config)
    app.add_middleware(RequestMetrics, routes=[route for router in ROUTERS for route in router.routes])  # outside the guard: its refusals count too
    add_error_handlers(app)
    for router in ROUTERS:
        app.include_router(router)
    return app


LISTEN_BACKLOG = 128  # connections accepted in one burst too: open files stay below max_connections + this


def bind_socket(host: str, port: int):
    """Bind before loading the model, so a busy port fails fast; ``port=0`` picks a free one."""
    import socket

    from cnllm.core.errors import UsageError

    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind((host, port))
    except OSError as exc:
        sock.close()
        raise UsageError(f"cannot listen on {host}:{port}: {exc.strerror or exc}; choose another --port or --host") from None
    sock.listen(LISTEN_BACKLOG)
    return sock


KEEP_ALIVE_SECONDS = 5  # an idle connection between two requests is closed after this (uvicorn's default)


def bounded_protocol(config: ServerConfig):
    """uvicorn's HTTP protocol with two bounds on connections.

    A connection that has not sent a whole request head ``read_timeout`` seconds after it connected or after its
    previous answer is closed: without it, thousands of half-sent heads (slow-loris) stay open for ever, each holding
    a socket. A request whose head arrived is left alone (its body has its own timeout, in :class:`RequestGuard`).
    A connection beyond ``max_connections`` open ones is closed at once, so open files stay bounded (at the limit,
    uvicorn's ``limit_concurrency`` answers 503).
    """
    from uvicorn.protocols.http.auto import AutoHTTPProtocol

    # uvicorn picks the class at import time (httptools or h11) and exports it as a variable, which mypy cannot subclass
    chosen: Any = AutoHTTPProtocol

    class BoundedProtocol(chosen):
        def __init__(self, *args, **kwargs):
            super().__init__(*args, **kwargs)
            self.head_deadline = None
            self.waiting_after = None  # the request whose answer the head deadline was set after (None: a new connection)

        def connection_made(self, transport):
            super().connection_made(transport)
            if len(self.connections) > config.max_connections:
                transport.close()
                return
            self.set_head_deadline()

        def on_response_complete(self):
            super().on_response_complete()
            self.set_head_deadline()

        def connection_lost(self, exc):
            if self.head_deadline is not None:
                self.head_deadline.cancel()
            super().connection_lost(exc)

        def set_head_deadline(self):
            if self.head_deadline is not None:
                self.head_deadline.cancel()
            self.waiting_after = self.cycle
            self.head_deadline = self.loop.call_later(config.read_timeout, self.head_deadline_passed)

        def head_deadline_passed(self):
            waiting = self.cycle is self.waiting_after and (self.cycle is None or self.cycle.response_complete)
            if waiting and not self.transport.is_closing():
                self.transport.close()

    return BoundedProtocol


def make_server(app: FastAPI, *, verbose: bool = False):
    """A uvicorn server for ``app``; run it with ``server.run(sockets=[bind_socket(...)])``, stop it with ``should_exit``.

    Its shutdown cancels the work in flight first, so waiting clients get their (cut short) answers at once.
    Connections are bounded (:func:`bounded_protocol`, the app's :class:`ServerConfig`).
    """
    import uvicorn

    settings: ServerConfig = app.state.server.config

    class Server(uvicorn.Server):
        def capture_signals(self):
            # serve_until_stopped owns the handlers: uvicorn's raise the signal again on the way out,
            # before the worker threads are joined and the models closed.
            return nullcontext()

        async def shutdown(self, sockets=None):
            app.state.server.pool.shutdown()
            await super().shutdown(sockets=sockets)

    config = uvicorn.Config(
        app,
        http=bounded_protocol(settings),
        log_level="info" if verbose else "warning",
        access_log=verbose,
        timeout_graceful_shutdown=5,
        timeout_keep_alive=min(KEEP_ALIVE_SECONDS, settings.read_timeout),  # type: ignore[arg-type]  # seconds for call_later: fractions work
        limit_concurrency=settings.max_connections,
        backlog=LISTEN_BACKLOG,
    )
    return Server(config)


@contextmanager
def handling_signals(numbers: Sequence[int], handler):
    if threading.current_thread() is not threading.main_thread():  # only the main thread may set handlers
        yield
        return
    previous = {number: signal.signal(number, handler) for number in numbers}
    try:
        yield
    finally:
        for number, old in previous.items():
            signal.signal(number, old)


def serve_until_stopped(app: FastAPI, sock, *, verbose: bool = False) -> int:
    """Serve until SIGINT or SIGTERM, then stop in order: stop accepting, cancel the work in flight, wait for the
    worker threads, close the models (never while a thread still decodes).

    Returns the exit code: 0 after Ctrl-C (the normal way to stop a server), 143 after SIGTERM.
    """
    server = make_server(app, verbose=verbose)
    received: list[int] = []

    def on_signal(number, frame) -> None:
        received.append(number)
        server.handle_exit(number, frame)

    with handling_signals((signal.SIGINT, signal.SIGTERM), on_signal):
        try:
            server.run(sockets=[sock])
        finally:
            app.state.server.pool.close()
    return 128 + signal.SIGTERM if signal.SIGTERM in received else 0
