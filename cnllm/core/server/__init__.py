"""The OpenAI-compatible HTTP server of ``cnllm serve``: app, wire-format schemas, worker slots."""
