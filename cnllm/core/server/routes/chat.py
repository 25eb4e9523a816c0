"""``POST /v1/chat/completions``: the messages rendered with the server's prompt template, answered as JSON or an SSE stream."""

from __future__ import annotations

import time
from typing import Iterator

from fastapi import APIRouter, Request

from cnllm.core.errors import CnllmError
from cnllm.core.server import schemas
from cnllm.core.server.errors import APIError
from cnllm.core.server.routes.common import (
    Cancellable,
    check_model,
    check_prompt,
    completion_usage,
    lease_for_stream,
    new_id,
    sampling,
    sse,
    start_generation,
    stream_response,
    watching_disconnect,
)
from cnllm.core.server.state import State

router = APIRouter()
ROLE_ALIASES = {"developer": "system"}


@router.post("/v1/chat/completions")
async def chat_completions(request: schemas.ChatCompletionRequest, http: Request, state: State):
    check_model(state, request.model)
    if request.logprobs:
        raise APIError(400, "logprobs are not supported on chat completions; use /v1/completions with echo", param="logprobs")
    messages = [{"role": ROLE_ALIASES.get(m.role, m.role), "content": m.text()} for m in request.messages]
    max_tokens = request.max_completion_tokens if request.max_completion_tokens is not None else request.max_tokens
    prompt_format = state.prompt_format
    params = sampling(request, max_tokens, prompt_format.stop)

    def prepare() -> list[int]:
        try:
            prompt = prompt_format.render(messages, None)
        except CnllmError as exc:
            raise APIError(400, exc.message, param="messages") from None
        ids = state.primary.encode_prompt(prompt)
        check_prompt(state, ids, params)
        return ids

    prompt_ids = await state.pool.prepare(prepare)
    response_id, created, name = new_id("chatcmpl"), int(time.time()), state.config.model_name

    if not request.stream:
        job = Cancellable(state)
        with watching_disconnect(http) as gone:
            result = await state.pool.run(lambda model: job.read(model, prompt_ids, params, strip_leading_space=True), cancel=job.cancel, gone=gone)
        return schemas.ChatCompletion(
            id=response_id,
            created=created,
            model=name,
            choices=[schemas.ChatChoice(index=0, message=schemas.AssistantMessage(content=result.text), finish_reason=result.finish_reason)],
            usage=completion_usage(result),
        )

    include_usage = bool(request.stream_options and request.stream_options.include_usage)
    model = await lease_for_stream(state, http)
    stream = start_generation(state, model, prompt_ids, params, strip_leading_space=True)

    def chunk(delta: schemas.Delta, finish_reason: str | None = None, choices: bool = True, usage_value=None) -> str:
        return sse(
            schemas.ChatCompletionChunk(
                id=response_id,
                created=created,
                model=name,
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

    return stream_response(state, model, stream, events())
