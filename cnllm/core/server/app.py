"""The OpenAI-compatible HTTP API of ``cnllm serve`` (FastAPI).

Routes: ``GET /health``, ``GET /v1/models``, ``POST /v1/chat/completions`` (JSON or SSE stream),
``POST /v1/completions`` (echo + prompt logprobs for log-likelihood evaluation), ``POST
/v1/embeddings``. Every error is OpenAI's error JSON; client mistakes are 4xx, never 500: every field
and token id is checked before a backend sees it. A guard in front of the routes checks the Host header
(DNS rebinding), the API key and the body size; templating and tokenising run off the event loop.
"""

from __future__ import annotations

import asyncio
import base64
import logging
import secrets
import signal
import struct
import threading
import time
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass, replace
from typing import Any, AsyncIterator, Iterator, Sequence

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, StreamingResponse
from starlette.datastructures import Headers
from starlette.exceptions import HTTPException as StarletteHTTPException

from cnllm.core.errors import CnllmError, UsageError
from cnllm.core.generation.base import (
    Completion,
    ContextOverflow,
    GenerationStream,
    Generator,
    SamplingParams,
    TokenLogprob,
)
from cnllm.core.server import DEFAULT_MAX_REQUEST_BYTES, LOOPBACK_HOSTS, schemas
from cnllm.core.server.queue import ClientGone, QueueFull, ShuttingDown, SlotPool
from cnllm.core.templates import PromptFormat

log = logging.getLogger("cnllm.serve")
ROLE_ALIASES = {"developer": "system"}
UNION_BRANCHES = {"str", "int", "float", "bool", "list", "dict", "none"}
SEED_MODULUS = 2**32  # both backends take 32-bit seeds; any integer a client sends maps onto one


class APIError(Exception):
    def __init__(self, status: int, message: str, *, type: str = "invalid_request_error", param: str | None = None, code: str | None = None):
        super().__init__(message)
        self.status, self.message, self.type, self.param, self.code = status, message, type, param, code


def error_response(status: int, message: str, *, type: str = "invalid_request_error", param: str | None = None, code: str | None = None) -> JSONResponse:
    body = schemas.ErrorResponse(error=schemas.ErrorBody(message=message, type=type, param=param, code=code))
    return JSONResponse(body.model_dump(), status_code=status)


@dataclass
class ServerConfig:
    model_name: str
    api_key: str | None = None
    template: str | None = None
    max_waiting: int = 16
    max_request_bytes: int = DEFAULT_MAX_REQUEST_BYTES
    allowed_hosts: tuple[str, ...] | None = None  # Host header names accepted (None: any)


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
    """ASGI middleware in front of the routes: Host allow-list, API key on ``/v1/``, request-body limit (413).

    The body is read here, up to the limit, before any parsing: a client announcing or sending more is
    answered at once and never buffered.
    """

    def __init__(self, app, config: ServerConfig):
        self.app = app
        self.config = config
        self.allowed = None if config.allowed_hosts is None or "*" in config.allowed_hosts else {h.lower().strip("[]") for h in config.allowed_hosts}

    def refusal(self, scope, headers: Headers) -> JSONResponse | None:
        if self.allowed is not None and host_name(headers.get("host", "")) not in self.allowed:
            shown = headers.get("host", "")[:100]
            return error_response(403, f"Host '{shown}' is not allowed (allowed: {', '.join(sorted(self.allowed))}; see --allowed-host)", code="host_not_allowed")
        if self.config.api_key and scope["path"].startswith("/v1/"):
            header = headers.get("authorization", "")
            given = header[7:] if header.lower().startswith("bearer ") else ""
            if not secrets.compare_digest(given.encode(), self.config.api_key.encode()):
                message = "missing API key (send 'Authorization: Bearer KEY')" if not given else "incorrect API key"
                return error_response(401, message, code="invalid_api_key")
        return None

    def too_large(self) -> JSONResponse:
        limit = self.config.max_request_bytes
        return error_response(413, f"the request body is larger than {limit} bytes (the server's --max-request-bytes)", code="request_too_large")

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        headers = Headers(scope=scope)
        refused = self.refusal(scope, headers)
        if refused is not None:
            return await refused(scope, receive, send)
        declared = headers.get("content-length")
        if declared is not None and (not declared.isdigit() or int(declared) > self.config.max_request_bytes):
            response = self.too_large() if declared.isdigit() else error_response(400, "invalid Content-Length header")
            return await response(scope, receive, send)
        chunks, size = [], 0
        while True:
            message = await receive()
            if message["type"] != "http.request":
                return  # the client went away before its body arrived
            chunk = message.get("body", b"")
            size += len(chunk)
            if size > self.config.max_request_bytes:
                return await self.too_large()(scope, receive, send)
            chunks.append(chunk)
            if not message.get("more_body", False):
                break
        body = {"type": "http.request", "body": b"".join(chunks), "more_body": False}

        async def replay():
            nonlocal body
            if body is not None:
                message, body = body, None
                return message
            return await receive()

        return await self.app(scope, replay, send)


async def client_gone(request: Request) -> None:
    """Completes when the client closes its connection (the body is read already, so only a disconnect can arrive)."""
    while (await request.receive())["type"] != "http.disconnect":
        pass


@contextmanager
def watching_disconnect(request: Request):
    """A task that completes when the client hangs up, cancelled when the request is done."""
    task = asyncio.ensure_future(client_gone(request))
    try:
        yield task
    finally:
        task.cancel()


class Cancellable:
    """The generations of one non-streaming request: :meth:`cancel` stops the current one at its next token and starts no more."""

    def __init__(self):
        self.cancelled = threading.Event()
        self._current: GenerationStream | None = None

    def read(self, generator: Generator, prompt_ids: list[int], params: SamplingParams, **kwargs) -> Completion:
        stream = GenerationStream(generator, prompt_ids, params, **kwargs)
        self._current = stream
        if self.cancelled.is_set():
            stream.cancel()
        return stream.read()

    def cancel(self) -> None:
        self.cancelled.set()
        if self._current is not None:
            self._current.cancel()


def generated_ids(result: Completion) -> list[int]:
    """The answer's tokens with the EOS that ended it: clients count it and score it (lm-eval's loglikelihood needs it)."""
    return result.token_ids + ([result.eos_id] if result.eos_id is not None else [])


def usage(prompt_tokens: int, completion_tokens: int) -> schemas.Usage:
    return schemas.Usage(prompt_tokens=prompt_tokens, completion_tokens=completion_tokens, total_tokens=prompt_tokens + completion_tokens)


def _validation_message(exc: RequestValidationError) -> tuple[str, str | None]:
    first = exc.errors()[0] if exc.errors() else {}
    if first.get("type") == "json_invalid":
        return "the request body is not valid JSON", None
    location = []
    for part in first.get("loc", ())[1:]:  # after "body"
        if isinstance(part, str) and (part in UNION_BRANCHES or "[" in part):
            break  # pydantic names the union member it tried; the field is what the client needs
        location.append(str(part))
    param = ".".join(location) or None
    message = first.get("msg", "invalid request")
    return (f"{param}: {message}" if param else message), param


def _sampling(request: schemas._Sampling, max_tokens: int | None, extra_stop: tuple[str, ...] = ()) -> SamplingParams:
    if request.n != 1:
        raise APIError(400, "n > 1 is not supported by this server; send separate requests", param="n")
    stop = [request.stop] if isinstance(request.stop, str) else list(request.stop or [])
    if len(stop) > 4:
        raise APIError(400, "stop accepts at most 4 sequences", param="stop")
    return SamplingParams(
        max_tokens=max_tokens,
        temperature=1.0 if request.temperature is None else request.temperature,
        top_p=1.0 if request.top_p is None else request.top_p,
        top_k=request.top_k or 0,
        repetition_penalty=request.repetition_penalty or 1.0,
        seed=None if request.seed is None else request.seed % SEED_MODULUS,
        stop=tuple(stop) + extra_stop,
    )


def check_token_ids(ids: Sequence[int], vocab_size: int, param: str) -> list[int]:
    """Token ids a client sent, refused before any backend sees them (llama.cpp aborts the process on an unknown id)."""
    if not ids:
        raise APIError(400, f"{param} must not be an empty list of token ids", param=param)
    bad = next((t for t in ids if not 0 <= t < vocab_size), None)
    if bad is not None:
        raise APIError(400, f"{param} holds token id {bad}, outside this model's vocabulary (0 to {vocab_size - 1})", param=param)
    return list(ids)


def _sse(payload: Any) -> str:
    data = payload.model_dump_json() if hasattr(payload, "model_dump_json") else payload
    return f"data: {data}\n\n"


def create_app(generators: list[Generator], config: ServerConfig) -> FastAPI:
    """The app serving ``generators`` (one per ``--parallel`` slot; they may be the same object)."""
    primary = generators[0]
    prompt_format: PromptFormat = primary.prompt_format(config.template)
    pool = SlotPool(generators, config.max_waiting)
    started = int(time.time())
    app = FastAPI(title="cnllm serve", version="1", docs_url=None, redoc_url=None, openapi_url=None)
    app.state.pool = pool
    app.state.prompt_format = prompt_format
    app.add_middleware(RequestGuard, config=config)

    @app.exception_handler(RequestValidationError)
    async def on_validation(request: Request, exc: RequestValidationError):
        message, param = _validation_message(exc)
        return error_response(400, message, param=param)

    @app.exception_handler(StarletteHTTPException)
    async def on_http(request: Request, exc: StarletteHTTPException):
        kind = "not_found_error" if exc.status_code == 404 else "invalid_request_error"
        return error_response(exc.status_code, str(exc.detail), type=kind)

    @app.exception_handler(APIError)
    async def on_api_error(request: Request, exc: APIError):
        return error_response(exc.status, exc.message, type=exc.type, param=exc.param, code=exc.code)

    @app.exception_handler(QueueFull)
    async def on_queue_full(request: Request, exc: QueueFull):
        return error_response(503, f"the server is busy: {exc}; retry later", type="server_overloaded", code="queue_full")

    @app.exception_handler(ShuttingDown)
    async def on_shutting_down(request: Request, exc: ShuttingDown):
        return error_response(503, "the server is shutting down", type="server_overloaded", code="shutting_down")

    @app.exception_handler(ClientGone)
    async def on_client_gone(request: Request, exc: ClientGone):
        return error_response(499, "the client closed the connection; the request was cancelled", code="client_closed_request")

    @app.exception_handler(ContextOverflow)
    async def on_overflow(request: Request, exc: ContextOverflow):
        return error_response(400, exc.message, code="context_length_exceeded")

    @app.exception_handler(CnllmError)
    async def on_cnllm_error(request: Request, exc: CnllmError):
        if isinstance(exc, UsageError):  # the request asked for something impossible
            return error_response(400, exc.message)
        return error_response(500, exc.message, type="server_error")

    @app.exception_handler(Exception)
    async def on_unexpected(request: Request, exc: Exception):
        log.exception("unexpected error")
        return error_response(500, f"internal error: {type(exc).__name__}: {exc}", type="server_error")

    def check_model(name: str) -> None:
        if name != config.model_name:
            raise APIError(404, f"the model '{name}' does not exist; this server serves '{config.model_name}'", param="model", code="model_not_found")

    def new_id(prefix: str) -> str:
        return f"{prefix}-{secrets.token_hex(12)}"

    @app.get("/health")
    async def health():
        status = "stopping" if pool.closing else "ok"
        return {"status": status, "model": config.model_name, "slots": {"total": len(generators), "busy": pool.busy, "waiting": pool.waiting}}

    @app.get("/v1/models", response_model=schemas.ModelList)
    async def list_models():
        return schemas.ModelList(data=[schemas.ModelCard(id=config.model_name, created=started)])

    @app.get("/v1/models/{name}", response_model=schemas.ModelCard)
    async def get_model(name: str):
        check_model(name)
        return schemas.ModelCard(id=config.model_name, created=started)

    def stream_response(generator: Generator, stream: GenerationStream, events: Iterator[str]) -> StreamingResponse:
        produced = pool.stream(generator, events, stream.cancel)

        async def body() -> AsyncIterator[str]:
            try:
                async for event in produced:
                    yield event
            except Exception as exc:  # noqa: BLE001 - the status line is sent already: report in the stream
                log.exception("generation failed mid-stream")
                yield _sse(schemas.ErrorResponse(error=schemas.ErrorBody(message=f"generation failed: {exc}", type="server_error")))
            yield "data: [DONE]\n\n"

        return StreamingResponse(body(), media_type="text/event-stream", headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})

    async def lease_for_stream(http: Request) -> Generator:
        # A client that hangs up while waiting in line leaves it; once streaming, the response notices disconnects itself.
        with watching_disconnect(http) as gone:
            return await pool.lease(gone)

    def checked_stream(prompt_ids: list[int], params: SamplingParams) -> None:
        # Built before a slot is leased: a too-long prompt or a bad parameter is a 400 without waiting in line.
        GenerationStream(primary, prompt_ids, params)

    def completion_usage(result: Completion) -> schemas.Usage:
        return usage(result.prompt_tokens, len(generated_ids(result)))

    @app.post("/v1/chat/completions")
    async def chat_completions(request: schemas.ChatCompletionRequest, http: Request):
        check_model(request.model)
        if request.logprobs:
            raise APIError(400, "logprobs are not supported on chat completions; use /v1/completions with echo", param="logprobs")
        messages = [{"role": ROLE_ALIASES.get(m.role, m.role), "content": m.text()} for m in request.messages]
        max_tokens = request.max_completion_tokens if request.max_completion_tokens is not None else request.max_tokens
        params = _sampling(request, max_tokens, prompt_format.stop)

        def prepare() -> list[int]:
            try:
                prompt = prompt_format.render(messages, None)
            except CnllmError as exc:
                raise APIError(400, exc.message, param="messages") from None
            ids = primary.encode_prompt(prompt)
            checked_stream(ids, params)
            return ids

        prompt_ids = await pool.prepare(prepare)
        response_id, created = new_id("chatcmpl"), int(time.time())

        if not request.stream:
            job = Cancellable()
            with watching_disconnect(http) as gone:
                result = await pool.run(lambda generator: job.read(generator, prompt_ids, params, strip_leading_space=True), cancel=job.cancel, gone=gone)
            return schemas.ChatCompletion(
                id=response_id,
                created=created,
                model=config.model_name,
                choices=[schemas.ChatChoice(index=0, message=schemas.AssistantMessage(content=result.text), finish_reason=result.finish_reason)],
                usage=completion_usage(result),
            )

        include_usage = bool(request.stream_options and request.stream_options.include_usage)
        generator = await lease_for_stream(http)
        stream = GenerationStream(generator, prompt_ids, params, strip_leading_space=True)

        def chunk(delta: schemas.Delta, finish_reason: str | None = None, choices: bool = True, usage_value=None) -> str:
            return _sse(
                schemas.ChatCompletionChunk(
                    id=response_id,
                    created=created,
                    model=config.model_name,
                    choices=[schemas.ChunkChoice(delta=delta, finish_reason=finish_reason)] if choices else [],
                    usage=usage_value,
                )
            )

        def events() -> Iterator[str]:
            yield chunk(schemas.Delta(role="assistant", content=""))
            for text in stream:
                yield chunk(schemas.Delta(content=text))
            yield chunk(schemas.Delta(), stream.completion.finish_reason)
            if include_usage:
                yield chunk(schemas.Delta(), choices=False, usage_value=completion_usage(stream.completion))

        return stream_response(generator, stream, events())

    def completion_logprobs(generator: Generator, prompt_ids: list[int], result: Completion, echo: bool, top: int) -> schemas.CompletionLogprobs:
        scored: list[TokenLogprob] = generator.prompt_logprobs(prompt_ids + generated_ids(result), top=top)
        if result.eos_id is not None:  # shown as the token it is ("</s>"), though the answer's text leaves it out
            scored[-1] = replace(scored[-1], text=generator.token_text(result.eos_id))
        if not echo:
            scored = scored[len(prompt_ids) :]
        tokens, offsets, offset = [], [], 0
        for item in scored:
            tokens.append(item.text)
            offsets.append(offset)
            offset += len(item.text)
        return schemas.CompletionLogprobs(
            tokens=tokens,
            token_logprobs=[item.logprob for item in scored],
            top_logprobs=[dict(item.top) if item.logprob is not None and top else None for item in scored],
            text_offset=offsets,
        )

    def prompt_list(prompt, param: str) -> list[str | list[int]]:
        if isinstance(prompt, str):
            return [prompt]
        if prompt and all(isinstance(p, int) for p in prompt):
            return [list(prompt)]
        if not prompt:
            raise APIError(400, f"{param} is empty", param=param)
        return list(prompt)

    @app.post("/v1/completions")
    async def completions(request: schemas.CompletionRequest, http: Request):
        check_model(request.model)
        if request.suffix:
            raise APIError(400, "suffix (fill-in-the-middle) is not supported", param="suffix")
        if request.best_of not in (None, 1):
            raise APIError(400, "best_of > 1 is not supported", param="best_of")
        params = _sampling(request, request.max_tokens)
        prompts = prompt_list(request.prompt, "prompt")
        if request.stream and (len(prompts) != 1 or request.logprobs is not None or request.echo):
            raise APIError(400, "streaming supports one prompt without echo or logprobs", param="stream")

        def prepare() -> list[list[int]]:
            encoded = []
            for prompt in prompts:
                if isinstance(prompt, list):
                    encoded.append(check_token_ids(prompt, primary.vocab_size, "prompt"))
                elif not prompt:
                    raise APIError(400, "prompt must not be an empty string", param="prompt")
                else:
                    encoded.append(primary.encode_prompt(prompt))
            for ids in encoded:
                checked_stream(ids, params)
            return encoded

        encoded = await pool.prepare(prepare)
        response_id, created = new_id("cmpl"), int(time.time())

        if request.stream:
            include_usage = bool(request.stream_options and request.stream_options.include_usage)
            generator = await lease_for_stream(http)
            stream = GenerationStream(generator, encoded[0], params)

            def chunk(text: str, finish_reason: str | None = None, usage_value=None, choices: bool = True) -> str:
                return _sse(
                    schemas.TextCompletion(
                        id=response_id,
                        created=created,
                        model=config.model_name,
                        choices=[schemas.CompletionChoice(index=0, text=text, finish_reason=finish_reason)] if choices else [],
                        usage=usage_value,
                    )
                )

            def events() -> Iterator[str]:
                for text in stream:
                    yield chunk(text)
                yield chunk("", stream.completion.finish_reason)
                if include_usage:
                    yield chunk("", choices=False, usage_value=completion_usage(stream.completion))

            return stream_response(generator, stream, events())

        job = Cancellable()

        def work(generator: Generator):
            choices, prompt_tokens, completion_tokens = [], 0, 0
            for index, (prompt, ids) in enumerate(zip(prompts, encoded)):
                result = job.read(generator, ids, params)
                prompt_tokens += result.prompt_tokens
                completion_tokens += len(generated_ids(result))
                prompt_text = prompt if isinstance(prompt, str) else generator.decode(ids)
                logprobs = completion_logprobs(generator, ids, result, request.echo, request.logprobs) if request.logprobs is not None else None
                text = (prompt_text if request.echo else "") + result.text
                choices.append(schemas.CompletionChoice(index=index, text=text, finish_reason=result.finish_reason, logprobs=logprobs))
            return choices, prompt_tokens, completion_tokens

        with watching_disconnect(http) as gone:
            choices, prompt_tokens, completion_tokens = await pool.run(work, cancel=job.cancel, gone=gone)
        return schemas.TextCompletion(
            id=response_id,
            created=created,
            model=config.model_name,
            choices=choices,
            usage=usage(prompt_tokens, completion_tokens),
        )

    @app.post("/v1/embeddings")
    async def embeddings(request: schemas.EmbeddingRequest, http: Request):
        check_model(request.model)
        if request.dimensions is not None:
            raise APIError(400, "dimensions is not supported (embeddings have the model's hidden size)", param="dimensions")
        items = prompt_list(request.input, "input")

        def prepare() -> list[str]:
            texts = [primary.decode(check_token_ids(item, primary.vocab_size, "input")) if isinstance(item, list) else item for item in items]
            if any(not text for text in texts):
                raise APIError(400, "input must not contain empty strings (or token ids that decode to nothing)", param="input")
            return texts

        texts = await pool.prepare(prepare)
        with watching_disconnect(http) as gone:
            vectors, count = await pool.run(lambda generator: generator.embed(texts), gone=gone)
        data = []
        for index, vector in enumerate(vectors):
            value: Any = vector
            if request.encoding_format == "base64":
                value = base64.b64encode(struct.pack(f"<{len(vector)}f", *vector)).decode("ascii")
            data.append(schemas.EmbeddingItem(index=index, embedding=value))
        return schemas.EmbeddingResponse(data=data, model=config.model_name, usage=schemas.Usage(prompt_tokens=count, total_tokens=count))

    return app


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
    sock.listen(128)
    return sock


def make_server(app: FastAPI, *, verbose: bool = False):
    """A uvicorn server for ``app``; run it with ``server.run(sockets=[bind_socket(...)])``, stop it with ``should_exit``.

    Its shutdown cancels the work in flight first, so waiting clients get their (cut short) answers at once.
    """
    import uvicorn

    class Server(uvicorn.Server):
        def capture_signals(self):
            # serve_until_stopped owns the handlers: uvicorn's raise the signal again on the way out,
            # before the worker threads are joined and the models closed.
            return nullcontext()

        async def shutdown(self, sockets=None):
            app.state.pool.shutdown()
            await super().shutdown(sockets=sockets)

    config = uvicorn.Config(app, log_level="info" if verbose else "warning", access_log=verbose, timeout_graceful_shutdown=5)
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
            app.state.pool.close()
    return 128 + signal.SIGTERM if signal.SIGTERM in received else 0
