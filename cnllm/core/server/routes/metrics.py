"""``GET /metrics``: the server's figures in Prometheus text format (no API key needed, like ``/health``: a scraper
reads counts and timings, never prompts or answers)."""

from __future__ import annotations

from fastapi import APIRouter
from fastapi.responses import Response

from cnllm.core.server.state import State

router = APIRouter()


@router.get("/metrics")
async def metrics(state: State):
    body, content_type = state.metrics.exposition()
    return Response(body, media_type=content_type)
