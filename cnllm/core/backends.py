"""The one backend dispatcher of every command that loads a model (chat, serve, eval): what a model path holds
decides the backend — a GGUF file runs on llama.cpp, a Hugging Face directory on transformers — with the same
checks and messages for every command. It sits above both backends' modules (which import torch and llama_cpp
only when a model loads)."""

from __future__ import annotations

from pathlib import Path

from cnllm.core.errors import UsageError
from cnllm.core.files import is_gguf
from cnllm.core.generation.base import LoadedModel, LoadOptions
from cnllm.core.generation.hf import TransformersModel
from cnllm.core.generation.llamacpp import LlamaCppModel

LLAMA_CPP, TRANSFORMERS = "llama.cpp", "transformers"


def backend_for(model: Path | str, *, lora: Path | None = None, quantize: bool = False) -> str:
    """``llama.cpp`` or ``transformers`` for ``model``, or a usage error saying what the path is instead."""
    path = Path(model)
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
        return LLAMA_CPP
    if (path / "config.json").exists():
        return TRANSFORMERS
    ggufs = sorted(path.glob("*.gguf"))
    hint = f" (it holds {ggufs[0].name}: pass that file)" if ggufs else ""
    raise UsageError(f"{path} is neither a .gguf file nor a Hugging Face model directory with config.json{hint}")


def load_model(model: Path | str, options: LoadOptions | None = None) -> LoadedModel:
    """The loaded model for ``model`` on its backend: it generates (chat, serve, passkey, longbench) and scores (eval)."""
    options = options or LoadOptions()
    path = Path(model)
    if backend_for(path, lora=options.lora, quantize=options.load_in_4bit or options.load_in_8bit) == LLAMA_CPP:
        return LlamaCppModel(path, options)
    return TransformersModel(path, options)
