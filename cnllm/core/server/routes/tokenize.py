"""``POST /tokenize`` and ``POST /detokenize`` in llama-server's shapes: the served model's tokenizer, without
generating. They read client text with the model's tokenizer, so ``--api-key`` guards them like the ``/v1/`` routes."""

from __future__ import annotations

from fastapi import APIRouter

from cnllm.core.server import schemas
from cnllm.core.server.routes.common import check_token_ids
from cnllm.core.server.state import State

router = APIRouter()


@router.post("/tokenize", response_model=schemas.TokenizeResponse)
async def tokenize(request: schemas.TokenizeRequest, state: State):
    model = state.primary

    def work() -> schemas.TokenizeResponse:
        ids = model.tokenize(request.content, add_bos=request.add_special, special=request.parse_special)
        if not request.with_pieces:
            return schemas.TokenizeResponse(tokens=ids)
        return schemas.TokenizeResponse(tokens=[schemas.TokenPiece(id=i, piece=p) for i, p in zip(ids, model.token_pieces(ids))])

    return await state.pool.prepare(work)


@router.post("/detokenize", response_model=schemas.DetokenizeResponse)
async def detokenize(request: schemas.DetokenizeRequest, state: State):
    model = state.primary
    if not request.tokens:
        return schemas.DetokenizeResponse(content="")
    ids = check_token_ids(request.tokens, model.vocab_size, "tokens")
    return schemas.DetokenizeResponse(content=await state.pool.prepare(lambda: model.decode(ids)))
