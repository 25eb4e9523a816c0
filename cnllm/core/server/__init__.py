"""The OpenAI-compatible HTTP server of ``cnllm serve``: app, routers, shared state, errors, wire-format schemas, worker slots."""

LOOPBACK_HOSTS = ("localhost", "127.0.0.1", "::1")
DEFAULT_MAX_REQUEST_BYTES = 4 * 1024 * 1024
DEFAULT_READ_TIMEOUT = 20.0  # seconds a client may take to send a request's head, or each piece of its body
DEFAULT_MAX_CONNECTIONS = 512  # open connections (and requests) before new requests get 503: below the usual 1,024 open files
MAX_PARALLEL = 256  # --parallel: llama.cpp's limit on the sequences of one context (LLAMA_MAX_SEQ)
