"""The server's Prometheus figures (``GET /metrics``): requests by route and status, tokens in and out, slots busy
and requests waiting, time to first token, time between tokens and request duration.

Each app has its own :class:`ServerMetrics` (a private ``CollectorRegistry`` in ``app.state.server``), so several
apps in one process never share counters. Token figures are recorded by the generation itself
(:class:`GenerationObserver` on every :class:`GenerationStream` a route starts), streaming or not; request counts
and durations by :class:`RequestMetrics`, an ASGI middleware that sees every answer, refusals included.
"""

from __future__ import annotations

import time
from typing import TYPE_CHECKING, Sequence

from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from starlette.routing import BaseRoute, Match

from cnllm.core.generation.base import Completion, GenerationObserver

if TYPE_CHECKING:
    from cnllm.core.server.queue import SlotPool

PREFIX = "cnllm"
CLIENT_GONE = 499  # nothing was answered: the client left first (nginx's code, as the server's own ClientGone)
OTHER_ROUTE = "other"  # paths no route serves share one label, so a scanner cannot grow the series without bound
# seconds; from a short prompt on a GPU to a long one on two cores
FIRST_TOKEN_BUCKETS = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120)
TOKEN_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5)
REQUEST_BUCKETS = (0.01, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300, 600)


class ServerMetrics:
    def __init__(self, pool: SlotPool):
        self.registry = CollectorRegistry()
        registry = self.registry
        self.requests = Counter(f"{PREFIX}_requests", "HTTP requests answered, by route and status", ["route", "status"], registry=registry)
        self.request_seconds = Histogram(
            f"{PREFIX}_request_duration_seconds", "Time from a request's arrival to the end of its answer", ["route"], buckets=REQUEST_BUCKETS, registry=registry
        )
        self.prompt_tokens = Counter(f"{PREFIX}_prompt_tokens", "Prompt tokens evaluated", registry=registry)
        self.completion_tokens = Counter(f"{PREFIX}_completion_tokens", "Tokens generated (an EOS that ended an answer included, as in usage)", registry=registry)
        self.first_token_seconds = Histogram(
            f"{PREFIX}_time_to_first_token_seconds", "Time from a generation's start to its first token", buckets=FIRST_TOKEN_BUCKETS, registry=registry
        )
        self.token_seconds = Histogram(
            f"{PREFIX}_inter_token_latency_seconds", "Time between two consecutive generated tokens", buckets=TOKEN_BUCKETS, registry=registry
        )
        running = Gauge(f"{PREFIX}_requests_running", "Slots generating (or holding) a request", registry=registry)
        running.set_function(lambda: pool.busy)
        waiting = Gauge(f"{PREFIX}_requests_waiting", "Requests waiting in line for a slot (the queue depth)", registry=registry)
        waiting.set_function(lambda: pool.waiting)

    def observer(self) -> GenerationObserver:
        return TokenTimings(self)

    def exposition(self) -> tuple[bytes, str]:
        """The text format and its content type."""
        return generate_latest(self.registry), CONTENT_TYPE_LATEST


class TokenTimings(GenerationObserver):
    """One generation's figures, recorded as its tokens arrive (a long stream shows in the histograms while it runs)."""

    def __init__(self, metrics: ServerMetrics):
        self.metrics = metrics

    def token(self, seconds: float, first: bool) -> None:
        (self.metrics.first_token_seconds if first else self.metrics.token_seconds).observe(seconds)

    def finished(self, completion: Completion) -> None:
        self.metrics.prompt_tokens.inc(completion.prompt_tokens)
        self.metrics.completion_tokens.inc(len(completion.generated_ids))


class RequestMetrics:
    """ASGI middleware counting every answer by route and status and timing it to its last byte (streams included).

    ``routes`` are the routers' own routes: a request is labelled by the path template it matches
    (``/v1/models/{name}``), also when the guard refused it before routing, else :data:`OTHER_ROUTE`.
    """

    def __init__(self, app, routes: Sequence[BaseRoute]):
        self.app = app
        self.routes = routes

    def route_label(self, scope) -> str:
        for route in self.routes:
            if route.matches(scope)[0] != Match.NONE:
                return getattr(route, "path", OTHER_ROUTE)
        return OTHER_ROUTE

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        metrics: ServerMetrics = scope["app"].state.server.metrics
        started, status = time.perf_counter(), None

        async def watched_send(message):
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
            await send(message)

        try:
            await self.app(scope, receive, watched_send)
        except Exception:
            status = status or 500  # Starlette's outermost handler answers it 500
            raise
        finally:
            route = self.route_label(scope)
            metrics.requests.labels(route=route, status=str(status or CLIENT_GONE)).inc()
            metrics.request_seconds.labels(route=route).observe(time.perf_counter() - started)
