"""``cnllm sft``: instruction tuning with LoRA on Alpaca / messages / ShareGPT data."""

from __future__ import annotations

from typing import Annotated, Optional

import typer

from cnllm.cli import output
from cnllm.commands.train_options import DATA, OPTIM, _opt, _param, render, resolve_options, with_options
from cnllm.core.templates import TEMPLATE_NAMES

SFT_OPTIONS = [
    _param("template", Annotated[str, _opt("--template", help=f"Chat template: {', '.join(TEMPLATE_NAMES)} (auto: the tokenizer's own).", panel=DATA)], "alpaca"),
    _param("system", Annotated[Optional[str], _opt("--system", help="System prompt replacing the template's default.", panel=DATA)], None),
    _param("max_seq_length", Annotated[int, _opt("--max-seq-length", help="Longer samples are truncated (and counted).", panel=DATA)], 1024),
    _param("packing", Annotated[bool, _opt("--packing", help="Join whole samples into sequences of up to --max-seq-length tokens.", panel=DATA)], False),
    _param("skip_invalid", Annotated[bool, _opt("--skip-invalid", help="Skip malformed records (counted) instead of stopping at the first.", panel=DATA)], False),
    _param("learning_rate", Annotated[float, _opt("--learning-rate", "--lr", help="Peak learning rate.", panel=OPTIM)], 1e-4),
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
