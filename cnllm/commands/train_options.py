"""The options ``cnllm pt`` and ``cnllm sft`` share, declared once.

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
from cnllm.core.config import merge
from cnllm.core.training.options import DEFAULT_LORA_TARGETS, TrainOptions

MODEL = "Model"
DATA = "Data"
LORA = "LoRA"
OPTIM = "Optimisation"
RUN = "Checkpoints and logging"
DIST = "Distributed"


def _opt(*names: str, help: str, panel: str, **kwargs: Any) -> Any:
    return typer.Option(*names, help=help, rich_help_panel=panel, **kwargs)


def _param(name: str, annotation: Any, default: Any) -> inspect.Parameter:
    return inspect.Parameter(name, inspect.Parameter.KEYWORD_ONLY, annotation=annotation, default=default)


def _targets(value: Optional[str]) -> Optional[List[str]]:
    return None if value is None else [t.strip() for t in value.split(",") if t.strip()]


COMMON = [
    _param("model", Annotated[Optional[Path], _opt("--model", "-m", help="Base model directory (Hugging Face format).", panel=MODEL)], None),
    _param("data", Annotated[Optional[List[Path]], _opt("--data", "-d", help="Training data file or directory (repeat for more).", panel=DATA)], None),
    _param("output", Annotated[Optional[Path], _opt("--output", "-o", file_okay=False, help="Output directory (adapter, tokenizer, metrics, loss curve, config).", panel=MODEL)], None),
    _param("tokenizer", Annotated[Optional[Path], _opt("--tokenizer", "-t", help="Tokenizer directory (default: the --peft-path adapter's, else the model's).", panel=MODEL)], None),
    _param("config", Annotated[Optional[Path], _opt("--config", "-c", dir_okay=False, help="YAML file of options (keys as the option names); command-line flags override it.", panel=MODEL)], None),
    _param("validation_data", Annotated[Optional[List[Path]], _opt("--validation-data", help="Held-out evaluation data (instead of --validation-split).", panel=DATA)], None),
    _param("validation_split", Annotated[float, _opt("--validation-split", help="Share of the data held out for eval loss and perplexity.", panel=DATA)], 0.01),
    _param("lora_rank", Annotated[int, _opt("--lora-rank", help="LoRA rank r.", panel=LORA)], 64),
    _param("lora_alpha", Annotated[float, _opt("--lora-alpha", help="LoRA alpha (scale = alpha / r).", panel=LORA)], 128.0),
    _param("lora_dropout", Annotated[float, _opt("--lora-dropout", help="Dropout on the LoRA input.", panel=LORA)], 0.05),
    _param("lora_targets", Annotated[Optional[str], _opt("--lora-targets", help=f"Comma-separated linear layers to adapt (default: {','.join(DEFAULT_LORA_TARGETS)}).", panel=LORA)], None),
    _param("train_embeddings", Annotated[Optional[bool], _opt("--train-embeddings/--no-train-embeddings", help="Train embed_tokens and lm_head in full (PEFT modules_to_save) (default: on when the tokenizer is larger than the model's vocabulary).", panel=LORA)], None),
    _param("full_finetune", Annotated[bool, _opt("--full-finetune", help="Train every weight instead of a LoRA adapter.", panel=LORA)], False),
    _param("peft_path", Annotated[Optional[Path], _opt("--peft-path", help="Continue training this existing adapter.", panel=LORA)], None),
    _param("batch_size", Annotated[int, _opt("--batch-size", help="Sequences per device per step.", panel=OPTIM)], 1),
    _param("gradient_accumulation_steps", Annotated[int, _opt("--gradient-accumulation-steps", help="Steps whose gradients are summed before an update.", panel=OPTIM)], 1),
    _param("epochs", Annotated[float, _opt("--epochs", help="Passes over the data (ignored with --max-steps).", panel=OPTIM)], 1.0),
    _param("max_steps", Annotated[int, _opt("--max-steps", help="Stop after this many optimizer updates (-1: use --epochs).", panel=OPTIM)], -1),
    _param("warmup_ratio", Annotated[float, _opt("--warmup-ratio", help="Share of the steps with a linear warmup before the cosine decay.", panel=OPTIM)], 0.03),
    _param("weight_decay", Annotated[float, _opt("--weight-decay", help="AdamW weight decay.", panel=OPTIM)], 0.0),
    _param("max_grad_norm", Annotated[float, _opt("--max-grad-norm", help="Gradient clipping norm.", panel=OPTIM)], 1.0),
    _param("seed", Annotated[int, _opt("--seed", help="Random seed (data order, dropout, initialisation).", panel=OPTIM)], 42),
    _param("precision", Annotated[str, _opt("--precision", help="auto (bf16/fp16 on a GPU, fp32 on CPU), fp32, bf16 or fp16.", panel=OPTIM)], "auto"),
    _param("gradient_checkpointing", Annotated[bool, _opt("--gradient-checkpointing", help="Recompute activations in the backward pass to save memory.", panel=OPTIM)], False),
    _param("load_in_4bit", Annotated[bool, _opt("--load-in-4bit", help="QLoRA: load the base model in 4 bits (CUDA GPU + bitsandbytes).", panel=OPTIM)], False),
    _param("load_in_8bit", Annotated[bool, _opt("--load-in-8bit", help="Load the base model in 8 bits (CUDA GPU + bitsandbytes).", panel=OPTIM)], False),
    _param("save_steps", Annotated[int, _opt("--save-steps", help="Write a checkpoint (adapter + tokenizer + optimizer state) every N steps.", panel=RUN)], 500),
    _param("save_total_limit", Annotated[int, _opt("--save-total-limit", help="Keep only the newest N checkpoints.", panel=RUN)], 3),
    _param("logging_steps", Annotated[int, _opt("--logging-steps", help="Log loss, lr, grad-norm and tokens/s every N steps.", panel=RUN)], 10),
    _param("eval_steps", Annotated[Optional[int], _opt("--eval-steps", help="Evaluate every N steps (default: --save-steps).", panel=RUN)], None),
    _param("eval_before", Annotated[bool, _opt("--eval-before/--no-eval-before", help="Measure eval loss before training, as the baseline.", panel=RUN)], True),
    _param("tensorboard", Annotated[bool, _opt("--tensorboard", help="Also log to TensorBoard (in OUTPUT/runs).", panel=RUN)], False),
    _param("resume", Annotated[bool, _opt("--resume", help="Continue from the last checkpoint (optimizer, scheduler, RNG and data position).", panel=RUN)], False),
    _param("force", Annotated[bool, _opt("--force", "-f", help="Start over: replace an existing output or interrupted run.", panel=RUN)], False),
    _param("deepspeed", Annotated[Optional[Path], _opt("--deepspeed", dir_okay=False, help="DeepSpeed JSON config (e.g. ZeRO-2); run under torchrun or accelerate launch.", panel=DIST)], None),
    _param("fsdp", Annotated[Optional[str], _opt("--fsdp", help='FSDP mode for the Trainer, e.g. "full_shard auto_wrap".', panel=DIST)], None),
    _param("trust_remote_code", Annotated[bool, _opt("--trust-remote-code", help="Allow model code from the model directory.", panel=MODEL)], False),
    _param("json_", Annotated[bool, typer.Option("--json", help="Print exactly one JSON document on stdout (and nothing else there).")], False),
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
    return TrainOptions(**merged)


def render(result, json_: bool) -> None:
    """The run's figures: one JSON document, or a short table."""
    document = result.as_dict()
    if json_:
        output.print_json(document)
        return
    rows = [("output", document["output"]), ("steps", document["steps"]), ("train loss (last)", _num(document["train_loss"]))]
    if document["eval_loss"] is not None:
        rows.append(("eval loss", f"{_num(document['eval_loss_before'])} → {_num(document['eval_loss'])}"))
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
