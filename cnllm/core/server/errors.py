"""The API's errors: every failure is OpenAI's error JSON, client mistakes are 4xx (never 500).

Routes raise :class:`APIError` (or let a queue, context or cnllm error through); :func:`add_error_handlers` maps
each kind to its status and code on an app, the whole server's or a test's with one router.
"""

from __future__ import annotations

import logging
from typing import Awaitable, Callable

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from cnllm.core.errors import CnllmError, UsageError
from cnllm.core.generation.base import ContextOverflow
from cnllm.core.server import schemas
from cnllm.core.server.queue import ClientGone, QueueFull, ShuttingDown

log = logging.getLogger("cnllm.serve")
UNION_BRANCHES = {"str", "int", "float", "bool", "list", "dict", "none"}


class APIError(Exception):
    def __init__(self, status: int, message: str, *, type: str = "invalid_request_error", param: str | None = None, code: str | None = None):
        super().__init__(message)
        self.status, self.message, self.type, self.param, self.code = status, message, type, param, code


def error_response(status: int, message: str, *, type: str = "invalid_request_error", param: str | None = None, code: str | None = None) -> JSONResponse:
    body = schemas.ErrorResponse(error=schemas.ErrorBody(message=message, type=type, param=param, code=code))
    return JSONResponse(body.model_dump(), status_code=status)


def validation_message(exc: RequestValidationError) -> tuple[str, str | None]:
    """The first problem pydantic found, named by the field the client sent (not pydantic's union branch)."""
    first = exc.errors()[0] if exc.errors() else {}
    if first.get("type") == "json_invalid":
        return "the request body is not valid JSON", None
    location = []
    for part in first.get("loc", ())[1:]:  # after "body"
        if isinstance(part, str) and (part in UNION_BRANCHES or "[" in part):
            break  # pydantic names the union member it tried; the field is what the client needs
        location.append(str(part))
    param = ".".join(location) or None
    message = first.get("msg", "invalid request")
    return (f"{param}: {message}" if param else message), param


async def on_validation(request: Request, exc: RequestValidationError) -> JSONResponse:
    message, param = validation_message(exc)
    return error_response(400, message, param=param)


async def on_http(request: Request, exc: StarletteHTTPException) -> JSONResponse:
    kind = "not_found_error" if exc.status_code == 404 else "invalid_request_error"
    return error_response(exc.status_code, str(exc.detail), type=kind)


async def on_api_error(request: Request, exc: APIError) -> JSONResponse:
    return error_response(exc.status, exc.message, type=exc.type, param=exc.param, code=exc.code)


async def on_queue_full(request: Request, exc: QueueFull) -> JSONResponse:
    return error_response(503, f"the server is busy: {exc}; retry later", type="server_overloaded", code="queue_full")


async def on_shutting_down(request: Request, exc: ShuttingDown) -> JSONResponse:
    return error_response(503, "the server is shutting down", type="server_overloaded", code="shutting_down")


async def on_client_gone(request: Request, exc: ClientGone) -> JSONResponse:
    return error_response(499, "the client closed the connection; the request was cancelled", code="client_closed_request")


async def on_overflow(request: Request, exc: ContextOverflow) -> JSONResponse:
    return error_response(400, exc.message, code="context_length_exceeded")


async def on_cnllm_error(request: Request, exc: CnllmError) -> JSONResponse:
    if isinstance(exc, UsageError):  # the request asked for something impossible
        return error_response(400, exc.message)
    return error_response(500, exc.message, type="server_error")


async def on_unexpected(request: Request, exc: Exception) -> JSONResponse:
    log.exception("unexpected error")
    return error_response(500, f"internal error: {type(exc).__name__}: {exc}", type="server_error")


# Each handler takes the exception class it is registered for (Starlette dispatches by class).
HANDLERS: dict[type[Exception], Callable[..., Awaitable[JSONResponse]]] = {
    RequestValidationError: on_validation,
    StarletteHTTPException: on_http,
    APIError: on_api_error,
    QueueFull: on_queue_full,
    ShuttingDown: on_shutting_down,
    ClientGone: on_client_gone,
    ContextOverflow: on_overflow,
    CnllmError: on_cnllm_error,
    Exception: on_unexpected,
}


def add_error_handlers(app: FastAPI) -> None:
    for kind, handler in HANDLERS.items():
        app.add_exception_handler(kind, handler)
