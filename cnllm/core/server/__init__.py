"""The OpenAI-compatible HTTP server of ``cnllm serve``: app, routers, shared state, errors, wire-format schemas, worker slots."""

LOOPBACK_HOSTS = ("localhost", "127.0.0.1", "::1")
DEFAULT_MAX_REQUEST_BYTES = 4 * 1024 * 1024
