"""``POST /v1/completions``: plain-text prompts (or token ids) continued, with echo and prompt log-probabilities
for log-likelihood evaluation (lm-eval's ``loglikelihood``)."""

from __future__ import annotations

import time
from dataclasses import replace
from typing import Iterator

from fastapi import APIRouter, Request

from cnllm.core.generation.base import Completion, LoadedModel, TokenLogprob
from cnllm.core.server import schemas
from cnllm.core.server.errors import APIError
from cnllm.core.server.routes.common import (
    Cancellable,
    check_model,
    check_prompt,
    check_token_ids,
    completion_usage,
    lease_for_stream,
    new_id,
    prompt_list,
    sampling,
    sse,
    start_generation,
    stream_response,
    usage,
    watching_disconnect,
)
from cnllm.core.server.state import State

router = APIRouter()


def completion_logprobs(model: LoadedModel, prompt_ids: list[int], result: Completion, echo: bool, top: int) -> schemas.CompletionLogprobs:
    scored: list[TokenLogprob] = model.prompt_logprobs(prompt_ids + result.generated_ids, top=top)
    if result.eos_id is not None:  # shown as the token it is ("</s>"), though the answer's text leaves it out
        scored[-1] = replace(scored[-1], text=model.token_text(result.eos_id))
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


@router.post("/v1/completions")
async def completions(request: schemas.CompletionRequest, http: Request, state: State):
    check_model(state, request.model)
    if request.suffix:
        raise APIError(400, "suffix (fill-in-the-middle) is not supported", param="suffix")
    if request.best_of not in (None, 1):
        raise APIError(400, "best_of > 1 is not supported", param="best_of")
    params = sampling(request, request.max_tokens)
    prompts = prompt_list(request.prompt, "prompt")
    if request.stream and (len(prompts) != 1 or request.logprobs is not None or request.echo):
        raise APIError(400, "streaming supports one prompt without echo or logprobs", param="stream")
    primary = state.primary

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
            check_prompt(state, ids, params)
        return encoded

    encoded = await state.pool.prepare(prepare)
    response_id, created, name = new_id("cmpl"), int(time.time()), state.config.model_name

    if request.stream:
        include_usage = bool(request.stream_options and request.stream_options.include_usage)
        model = await lease_for_stream(state, http)
        stream = start_generation(state, model, encoded[0], params)

        def chunk(text: str, finish_reason: str | None = None, usage_value=None, choices: bool = True) -> str:
            return sse(
                schemas.TextCompletion(
                    id=response_id,
                    created=created,
                    model=name,
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

        return stream_response(state, model, stream, events())

    job = Cancellable(state)

    def work(model: LoadedModel):
        choices, prompt_tokens, completion_tokens = [], 0, 0
        for index, (prompt, ids) in enumerate(zip(prompts, encoded)):
            result = job.read(model, ids, params)
            prompt_tokens += result.prompt_tokens
            completion_tokens += len(result.generated_ids)
            prompt_text = prompt if isinstance(prompt, str) else model.decode(ids)
            top = request.logprobs  # a cancelled request is not scored: its slot is wanted
            logprobs = completion_logprobs(model, ids, result, request.echo, top) if top is not None and not job.cancelled.is_set() else None
            text = (prompt_text if request.echo else "") + result.text
            choices.append(schemas.CompletionChoice(index=index, text=text, finish_reason=result.finish_reason, logprobs=logprobs))
        return choices, prompt_tokens, completion_tokens

    with watching_disconnect(http) as gone:
        choices, prompt_tokens, completion_tokens = await state.pool.run(work, cancel=job.cancel, gone=gone)
    return schemas.TextCompletion(id=response_id, created=created, model=name, choices=choices, usage=usage(prompt_tokens, completion_tokens))
