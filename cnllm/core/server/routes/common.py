"""What the generating routes share: request checks, sampling parameters, cancellable generation, SSE streaming."""

from __future__ import annotations

import asyncio
import secrets
import threading
from contextlib import contextmanager
from typing import Any, AsyncIterator, Iterator, Sequence

from fastapi import Request
from fastapi.responses import StreamingResponse

from cnllm.core.errors import UsageError
from cnllm.core.generation.base import Completion, GenerationStream, LoadedModel, SamplingParams
from cnllm.core.server import schemas
from cnllm.core.server.errors import APIError, log
from cnllm.core.server.state import ServerState

SEED_MODULUS = 2**32  # both backends take 32-bit seeds; any integer a client sends maps onto one


def check_model(state: ServerState, name: str) -> None:
    served = state.config.model_name
    if name != served:
        raise APIError(404, f"the model '{name}' does not exist; this server serves '{served}'", param="model", code="model_not_found")


def new_id(prefix: str) -> str:
    return f"{prefix}-{secrets.token_hex(12)}"


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


def start_generation(state: ServerState, model: LoadedModel, prompt_ids: list[int], params: SamplingParams, **kwargs) -> GenerationStream:
    """A generation whose tokens and timings go to the server's metrics: every answer, streamed or not, starts here."""
    return GenerationStream(model, prompt_ids, params, observer=state.metrics.observer(), **kwargs)


class Cancellable:
    """The generations of one non-streaming request: :meth:`cancel` stops the current one at its next token and starts no more."""

    def __init__(self, state: ServerState):
        self.state = state
        self.cancelled = threading.Event()
        self._current: GenerationStream | None = None

    def read(self, model: LoadedModel, prompt_ids: list[int], params: SamplingParams, **kwargs) -> Completion:
        stream = start_generation(self.state, model, prompt_ids, params, **kwargs)
        self._current = stream
        if self.cancelled.is_set():
            stream.cancel()
        return stream.read()

    def cancel(self) -> None:
        self.cancelled.set()
        if self._current is not None:
            self._current.cancel()


def usage(prompt_tokens: int, completion_tokens: int) -> schemas.Usage:
    return schemas.Usage(prompt_tokens=prompt_tokens, completion_tokens=completion_tokens, total_tokens=prompt_tokens + completion_tokens)


def completion_usage(result: Completion) -> schemas.Usage:
    return usage(result.prompt_tokens, len(result.generated_ids))


ANY_OBJECT = {"type": "object"}


def response_schema(response_format: schemas.ResponseFormat | None) -> dict | None:
    """The JSON schema ``response_format`` holds the answer to (json_object: any object), or None for free text."""
    if response_format is None or response_format.type == "text":
        return None
    if response_format.type == "json_object":
        return ANY_OBJECT
    if response_format.json_schema is None:
        raise APIError(400, "response_format of type json_schema needs a json_schema object (name and schema)", param="response_format")
    schema = response_format.json_schema.schema_
    return ANY_OBJECT if schema is None else schema


def sampling(request: schemas._Sampling, max_tokens: int | None, extra_stop: tuple[str, ...] = ()) -> SamplingParams:
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
        json_schema=response_schema(request.response_format),
    )


def check_token_ids(ids: Sequence[int], vocab_size: int, param: str) -> list[int]:
    """Token ids a client sent, refused before any backend sees them (llama.cpp aborts the process on an unknown id)."""
    if not ids:
        raise APIError(400, f"{param} must not be an empty list of token ids", param=param)
    bad = next((t for t in ids if not 0 <= t < vocab_size), None)
    if bad is not None:
        raise APIError(400, f"{param} holds token id {bad}, outside this model's vocabulary (0 to {vocab_size - 1})", param=param)
    return list(ids)


def prompt_list(prompt, param: str) -> list[str | list[int]]:
    """A prompt or input field (a string, token ids, or a list of either) as a list of prompts."""
    if isinstance(prompt, str):
        return [prompt]
    if prompt and all(isinstance(p, int) for p in prompt):
        return [list(prompt)]
    if not prompt:
        raise APIError(400, f"{param} is empty", param=param)
    return list(prompt)


def check_prompt(state: ServerState, prompt_ids: list[int], params: SamplingParams, *, schema_param: str = "response_format") -> None:
    """Built before a slot is leased: a too-long prompt or a bad parameter is a 400 without waiting in line.
    ``schema_param``: the field that asked for the JSON schema (response_format, or tool_choice forcing a call)."""
    if params.json_schema is not None:  # a schema with no grammar, or a backend without grammars
        try:
            state.primary.check_sampling(params)
        except UsageError as exc:
            raise APIError(400, f"{schema_param}: {exc.message}", param=schema_param) from None
    GenerationStream(state.primary, prompt_ids, params)


def sse(payload: Any) -> str:
    data = payload.model_dump_json() if hasattr(payload, "model_dump_json") else payload
    return f"data: {data}\n\n"


async def lease_for_stream(state: ServerState, http: Request) -> LoadedModel:
    """A slot for a streaming answer: a client that hangs up while waiting in line leaves it (once streaming, the
    response notices disconnects itself)."""
    with watching_disconnect(http) as gone:
        return await state.pool.lease(gone)


def stream_response(state: ServerState, model: LoadedModel, stream: GenerationStream, events: Iterator[str]) -> StreamingResponse:
    produced = state.pool.stream(model, events, stream.cancel)

    async def body() -> AsyncIterator[str]:
        try:
            async for event in produced:
                yield event
        except Exception as exc:  # noqa: BLE001 - the status line is sent already: report in the stream
            log.exception("generation failed mid-stream")
            yield sse(schemas.ErrorResponse(error=schemas.ErrorBody(message=f"generation failed: {exc}", type="server_error")))
        yield "data: [DONE]\n\n"

    return StreamingResponse(body(), media_type="text/event-stream", headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})
