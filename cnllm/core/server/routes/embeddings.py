"""``POST /v1/embeddings``: one L2-normalised vector per input (mean of the last hidden states), as floats or base64."""

from __future__ import annotations

import base64
import struct
from typing import Any

from fastapi import APIRouter, Request

from cnllm.core.server import schemas
from cnllm.core.server.errors import APIError
from cnllm.core.server.routes.common import check_model, check_token_ids, prompt_list, watching_disconnect
from cnllm.core.server.state import State

router = APIRouter()


@router.post("/v1/embeddings")
async def embeddings(request: schemas.EmbeddingRequest, http: Request, state: State):
    check_model(state, request.model)
    if request.dimensions is not None:
        raise APIError(400, "dimensions is not supported (embeddings have the model's hidden size)", param="dimensions")
    items = prompt_list(request.input, "input")
    primary = state.primary

    def prepare() -> list[str]:
        texts = [primary.decode(check_token_ids(item, primary.vocab_size, "input")) if isinstance(item, list) else item for item in items]
        if any(not text for text in texts):
            raise APIError(400, "input must not contain empty strings (or token ids that decode to nothing)", param="input")
        return texts

    texts = await state.pool.prepare(prepare)
    with watching_disconnect(http) as gone:
        vectors, count = await state.pool.run(lambda model: model.embed(texts), gone=gone)
    data = []
    for index, vector in enumerate(vectors):
        value: Any = vector
        if request.encoding_format == "base64":
            value = base64.b64encode(struct.pack(f"<{len(vector)}f", *vector)).decode("ascii")
        data.append(schemas.EmbeddingItem(index=index, embedding=value))
    name = state.config.model_name
    return schemas.EmbeddingResponse(data=data, model=name, usage=schemas.Usage(prompt_tokens=count, total_tokens=count))
