"""``GET /health``: whether the server answers, and how busy its slots are (no API key needed)."""

from __future__ import annotations

from fastapi import APIRouter

from cnllm.core.server.state import State

router = APIRouter()


@router.get("/health")
async def health(state: State):
    pool = state.pool
    return {
        "status": "stopping" if pool.closing else "ok",
        "model": state.config.model_name,
        "slots": {"total": len(state.models), "busy": pool.busy, "waiting": pool.waiting},
    }
