"""``cnllm pt``: LoRA continued pre-training on raw text (learn new Chinese embeddings)."""

from __future__ import annotations

import typer

from cnllm.commands.train_options import train, training_command
from cnllm.core.training.pt import PT


@training_command(PT)
def pt(ctx: typer.Context, **values) -> None:
    """Continue pre-training a model on raw text with LoRA (text files, directories, JSONL "text").

    Documents get an EOS each and are cut into --block-size blocks; tokenisation is cached.
    A tokenizer larger than the model's vocabulary resizes the embeddings (each new row starts as
    the mean of the base pieces its token splits into: --new-row-init) and trains embed_tokens/lm_head in full.

    Example: cnllm pt -m llama-7b --tokenizer merged-tokenizer -d corpus/ -o pt-lora --max-steps 1000

    Distributed: torchrun --nproc_per_node 8 -m cnllm pt --config examples/training/pt-7b-8gpu-zero2.yaml
    """
    train(ctx, PT, values)
