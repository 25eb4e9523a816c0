"""One backend dispatcher for generation (chat, serve) and scoring (eval): what a model path holds decides
the backend — a GGUF file runs on llama.cpp, a Hugging Face directory on transformers — with the same
checks and messages for every command. It sits above both backends' modules and imports them lazily."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

from cnllm.core.errors import UsageError
from cnllm.core.gguf import is_gguf

if TYPE_CHECKING:
    from cnllm.core.evaluation.models import ModelSpec, ScoringModel
    from cnllm.core.generation.base import Generator, LoadOptions

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


def load_generator(model: Path | str, options: "LoadOptions | None" = None) -> "Generator":
    """A streaming generator for ``model`` (chat, serve)."""
    from cnllm.core.generation.base import LoadOptions

    options = options or LoadOptions()
    path = Path(model)
    if backend_for(path, lora=options.lora, quantize=options.load_in_4bit or options.load_in_8bit) == LLAMA_CPP:
        from cnllm.core.generation.llamacpp import LlamaCppGenerator

        return LlamaCppGenerator(path, options)
    from cnllm.core.generation.hf import HFGenerator

    return HFGenerator(path, options)


def load_scorer(spec: "ModelSpec", *, logits_all: bool = False) -> "ScoringModel":
    """A batched scorer for ``spec.path`` (eval); ``logits_all`` keeps every position's logits (perplexity)."""
    if backend_for(spec.path, lora=spec.lora) == LLAMA_CPP:
        from cnllm.core.evaluation.models import LlamaCppModel

        return LlamaCppModel(spec, logits_all=logits_all)
    from cnllm.core.evaluation.models import TransformersModel
    from cnllm.core.runtime import quiet_libraries

    quiet_libraries()
    return TransformersModel(spec)
