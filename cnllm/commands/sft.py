"""``cnllm sft``: instruction tuning with LoRA on Alpaca / messages / ShareGPT data."""

from __future__ import annotations

import typer

from cnllm.commands.train_options import train, training_command
from cnllm.core.training.sft import SFT


@training_command(SFT)
def sft(ctx: typer.Context, **values) -> None:
    """Instruction-tune a model with LoRA; the loss covers the assistant's answers only.

    Data: Alpaca JSON/JSONL (instruction, input, output), "messages" conversations
    (role/content) or ShareGPT "conversations" (from/value).

    Example: cnllm sft -m chinese-llama --peft-path pt-lora -d alpaca_zh.json --template alpaca -o sft-lora
    """
    train(ctx, SFT, values)
