"""The one backend dispatcher of every command that loads a model (chat, serve, eval): what a model path holds
decides the backend — a GGUF file runs on llama.cpp, a Hugging Face directory on transformers — with the same
checks and messages for every command; ``engine`` (serve's ``--engine``) may name another one the path can run on
(vLLM for a Hugging Face directory). It sits above the backends' modules (which import torch, llama_cpp and vllm
only when a model loads)."""

from __future__ import annotations

import importlib
from pathlib import Path
from typing import TYPE_CHECKING

from cnllm.core.errors import UsageError
from cnllm.core.files import is_gguf

if TYPE_CHECKING:
    from cnllm.core.generation.base import LoadedModel, LoadOptions

LLAMA_CPP, TRANSFORMERS, VLLM = "llama.cpp", "transformers", "vllm"
AUTO = "auto"
# Each backend, the class that runs it (module:class, imported when a model loads, so that a command's --help
# imports no numpy), and the kind of model path it runs (what backend_for finds there).
BACKENDS: dict[str, tuple[str, str]] = {
    LLAMA_CPP: ("cnllm.core.generation.llamacpp:LlamaCppModel", LLAMA_CPP),
    TRANSFORMERS: ("cnllm.core.generation.hf:TransformersModel", TRANSFORMERS),
    VLLM: ("cnllm.core.generation.vllm:VllmModel", TRANSFORMERS),
}
ENGINES = (AUTO, *BACKENDS)  # the choices of --engine
# What to do when an engine is given a path of the other kind.
CONVERT_HINT = {
    LLAMA_CPP: "llama.cpp runs GGUF files: convert the directory with cnllm convert-gguf",
    TRANSFORMERS: "it runs Hugging Face model directories: convert the GGUF with cnllm gguf-to-hf",
}


def backend_for(model: Path | str, *, lora: Path | None = None, quantize: bool = False, engine: str = AUTO) -> str:
    """The backend for ``model`` (``engine``, or what the path holds when ``auto``), or a usage error saying why
    the path cannot run there."""
    path = Path(model)
    if engine != AUTO and engine not in BACKENDS:
        raise UsageError(f"unknown engine {engine!r}; choose one of {', '.join(ENGINES)}")
    if not path.exists():
        raise UsageError(f"model {path} does not exist")
    if path.is_file():
        if not is_gguf(path):
            raise UsageError(f"{path} is not a GGUF file (no GGUF magic); pass a .gguf file or a Hugging Face model directory")
        if lora is not None or quantize:
            flag = "--lora" if lora is not None else "--load-in-4bit/--load-in-8bit"
            raise UsageError(
                f"{flag} applies to Hugging Face model directories; a GGUF is already merged and quantised "
                "(merge an adapter with cnllm merge-lora, then convert it with cnllm convert-gguf)"
            )
        kind = LLAMA_CPP
    elif (path / "config.json").exists():
        kind = TRANSFORMERS
    else:
        ggufs = sorted(path.glob("*.gguf"))
        hint = f" (it holds {ggufs[0].name}: pass that file)" if ggufs else ""
        raise UsageError(f"{path} is neither a .gguf file nor a Hugging Face model directory with config.json{hint}")
    if engine == AUTO:
        return kind
    if BACKENDS[engine][1] != kind:
        what = "a GGUF file" if kind == LLAMA_CPP else "a Hugging Face model directory"
        raise UsageError(f"--engine {engine} cannot run {path}, {what}; {CONVERT_HINT[BACKENDS[engine][1]]}")
    return engine


def load_model(model: Path | str, options: LoadOptions | None = None) -> LoadedModel:
    """The loaded model for ``model`` on its backend: it generates (chat, serve, passkey, longbench) and scores (eval)."""
    from cnllm.core.generation.base import LoadOptions

    options = options or LoadOptions()
    path = Path(model)
    backend = backend_for(path, lora=options.lora, quantize=options.load_in_4bit or options.load_in_8bit, engine=options.engine)
    if backend != VLLM and (options.tensor_parallel_size > 1 or options.pipeline_parallel_size > 1):
        flag = "--tensor-parallel-size" if options.tensor_parallel_size > 1 else "--pipeline-parallel-size"
        raise UsageError(f"{flag} applies to --engine vllm (the {backend} backend runs on one device)")
    module, name = BACKENDS[backend][0].split(":")
    return getattr(importlib.import_module(module), name)(path, options)
