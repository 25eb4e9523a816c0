"""``cnllm pt``: LoRA continued pre-training on raw text (learn new Chinese embeddings)."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Optional

import typer

from cnllm.cli import output
from cnllm.commands.train_options import DATA, OPTIM, option, param, render, resolve_options, with_options

PT_OPTIONS = [
    param("block_size", Annotated[int, option("--block-size", help="Tokens per training block (documents are joined with EOS).", panel=DATA)], 1024),
    param("streaming", Annotated[bool, option("--streaming", help="Tokenise while training, for corpora larger than RAM (needs --max-steps; no cache).", panel=DATA)], False),
    param("cache_dir", Annotated[Optional[Path], option("--cache-dir", help="Where tokenised blocks are cached (default: ~/.cache/cnllm/pt-blocks).", panel=DATA)], None),
    param("learning_rate", Annotated[float, option("--learning-rate", "--lr", help="Peak learning rate.", panel=OPTIM)], 2e-4),
]


@with_options(PT_OPTIONS)
def pt(ctx: typer.Context, **values) -> None:
    """Continue pre-training a model on raw text with LoRA (text files, directories, JSONL "text").

    Documents get an EOS each and are cut into --block-size blocks; tokenisation is cached.
    A tokenizer larger than the model's vocabulary resizes the embeddings (each new row starts as
    the mean of the base pieces its token splits into: --new-row-init) and trains embed_tokens/lm_head in full.

    Example: cnllm pt -m llama-7b --tokenizer merged-tokenizer -d corpus/ -o pt-lora --max-steps 1000

    Distributed: torchrun --nproc_per_node 8 -m cnllm pt --config examples/training/pt-7b-8gpu-zero2.yaml
    """
    from cnllm.core.training.trainer import run_training

    options = resolve_options(ctx, values)
    result = run_training("pt", options, output.CliProgress())
    if result.main_process:
        render(result, values["json_"])
