"""``cnllm sft``: instruction tuning with LoRA on Alpaca / messages / ShareGPT data."""

from __future__ import annotations

from typing import Annotated, Optional

import click
import typer

from cnllm.cli import output
from cnllm.commands.train_options import DATA, OPTIM, option, param, render, resolve_options, with_options
from cnllm.core.templates import TEMPLATE_NAMES

SFT_OPTIONS = [
    param("template", Annotated[str, option("--template", click_type=click.Choice(TEMPLATE_NAMES), panel=DATA,
                                            help="Chat template (auto: the tokenizer's own); recorded in the adapter's tokenizer.")], "alpaca"),
    param("system", Annotated[Optional[str], option("--system", help="System prompt replacing the template's default.", panel=DATA)], None),
    param("max_seq_length", Annotated[int, option("--max-seq-length", help="Longer samples are truncated (and counted).", panel=DATA)], 1024),
    param("packing", Annotated[bool, option("--packing", help="Join whole samples into sequences of up to --max-seq-length tokens.", panel=DATA)], False),
    param("skip_invalid", Annotated[bool, option("--skip-invalid", help="Skip malformed records (counted) instead of stopping at the first.", panel=DATA)], False),
    param("learning_rate", Annotated[float, option("--learning-rate", "--lr", help="Peak learning rate.", panel=OPTIM)], 1e-4),
]


@with_options(SFT_OPTIONS)
def sft(ctx: typer.Context, **values) -> None:
    """Instruction-tune a model with LoRA; the loss covers the assistant's answers only.

    Data: Alpaca JSON/JSONL (instruction, input, output), "messages" conversations
    (role/content) or ShareGPT "conversations" (from/value).

    Example: cnllm sft -m chinese-llama --peft-path pt-lora -d alpaca_zh.json --template alpaca -o sft-lora
    """
    from cnllm.core.training.trainer import run_training

    options = resolve_options(ctx, values)
    result = run_training("sft", options, output.CliProgress())
    if result.main_process:
        render(result, values["json_"])
