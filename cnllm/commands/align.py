"""``cnllm align``: preference alignment (DPO, ORPO and DPO's relatives) with TRL, after sft."""

from __future__ import annotations

import typer

from cnllm.commands.train_options import train, training_command
from cnllm.core.training.align import ALIGN


@training_command(ALIGN)
def align(ctx: typer.Context, **values) -> None:
    """Align a model to preference pairs (DPO, ORPO, …) with TRL; LoRA by default, the reference is the base.

    Data: JSON/JSONL records with prompt/chosen/rejected (optional system, history), or TRL's
    conversational form (chosen/rejected message lists, with or without a prompt list).
    Reward accuracy and margin on held-out pairs are logged and reported.

    Example: cnllm align -m sft-merged -d pref_zh.jsonl --method dpo --beta 0.1 --template alpaca -o dpo-lora
    """
    train(ctx, ALIGN, values)
