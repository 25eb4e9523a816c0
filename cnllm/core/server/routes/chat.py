"""``POST /v1/chat/completions``: the messages rendered with the server's prompt template, answered as JSON or an SSE stream;
with ``tools``, the answer's tool calls read back (:mod:`cnllm.core.server.tools`)."""

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
from cnllm.core.server.tools import StreamedCalls, answer, plan_tools

router = APIRouter()
ROLE_ALIASES = {"developer": "system"}


def conversation(messages: list[schemas.ChatMessage]) -> list[dict]:
    """The request's messages as the template renderer reads them (calls and the ids tool results answer included)."""
    result = []
    for index, message in enumerate(messages):
        role = ROLE_ALIASES.get(message.role, message.role)
        item: dict = {"role": role, "content": message.text()}
        if message.tool_calls:
            item["tool_calls"] = [{"id": c.id, "function": {"name": c.function.name, "arguments": c.function.arguments}} for c in message.tool_calls]
        if role == "tool":
            if not message.tool_call_id:
                raise APIError(400, f"messages.{index}: a tool message needs the tool_call_id of the call it answers", param=f"messages.{index}.tool_call_id")
            item["tool_call_id"] = message.tool_call_id
        result.append(item)
    return result


@router.post("/v1/chat/completions")
async def chat_completions(request: schemas.ChatCompletionRequest, http: Request, state: State):
    check_model(state, request.model)
    if request.logprobs:
        raise APIError(400, "logprobs are not supported on chat completions; use /v1/completions with echo", param="logprobs")
    messages = conversation(request.messages)
    max_tokens = request.max_completion_tokens if request.max_completion_tokens is not None else request.max_tokens
    prompt_format = state.prompt_format
    plan = plan_tools(request, prompt_format)
    params = sampling(request, max_tokens, prompt_format.stop)
    if plan is not None and plan.forced:
        params.json_schema = plan.schema()

    def prepare() -> list[int]:
        try:
            prompt = prompt_format.render(messages, None, tools=plan.definitions if plan else None)
        except CnllmError as exc:
            raise APIError(400, exc.message, param="messages") from None
        ids = state.primary.encode_prompt(prompt + (plan.prompt_suffix if plan else ""))
        check_prompt(state, ids, params, schema_param="tool_choice" if plan is not None and plan.forced else "response_format")
        return ids

    prompt_ids = await state.pool.prepare(prepare)
    response_id, created, name = new_id("chatcmpl"), int(time.time()), state.config.model_name

    if not request.stream:
        job = Cancellable(state)
        with watching_disconnect(http) as gone:
            result = await state.pool.run(lambda model: job.read(model, prompt_ids, params, strip_leading_space=True), cancel=job.cancel, gone=gone)
        if plan is None:
            message, finish_reason = schemas.AssistantMessage(content=result.text), result.finish_reason
        else:
            message, finish_reason = answer(plan, result.text, result.finish_reason)
        return schemas.ChatCompletion(
            id=response_id,
            created=created,
            model=name,
            choices=[schemas.ChatChoice(index=0, message=message, finish_reason=finish_reason)],
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
        if plan is None:
            for text in stream:
                yield chunk(schemas.Delta(content=text))
            yield chunk(schemas.Delta(), stream.completion.finish_reason)
        else:
            calls = StreamedCalls(plan)
            for text in stream:
                yield from (chunk(delta) for delta in calls.feed(text))
            yield from (chunk(delta) for delta in calls.finish())
            yield chunk(schemas.Delta(), calls.finish_reason(stream.completion.finish_reason))
        if include_usage:
            yield chunk(schemas.Delta(), choices=False, usage_value=completion_usage(stream.completion))

    return stream_response(state, model, stream, events())
