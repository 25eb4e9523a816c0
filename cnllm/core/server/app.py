"""The OpenAI-compatible HTTP API of ``cnllm serve`` (FastAPI).

Routes: ``GET /health``, ``GET /v1/models``, ``POST /v1/chat/completions`` (JSON or SSE stream),
``POST /v1/completions`` (echo + prompt logprobs for log-likelihood evaluation), ``POST
/v1/embeddings``. Every error is OpenAI's error JSON; client mistakes are 4xx, never 500.
"""

from __future__ import annotations

import base64
import logging
import secrets
import struct
import time
from dataclasses import dataclass
from typing import Any, AsyncIterator, Iterator

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, StreamingResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from cnllm.core.errors import CnllmError, UsageError
from cnllm.core.generation.base import ContextOverflow, GenerationStream, Generator, SamplingParams, TokenLogprob
from cnllm.core.templates import PromptFormat
from cnllm.core.server import schemas
from cnllm.core.server.queue import QueueFull, SlotPool

log = logging.getLogger("cnllm.serve")
ROLE_ALIASES = {"developer": "system"}
UNION_BRANCHES = {"str", "int", "float", "bool", "list", "dict", "none"}


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
        seed=request.seed,
        stop=tuple(stop) + extra_stop,
    )


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

    @app.middleware("http")
    async def check_key(request: Request, call_next):
        if config.api_key and request.url.path.startswith("/v1/"):
            header = request.headers.get("authorization", "")
            given = header[7:] if header.lower().startswith("bearer ") else ""
            if not secrets.compare_digest(given.encode(), config.api_key.encode()):
                message = "missing API key (send 'Authorization: Bearer KEY')" if not given else "incorrect API key"
                return error_response(401, message, code="invalid_api_key")
        return await call_next(request)

    def check_model(name: str) -> None:
        if name != config.model_name:
            raise APIError(404, f"the model '{name}' does not exist; this server serves '{config.model_name}'", param="model", code="model_not_found")

    def new_id(prefix: str) -> str:
        return f"{prefix}-{secrets.token_hex(12)}"

    @app.get("/health")
    async def health():
        return {"status": "ok", "model": config.model_name, "slots": {"total": len(generators), "busy": pool.busy, "waiting": pool.waiting}}

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

    def checked_stream(prompt_ids: list[int], params: SamplingParams, **kwargs) -> GenerationStream:
        # Built before a slot is leased: a too-long prompt or a bad parameter is a 400 without waiting in line.
        return GenerationStream(primary, prompt_ids, params, **kwargs)

    @app.post("/v1/chat/completions")
    async def chat_completions(request: schemas.ChatCompletionRequest):
        check_model(request.model)
        if request.logprobs:
            raise APIError(400, "logprobs are not supported on chat completions; use /v1/completions with echo", param="logprobs")
        messages = [{"role": ROLE_ALIASES.get(m.role, m.role), "content": m.text()} for m in request.messages]
        try:
            prompt = prompt_format.render(messages, None)
        except CnllmError as exc:
            raise APIError(400, exc.message, param="messages") from None
        max_tokens = request.max_completion_tokens if request.max_completion_tokens is not None else request.max_tokens
        params = _sampling(request, max_tokens, prompt_format.stop)
        prompt_ids = primary.encode_prompt(prompt)
        checked_stream(prompt_ids, params)
        response_id, created = new_id("chatcmpl"), int(time.time())

        def usage(result) -> schemas.Usage:
            return schemas.Usage(prompt_tokens=result.prompt_tokens, completion_tokens=result.completion_tokens, total_tokens=result.prompt_tokens + result.completion_tokens)

        if not request.stream:
            def work(generator: Generator):
                return GenerationStream(generator, prompt_ids, params, strip_leading_space=True).read()

            result = await pool.run(work)
            return schemas.ChatCompletion(
                id=response_id,
                created=created,
                model=config.model_name,
                choices=[schemas.ChatChoice(index=0, message=schemas.AssistantMessage(content=result.text), finish_reason=result.finish_reason)],
                usage=usage(result),
            )

        include_usage = bool(request.stream_options and request.stream_options.include_usage)
        generator = await pool.acquire()
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
                yield chunk(schemas.Delta(), choices=False, usage_value=usage(stream.completion))

        return stream_response(generator, stream, events())

    def completion_logprobs(generator: Generator, prompt_ids: list[int], result, echo: bool, top: int) -> schemas.CompletionLogprobs:
        scored: list[TokenLogprob] = generator.prompt_logprobs(prompt_ids + result.token_ids, top=top)
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

    def prompt_list(prompt) -> list[str | list[int]]:
        if isinstance(prompt, str):
            return [prompt]
        if prompt and all(isinstance(p, int) for p in prompt):
            return [list(prompt)]
        if not prompt:
            raise APIError(400, "prompt is empty", param="prompt")
        return list(prompt)

    @app.post("/v1/completions")
    async def completions(request: schemas.CompletionRequest):
        check_model(request.model)
        if request.suffix:
            raise APIError(400, "suffix (fill-in-the-middle) is not supported", param="suffix")
        if request.best_of not in (None, 1):
            raise APIError(400, "best_of > 1 is not supported", param="best_of")
        params = _sampling(request, request.max_tokens)
        prompts = prompt_list(request.prompt)
        encoded = []
        for prompt in prompts:
            if isinstance(prompt, list):
                if not prompt or any(not 0 <= t < 2**31 for t in prompt):
                    raise APIError(400, "token prompts must be non-empty lists of token ids", param="prompt")
                encoded.append(list(prompt))
            else:
                encoded.append(primary.encode_prompt(prompt))
        for ids in encoded:
            checked_stream(ids, params)
        response_id, created = new_id("cmpl"), int(time.time())

        if request.stream:
            if len(encoded) != 1 or request.logprobs is not None or request.echo:
                raise APIError(400, "streaming supports one prompt without echo or logprobs", param="stream")
            include_usage = bool(request.stream_options and request.stream_options.include_usage)
            generator = await pool.acquire()
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
                    result = stream.completion
                    yield chunk("", choices=False, usage_value=schemas.Usage(prompt_tokens=result.prompt_tokens, completion_tokens=result.completion_tokens, total_tokens=result.prompt_tokens + result.completion_tokens))

            return stream_response(generator, stream, events())

        def work(generator: Generator):
            choices, prompt_tokens, completion_tokens = [], 0, 0
            for index, (prompt, ids) in enumerate(zip(prompts, encoded)):
                result = GenerationStream(generator, ids, params).read()
                prompt_tokens += result.prompt_tokens
                completion_tokens += result.completion_tokens
                prompt_text = prompt if isinstance(prompt, str) else generator.decode(ids)
                logprobs = completion_logprobs(generator, ids, result, request.echo, request.logprobs) if request.logprobs is not None else None
                text = (prompt_text if request.echo else "") + result.text
                choices.append(schemas.CompletionChoice(index=index, text=text, finish_reason=result.finish_reason, logprobs=logprobs))
            return choices, prompt_tokens, completion_tokens

        choices, prompt_tokens, completion_tokens = await pool.run(work)
        return schemas.TextCompletion(
            id=response_id,
            created=created,
            model=config.model_name,
            choices=choices,
            usage=schemas.Usage(prompt_tokens=prompt_tokens, completion_tokens=completion_tokens, total_tokens=prompt_tokens + completion_tokens),
        )

    @app.post("/v1/embeddings")
    async def embeddings(request: schemas.EmbeddingRequest):
        check_model(request.model)
        if request.dimensions is not None:
            raise APIError(400, "dimensions is not supported (embeddings have the model's hidden size)", param="dimensions")
        items = prompt_list(request.input)
        texts = [primary.decode(item) if isinstance(item, list) else item for item in items]
        if any(not text for text in texts):
            raise APIError(400, "input must not contain empty strings", param="input")
        vectors, count = await pool.run(lambda generator: generator.embed(texts))
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
    """A uvicorn server for ``app``; run it with ``server.run(sockets=[bind_socket(...)])``, stop it with ``should_exit``."""
    import uvicorn

    config = uvicorn.Config(app, log_level="info" if verbose else "warning", access_log=verbose, timeout_graceful_shutdown=5)
    return uvicorn.Server(config)
