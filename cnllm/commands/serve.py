"""``cnllm serve``: an OpenAI-compatible HTTP API for a model (chat, completions with logprobs, embeddings)."""

from __future__ import annotations

import math
from dataclasses import replace
from typing import Annotated, Optional

import click
import typer

from cnllm.cli import output
from cnllm.cli.options import ModelArg, NCtxOpt, TemplateOpt, VerboseOpt, warn_beyond_trained, with_model_loading
from cnllm.core.backends import ENGINES
from cnllm.core.errors import UsageError
from cnllm.core.generation.base import LoadOptions
from cnllm.core.server import (
    DEFAULT_MAX_CONNECTIONS,
    DEFAULT_MAX_REQUEST_BYTES,
    DEFAULT_READ_TIMEOUT,
    LOOPBACK_HOSTS,
    MAX_PARALLEL,
)


@with_model_loading
def serve(
    model: ModelArg,
    host: Annotated[str, typer.Option("--host", help="Address to listen on (0.0.0.0 exposes the model to the network).")] = "127.0.0.1",
    port: Annotated[int, typer.Option("--port", min=0, max=65535, help="TCP port (0: any free port, printed on start).")] = 8000,
    api_key: Annotated[
        Optional[str], typer.Option("--api-key", envvar="CNLLM_API_KEY", help="Require 'Authorization: Bearer KEY' on /v1/ routes.")
    ] = None,
    model_name: Annotated[Optional[str], typer.Option("--model-name", help="The model id clients send (default: the file or folder name).")] = None,
    parallel: Annotated[
        int,
        typer.Option(
            "--parallel",
            min=1,
            max=MAX_PARALLEL,
            help="Requests generated at once (llama.cpp: decoded together in one batch, --n-ctx tokens each; "
            "transformers: queued on one model; vllm: batched by one engine).",
        ),
    ] = 1,
    queue_size: Annotated[int, typer.Option("--queue-size", min=0, help="Requests allowed to wait for a free slot; more get 503.")] = 16,
    max_request_bytes: Annotated[
        int, typer.Option("--max-request-bytes", min=1, help="Largest request body accepted; bigger ones get 413.")
    ] = DEFAULT_MAX_REQUEST_BYTES,
    read_timeout: Annotated[
        float,
        typer.Option(
            "--read-timeout",
            min=0.1,
            max=3600,
            help="Seconds a client may take to send a request's head, or each piece of its body; slower connections are closed (408 for a body).",
        ),
    ] = DEFAULT_READ_TIMEOUT,
    max_connections: Annotated[
        int, typer.Option("--max-connections", min=1, help="Open connections allowed: at the limit new requests get 503, beyond it new connections are closed.")
    ] = DEFAULT_MAX_CONNECTIONS,
    allowed_host: Annotated[
        Optional[list[str]],
        typer.Option(
            "--allowed-host",
            help="Host header accepted (repeatable; '*' accepts any). Default on loopback: localhost, 127.0.0.1, ::1 "
            "(refuses DNS-rebinding pages); elsewhere any.",
        ),
    ] = None,
    prompt_cache: Annotated[
        bool,
        typer.Option(
            "--prompt-cache/--no-prompt-cache",
            help="llama.cpp: reuse the cached prefix of an earlier prompt, so a conversation's next turn evaluates only what is new "
            "(faster long chats; answers may differ slightly between identical requests).",
        ),
    ] = False,
    engine: Annotated[
        str,
        typer.Option(
            "--engine",
            click_type=click.Choice(ENGINES),
            help="Backend: auto (llama.cpp for a .gguf, transformers for a Hugging Face directory), or one by name; "
            "vllm serves a Hugging Face directory with vLLM's engine (pip install 'cnllm[vllm]').",
        ),
    ] = "auto",
    tensor_parallel_size: Annotated[
        int, typer.Option("--tensor-parallel-size", min=1, help="vllm: GPUs each layer is split across (vLLM's own option; multi-node: docs/chat_serve.md).")
    ] = 1,
    pipeline_parallel_size: Annotated[
        int, typer.Option("--pipeline-parallel-size", min=1, help="vllm: GPUs or nodes the layers are divided between (vLLM's own option).")
    ] = 1,
    template: TemplateOpt = "auto",
    n_ctx: NCtxOpt = None,
    verbose: VerboseOpt = False,
    load: LoadOptions = LoadOptions(),
) -> None:
    """Serve a model as a local OpenAI-compatible API: /v1/models, /v1/chat/completions (stream or not),
    /v1/completions (echo, logprobs), /v1/embeddings, /tokenize, /detokenize, /health, /metrics (Prometheus), and a chat page in the browser at /.

    Ctrl-C or SIGTERM stops it in order, answering the requests in flight cut short: exit 0 (Ctrl-C) or 143 (SIGTERM).

    Example: cnllm serve chinese-alpaca-q4.gguf --template alpaca --port 8000 --parallel 2

    On GPUs: cnllm serve ./chinese-llama-hf --engine vllm --parallel 32 --tensor-parallel-size 2
    """
    from cnllm.core.backends import load_model
    from cnllm.core.server.app import bind_socket, create_app, default_allowed_hosts, serve_until_stopped
    from cnllm.core.server.state import ServerConfig

    if not math.isfinite(read_timeout):
        raise UsageError(f"--read-timeout must be a number of seconds, got {read_timeout}")
    sock = bind_socket(host, port)
    generators: list = []
    try:
        options = replace(
            load,
            n_ctx=n_ctx,
            prompt_cache=prompt_cache,
            sequences=parallel,
            verbose=verbose,
            engine=engine,
            tensor_parallel_size=tensor_parallel_size,
            pipeline_parallel_size=pipeline_parallel_size,
        )
        generators = [load_model(model, options)] * parallel  # one model: llama.cpp and vLLM batch the slots, transformers queues them
        warn_beyond_trained(generators[0].context_length, generators[0].trained_context, options.rope)
        name = model_name or (model.stem if model.is_file() else model.resolve().name)
        config = ServerConfig(
            model_name=name,
            api_key=api_key,
            template=template,
            max_waiting=queue_size,
            max_request_bytes=max_request_bytes,
            read_timeout=read_timeout,
            max_connections=max_connections,
            allowed_hosts=tuple(allowed_host) if allowed_host else default_allowed_hosts(host),
        )
        app = create_app(generators, config)
        if app.state.server.prompt_format.is_plain and template == "auto":
            output.print_note(f"note: {model} has no chat template; chat requests are plain continuation, as with --template none (choose one with --template)")
        if host not in LOOPBACK_HOSTS and not api_key:
            output.print_warning(f"listening on {host} without --api-key: anyone who can reach this machine can use the model")
        bound_host, bound_port = sock.getsockname()[:2]
        shown = f"[{bound_host}]" if ":" in bound_host else bound_host
        output.print_note(
            f"serving {model} as '{name}' ({generators[0].backend}, {parallel} slot{'s' if parallel > 1 else ''}) "
            f"on http://{shown}:{bound_port}/v1 (chat page: http://{shown}:{bound_port}/) — Ctrl-C stops"
        )
        code = serve_until_stopped(app, sock, verbose=verbose)
        output.print_note("stopped")
        if code:
            raise typer.Exit(code)
    finally:
        sock.close()
        for generator in {id(g): g for g in generators}.values():
            generator.close()
