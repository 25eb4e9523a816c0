"""``cnllm gguf-to-hf``: a GGUF-only LLaMA-family model → a trainable Hugging Face checkpoint."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from cnllm.cli import output
from cnllm.cli.options import DTYPE_WORDS, ForceOpt, JsonOpt, MaxShardSizeOpt, OutputDirArg
from cnllm.core.tensors import DEFAULT_SHARD_SIZE


def gguf_to_hf(
    gguf_file: Annotated[Path, typer.Argument(dir_okay=False, help="The .gguf file (any llama.cpp type: f32, f16, Q8_0, Q4_K_M …).")],
    output_dir: OutputDirArg,
    dtype: Annotated[str, typer.Option("--dtype", help=f"Weights dtype: {DTYPE_WORDS}; de-quantized values are exact in fp32.")] = "fp32",
    max_shard_size: MaxShardSizeOpt = DEFAULT_SHARD_SIZE,
    force: ForceOpt = False,
    json_: JsonOpt = False,
) -> None:
    """Turn a LLaMA-family GGUF into a Hugging Face checkpoint (safetensors, config, tokenizer, chat template).

    transformers de-quantizes the tensors and rebuilds the tokenizer from the GGUF metadata; the weights
    are copied into a plain model and saved, with cnllm-gguf-to-hf.json and SHA256SUMS beside them.
    llama and qwen2 GGUFs (a Mistral GGUF is a llama one and comes back as LLaMA).

    Example: cnllm gguf-to-hf SmolLM2-135M-Instruct.Q4_1.gguf -o smollm2-hf
    """
    from cnllm.core.config import build_options
    from cnllm.core.gguf.to_hf import GgufToHfOptions, gguf_to_hf as run

    options = build_options(GgufToHfOptions, {"dtype": dtype, "max_shard_size": max_shard_size})
    result = run(gguf_file, output_dir, options, force=force, progress=output.CliProgress())
    document = result.to_dict()
    if json_:
        output.print_json(document)
        return
    tied = "tied embeddings" if document["tied_embeddings"] else "separate lm_head"
    template = "chat template" if document["chat_template"] else "no chat template"
    output.stdout().print(
        f"wrote {document['output']} ({document['architecture']}, {document['parameters']:,} parameters from {document['file_type']}, "
        f"{document['dtype']}, {tied}, vocabulary {document['vocab_size']}, {template}; "
        f"{output.human_bytes(document['total_bytes'])}) in {document['seconds']:.1f}s",
        markup=False,
        highlight=False,
    )
