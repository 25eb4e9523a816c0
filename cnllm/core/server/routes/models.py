"""``GET /v1/models`` and ``GET /v1/models/{name}``: the one model this server serves."""

from __future__ import annotations

from fastapi import APIRouter

from cnllm.core.server import schemas
from cnllm.core.server.routes.common import check_model
from cnllm.core.server.state import State

router = APIRouter()


@router.get("/v1/models", response_model=schemas.ModelList)
async def list_models(state: State):
    return schemas.ModelList(data=[schemas.ModelCard(id=state.config.model_name, created=state.started)])


@router.get("/v1/models/{name}", response_model=schemas.ModelCard)
async def get_model(name: str, state: State):
    check_model(state, name)
    return schemas.ModelCard(id=state.config.model_name, created=state.started)
