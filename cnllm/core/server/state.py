"""What every route shares, kept in ``app.state.server``: the configuration, the loaded models' slot pool, the prompt
renderer, the app's metrics and the primary model (templating, tokenising and checks before a slot is leased).

:func:`install_state` puts it on an app (the server's, or a test's with one router and a fake model);
a route asks for it with the ``State`` dependency.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Annotated

from fastapi import Depends, FastAPI, Request

from cnllm.core.generation.base import LoadedModel
from cnllm.core.server import DEFAULT_MAX_CONNECTIONS, DEFAULT_MAX_REQUEST_BYTES, DEFAULT_READ_TIMEOUT
from cnllm.core.server.metrics import ServerMetrics
from cnllm.core.server.queue import SlotPool
from cnllm.core.templates import PromptFormat


@dataclass
class ServerConfig:
    model_name: str
    api_key: str | None = None
    template: str | None = None
    max_waiting: int = 16
    max_request_bytes: int = DEFAULT_MAX_REQUEST_BYTES
    allowed_hosts: tuple[str, ...] | None = None  # Host header names accepted (None: any)
    read_timeout: float = DEFAULT_READ_TIMEOUT  # a request's head, and each piece of its body, must arrive within it
    max_connections: int = DEFAULT_MAX_CONNECTIONS


@dataclass
class ServerState:
    config: ServerConfig
    models: list[LoadedModel]  # one per --parallel slot (they may be the same object)
    pool: SlotPool
    prompt_format: PromptFormat
    metrics: ServerMetrics
    started: int = field(default_factory=lambda: int(time.time()))

    @property
    def primary(self) -> LoadedModel:
        return self.models[0]


def install_state(app: FastAPI, models: list[LoadedModel], config: ServerConfig) -> ServerState:
    pool = SlotPool(models, config.max_waiting)
    state = ServerState(config, models, pool, models[0].prompt_format(config.template), ServerMetrics(pool))
    app.state.server = state
    return state


def server_state(request: Request) -> ServerState:
    return request.app.state.server


State = Annotated[ServerState, Depends(server_state)]
