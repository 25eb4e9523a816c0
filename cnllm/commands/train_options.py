"""The options ``cnllm pt``, ``cnllm sft`` and ``cnllm align`` share, declared once.

Each command declares only its own options and takes the shared ones through :func:`with_options`,
which extends the function's signature (Typer reads it). Values then pass through ``--config``
merging (flags given on the command line win) into a :class:`TrainOptions`.
"""

from __future__ import annotations

import inspect
from pathlib import Path
from typing import Annotated, Any, Callable, List, Optional

import click
import typer
from click.core import ParameterSource

from cnllm.cli import output
from cnllm.cli.options import DTYPE_WORDS, NEW_ROW_INIT_HELP
from cnllm.core.config import build_options, merge
from cnllm.core.embeddings import DEFAULT_INIT, INIT_METHODS
from cnllm.core.modelio import ATTN_IMPLEMENTATIONS
from cnllm.core.rope import TRAINING_METHODS
from cnllm.core.training.options import DEFAULT_LORA_TARGETS, TrainOptions

MODEL = "Model"
DATA = "Data"
LORA = "LoRA"
OPTIM = "Optimisation"
RUN = "Checkpoints and logging"
DIST = "Distributed"
LONG = "Long context"


def option(*names: str, help: str, panel: str, **kwargs: Any) -> Any:
    return typer.Option(*names, help=help, rich_help_panel=panel, **kwargs)


def param(name: str, annotation: Any, default: Any) -> inspect.Parameter:
    return inspect.Parameter(name, inspect.Parameter.KEYWORD_ONLY, annotation=annotation, default=default)


def _targets(value: Optional[str]) -> Optional[List[str]]:
    return None if value is None else [t.strip() for t in value.split(",") if t.strip()]


COMMON = [
    param("model", Annotated[Optional[Path], option("--model", "-m", help="Base model directory (Hugging Face format).", panel=MODEL)], None),
    param("data", Annotated[Optional[List[Path]], option("--data", "-d", help="Training data file or directory (repeat for more).", panel=DATA)], None),
    param("output", Annotated[Optional[Path], option("--output", "-o", file_okay=False, help="Output directory (adapter, tokenizer, metrics, loss curve, config).", panel=MODEL)], None),
    param("tokenizer", Annotated[Optional[Path], option("--tokenizer", help="Tokenizer directory (default: the --peft-path adapter's, else the model's).", panel=MODEL)], None),
    param("config", Annotated[Optional[Path], option("--config", "-c", dir_okay=False, help="YAML file of options (keys as the option names); command-line flags override it.", panel=MODEL)], None),
    param("validation_data", Annotated[Optional[List[Path]], option("--validation-data", help="Held-out evaluation data (instead of --validation-split).", panel=DATA)], None),
    param("validation_split", Annotated[float, option("--validation-split", help="Share of the data held out for eval loss and perplexity.", panel=DATA)], 0.01),
    param("lora_rank", Annotated[int, option("--lora-rank", help="LoRA rank r.", panel=LORA)], 64),
    param("lora_alpha", Annotated[float, option("--lora-alpha", help="LoRA alpha (scale = alpha / r).", panel=LORA)], 128.0),
    param("lora_dropout", Annotated[float, option("--lora-dropout", help="Dropout on the LoRA input.", panel=LORA)], 0.05),
    param("lora_targets", Annotated[Optional[str], option("--lora-targets", help=f"Comma-separated linear layers to adapt (default: {','.join(DEFAULT_LORA_TARGETS)}).", panel=LORA)], None),
    param("train_embeddings", Annotated[Optional[bool], option("--train-embeddings/--no-train-embeddings", help="Train embed_tokens and lm_head in full (PEFT modules_to_save) (default: on when the tokenizer is larger than the model's vocabulary).", panel=LORA)], None),
    param("new_row_init", Annotated[str, option("--new-row-init", click_type=click.Choice(INIT_METHODS), help=NEW_ROW_INIT_HELP, panel=LORA)], DEFAULT_INIT),
    param("full_finetune", Annotated[bool, option("--full-finetune", help="Train every weight instead of a LoRA adapter.", panel=LORA)], False),
    param("peft_path", Annotated[Optional[Path], option("--peft-path", help="Continue training this existing adapter.", panel=LORA)], None),
    param("batch_size", Annotated[int, option("--batch-size", help="Sequences per device per step.", panel=OPTIM)], 1),
    param("gradient_accumulation_steps", Annotated[int, option("--gradient-accumulation-steps", help="Steps whose gradients are summed before an update.", panel=OPTIM)], 1),
    param("epochs", Annotated[float, option("--epochs", help="Passes over the data (ignored with --max-steps).", panel=OPTIM)], 1.0),
    param("max_steps", Annotated[int, option("--max-steps", help="Stop after this many optimizer updates (-1: use --epochs).", panel=OPTIM)], -1),
    param("warmup_ratio", Annotated[float, option("--warmup-ratio", help="Share of the steps with a linear warmup before the cosine decay.", panel=OPTIM)], 0.03),
    param("weight_decay", Annotated[float, option("--weight-decay", help="AdamW weight decay.", panel=OPTIM)], 0.0),
    param("max_grad_norm", Annotated[float, option("--max-grad-norm", help="Gradient clipping norm.", panel=OPTIM)], 1.0),
    param("seed", Annotated[int, option("--seed", help="Random seed (data order, dropout, initialisation).", panel=OPTIM)], 42),
    param("precision", Annotated[str, option("--precision", help=f"auto (bf16/fp16 on a GPU, fp32 on CPU), {DTYPE_WORDS}.", panel=OPTIM)], "auto"),
    param("gradient_checkpointing", Annotated[bool, option("--gradient-checkpointing", help="Recompute activations in the backward pass to save memory.", panel=OPTIM)], False),
    param("load_in_4bit", Annotated[bool, option("--load-in-4bit", help="QLoRA: load the base model in 4 bits (CUDA GPU + bitsandbytes).", panel=OPTIM)], False),
    param("load_in_8bit", Annotated[bool, option("--load-in-8bit", help="Load the base model in 8 bits (CUDA GPU + bitsandbytes).", panel=OPTIM)], False),
    param("save_steps", Annotated[int, option("--save-steps", help="Write a checkpoint (adapter + tokenizer + optimizer state) every N steps.", panel=RUN)], 500),
    param("save_total_limit", Annotated[int, option("--save-total-limit", help="Keep only the newest N checkpoints.", panel=RUN)], 3),
    param("logging_steps", Annotated[int, option("--logging-steps", help="Log loss, lr, grad-norm and tokens/s every N steps.", panel=RUN)], 10),
    param("eval_steps", Annotated[Optional[int], option("--eval-steps", help="Evaluate every N steps (default: --save-steps).", panel=RUN)], None),
    param("eval_before", Annotated[bool, option("--eval-before/--no-eval-before", help="Measure eval loss before training, as the baseline.", panel=RUN)], True),
    param("tensorboard", Annotated[bool, option("--tensorboard", help="Also log to TensorBoard (in OUTPUT/runs).", panel=RUN)], False),
    param("resume", Annotated[bool, option("--resume", help="Continue from the last checkpoint (optimizer, scheduler, RNG and data position).", panel=RUN)], False),
    param("force", Annotated[bool, option("--force", "-f", help="Start over: replace an existing output or interrupted run.", panel=RUN)], False),
    param("deepspeed", Annotated[Optional[Path], option("--deepspeed", dir_okay=False, help="DeepSpeed JSON config (e.g. ZeRO-2); run under torchrun or accelerate launch.", panel=DIST)], None),
    param("fsdp", Annotated[Optional[str], option("--fsdp", help='FSDP mode for the Trainer, e.g. "full_shard auto_wrap".', panel=DIST)], None),
    param("rope_scaling", Annotated[Optional[str], option("--rope-scaling", click_type=click.Choice(TRAINING_METHODS), help="Train for a longer context with this RoPE scaling, written into the model config (linear: position interpolation).", panel=LONG)], None),
    param("rope_factor", Annotated[Optional[float], option("--rope-factor", help="Context extension factor (e.g. 4: 4K → 16K).", panel=LONG)], None),
    param("original_context", Annotated[Optional[int], option("--original-context", help="The base model's trained context (default: its config's max_position_embeddings).", panel=LONG)], None),
    param("attn_implementation", Annotated[Optional[str], option("--attn-implementation", click_type=click.Choice(ATTN_IMPLEMENTATIONS), help="transformers attention: eager, sdpa (default) or flash_attention_2 (CUDA with flash-attn installed).", panel=LONG)], None),
    param("trust_remote_code", Annotated[bool, option("--trust-remote-code", help="Allow model code from the model directory.", panel=MODEL)], False),
    param("json_", Annotated[bool, typer.Option("--json", help="Print exactly one JSON document on stdout (and nothing else there).")], False),
]


def with_options(extra: list[inspect.Parameter]) -> Callable[[Callable], Callable]:
    """Give a command function the shared options plus ``extra`` (its own), with ``ctx`` first."""

    def decorate(function: Callable) -> Callable:
        ctx = inspect.Parameter("ctx", inspect.Parameter.POSITIONAL_OR_KEYWORD, annotation=typer.Context)
        function.__signature__ = inspect.Signature([ctx, *extra, *COMMON])
        return function

    return decorate


def resolve_options(ctx: click.Context, values: dict[str, Any]) -> TrainOptions:
    """Command-line values merged over ``--config``; flags typed by the user win over the file."""
    values = dict(values)
    config = values.pop("config", None)
    values.pop("json_", None)
    explicit = {name for name in values if ctx.get_parameter_source(name) not in (ParameterSource.DEFAULT, ParameterSource.DEFAULT_MAP)}
    values["lora_targets"] = _targets(values.get("lora_targets"))
    values["data"] = values.get("data") or []
    values["validation_data"] = values.get("validation_data") or []
    merged = merge(TrainOptions, values, explicit, config)
    if merged.get("lora_targets") is None:
        merged["lora_targets"] = list(DEFAULT_LORA_TARGETS)
    return build_options(TrainOptions, merged)


def render(result, json_: bool) -> None:
    """The run's figures: one JSON document, or a short table."""
    document = result.to_dict()
    if json_:
        output.print_json(document)
        return
    rows = [("output", document["output"]), ("steps", document["steps"]), ("train loss (last)", _num(document["train_loss"]))]
    if document["eval_loss"] is not None:
        rows.append(("eval loss", f"{_num(document['eval_loss_before'])} → {_num(document['eval_loss'])}"))
        if document["reward_accuracy"] is not None:
            rows.append(("reward accuracy", f"{_num(document['reward_accuracy_before'])} → {_num(document['reward_accuracy'])}"))
            rows.append(("reward margin", f"{_num(document['reward_margin_before'])} → {_num(document['reward_margin'])}"))
        else:
            rows.append(("perplexity", f"{_num(document['perplexity_before'])} → {_num(document['perplexity'])}"))
    rows += [
        ("tokens/s", _num(document["tokens_per_second"])),
        ("trainable parameters", f"{document['trainable_parameters']:,} of {document['total_parameters']:,}"),
        ("peak memory", output.human_bytes(document["peak_memory_bytes"])),
        ("time", f"{document['seconds']:.1f}s"),
    ]
    if document["resumed_from"]:
        rows.append(("resumed from", document["resumed_from"]))
    output.print_table(None, ["", "value"], rows)


def _num(value: Any) -> str:
    if value is None:
        return "-"
    return f"{value:.4f}" if isinstance(value, float) else str(value)
