"""``cnllm align``: preference alignment (DPO, ORPO and DPO's relatives) with TRL, after sft."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Optional

import click
import typer

from cnllm.cli import output
from cnllm.commands.train_options import DATA, OPTIM, option, param, render, resolve_options, with_options
from cnllm.core.templates import TEMPLATE_NAMES
from cnllm.core.training.options import ALIGN_METHODS

ALIGN_OPTIONS = [
    param("method", Annotated[str, option("--method", click_type=click.Choice(ALIGN_METHODS), panel=OPTIM,
                                          help="Preference loss: dpo (sigmoid), ipo, hinge, robust, dpo-norm, bco, nca, sppo, apo-zero, apo-down (TRL's DPO losses) or orpo (no reference model).")], "dpo"),
    param("beta", Annotated[float, option("--beta", help="Strength of the pull towards the reference model (DPO family); ORPO's odds-ratio weight.", panel=OPTIM)], 0.1),
    param("template", Annotated[str, option("--template", click_type=click.Choice(TEMPLATE_NAMES), panel=DATA,
                                            help="Chat template the prompts are rendered with (as in sft; auto: the tokenizer's own); recorded in the adapter's tokenizer.")], "alpaca"),
    param("system", Annotated[Optional[str], option("--system", help="System prompt replacing the template's default.", panel=DATA)], None),
    param("max_length", Annotated[int, option("--max-length", help="Longest prompt + answer in tokens (answers are cut, counted).", panel=DATA)], 1024),
    param("max_prompt_length", Annotated[Optional[int], option("--max-prompt-length", help="Longest prompt in tokens (its beginning is cut, counted; default: half of --max-length).", panel=DATA)], None),
    param("skip_invalid", Annotated[bool, option("--skip-invalid", help="Skip malformed records (counted) instead of stopping at the first.", panel=DATA)], False),
    param("cache_dir", Annotated[Optional[Path], option("--cache-dir", help="Where tokenised pairs are cached (default: ~/.cache/cnllm/preference).", panel=DATA)], None),
    param("learning_rate", Annotated[float, option("--learning-rate", "--lr", help="Peak learning rate.", panel=OPTIM)], 5e-5),
]


@with_options(ALIGN_OPTIONS)
def align(ctx: typer.Context, **values) -> None:
    """Align a model to preference pairs (DPO, ORPO, …) with TRL; LoRA by default, the reference is the base.

    Data: JSON/JSONL records with prompt/chosen/rejected (optional system, history), or TRL's
    conversational form (chosen/rejected message lists, with or without a prompt list).
    Reward accuracy and margin on held-out pairs are logged and reported.

    Example: cnllm align -m sft-merged -d pref_zh.jsonl --method dpo --beta 0.1 --template alpaca -o dpo-lora
    """
    from cnllm.core.training.trainer import run_training

    options = resolve_options(ctx, values)
    result = run_training("align", options, output.CliProgress())
    if result.main_process:
        render(result, values["json_"])
