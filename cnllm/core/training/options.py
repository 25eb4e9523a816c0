"""The options every training method shares, each declared once (:func:`~cnllm.core.config.option`).

A method's own options subclass :class:`TrainOptions` in its module (``PtOptions`` in
:mod:`cnllm.core.training.pt`, …), with its own defaults; the command-line flags of ``cnllm pt``/``sft``/
``align``, their ``--config`` keys, the recipe keys of the pipeline's steps and the resolved config written
beside the adapter are all derived from these declarations. Messages name options by field
(:class:`~cnllm.core.config.OptionError`); the command line renders ``--max-steps``, a recipe ``max_steps``.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Optional

from cnllm.core.config import OptionError, check_declared, coerce_fields, option
from cnllm.core.dtypes import DTYPE_WORDS, FLOAT_DTYPES, DType, words_for
from cnllm.core.embeddings import DEFAULT_INIT, INIT_METHODS, NEW_ROW_INIT_HELP
from cnllm.core.modelio import ATTN_IMPLEMENTATIONS
from cnllm.core.rope import TRAINING_METHODS
from cnllm.core.templates import TEMPLATE_NAMES

MAX_LORA_RANK = 1 << 16  # above any layer's width: a larger rank is a typo that would allocate without end
DEFAULT_LORA_TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
PRECISIONS = ("auto", *words_for(FLOAT_DTYPES))
LR_SCHEDULERS = {"cosine": "cosine", "linear": "linear", "constant": "constant_with_warmup"}  # --lr-scheduler → the Trainer's lr_scheduler_type
# Help sections on the command line.
MODEL, DATA, LORA, OPTIM, RUN, DIST, LONG = "Model", "Data", "LoRA", "Optimisation", "Checkpoints and logging", "Distributed", "Long context"


def learning_rate(default: float) -> float:
    """The learning rate, declared by each method with the default that suits it."""
    return option(default, help="Peak learning rate.", panel=OPTIM, aliases=("--lr",))


@dataclass
class TrainOptions:
    """The shared options; a method's options (its subclass) add its own and declare its ``learning_rate``."""

    if TYPE_CHECKING:
        learning_rate: float  # declared by each method's subclass, with the method's default

    # what to train, and where the result goes
    model: Optional[Path] = option(None, help="Base model directory (Hugging Face format).", panel=MODEL, aliases=("-m",), model=True, recipe=False)
    data: list[Path] = option(help="Training data file or directory (repeat for more).", panel=DATA, aliases=("-d",), factory=list)
    output: Optional[Path] = option(None, help="Output directory (adapter, tokenizer, metrics, loss curve, config).", panel=MODEL, aliases=("-o",),
                                    file_okay=False, recipe=False)
    tokenizer: Optional[Path] = option(None, help="Tokenizer directory (default: the --peft-path adapter's, else the model's).", panel=MODEL,
                                       model=True, recipe=False)
    validation_data: list[Path] = option(help="Held-out evaluation data (instead of --validation-split).", panel=DATA, factory=list)
    validation_split: float = option(0.01, help="Share of the data held out for eval loss and perplexity.", panel=DATA)
    # LoRA / full fine-tuning
    lora_rank: int = option(64, help="LoRA rank r.", panel=LORA, maximum=MAX_LORA_RANK)
    lora_alpha: float = option(128.0, help="LoRA alpha (scale = alpha / r).", panel=LORA)
    lora_dropout: float = option(0.05, help="Dropout on the LoRA input.", panel=LORA)
    lora_targets: list[str] = option(help=f"Comma-separated linear layers to adapt (default: {','.join(DEFAULT_LORA_TARGETS)}).", panel=LORA,
                                     factory=lambda: list(DEFAULT_LORA_TARGETS))
    train_embeddings: Optional[bool] = option(None, help="Train embed_tokens and lm_head in full (PEFT modules_to_save) (default: on when the "
                                              "tokenizer is larger than the model's vocabulary).", panel=LORA, toggle=True)
    new_row_init: str = option(DEFAULT_INIT, help=NEW_ROW_INIT_HELP, panel=LORA, choices=INIT_METHODS)
    full_finetune: bool = option(False, help="Train every weight instead of a LoRA adapter.", panel=LORA)
    peft_path: Optional[Path] = option(None, help="Continue training this existing adapter.", panel=LORA, model=True)
    # optimisation
    batch_size: int = option(1, help="Sequences per device per step.", panel=OPTIM)
    gradient_accumulation_steps: int = option(1, help="Steps whose gradients are summed before an update.", panel=OPTIM)
    epochs: float = option(1.0, help="Passes over the data (ignored with --max-steps).", panel=OPTIM)
    max_steps: int = option(-1, help="Stop after this many optimizer updates (-1: use --epochs).", panel=OPTIM)
    warmup_ratio: float = option(0.03, help="Share of the steps with a linear warmup before the --lr-scheduler schedule.", panel=OPTIM)
    lr_scheduler: str = option("cosine", help="Learning-rate schedule after the warmup: cosine or linear decay to 0, or constant.", panel=OPTIM,
                               choices=tuple(LR_SCHEDULERS))
    weight_decay: float = option(0.0, help="AdamW weight decay.", panel=OPTIM)
    max_grad_norm: float = option(1.0, help="Gradient clipping norm.", panel=OPTIM)
    seed: int = option(42, help="Random seed (data order, dropout, initialisation).", panel=OPTIM)
    precision: str = option("auto", help=f"auto (bf16/fp16 on a GPU, fp32 on CPU), {DTYPE_WORDS}.", panel=OPTIM)
    gradient_checkpointing: bool = option(False, help="Recompute activations in the backward pass to save memory.", panel=OPTIM)
    load_in_4bit: bool = option(False, help="QLoRA: load the base model in 4 bits (CUDA GPU + bitsandbytes).", panel=OPTIM)
    load_in_8bit: bool = option(False, help="Load the base model in 8 bits (CUDA GPU + bitsandbytes).", panel=OPTIM)
    # checkpoints, logging, evaluation
    save_steps: int = option(500, help="Write a checkpoint (adapter + tokenizer + optimizer state) every N steps.", panel=RUN)
    save_total_limit: int = option(3, help="Keep only the newest N checkpoints.", panel=RUN)
    logging_steps: int = option(10, help="Log loss, lr, grad-norm and tokens/s every N steps.", panel=RUN)
    eval_steps: Optional[int] = option(None, help="Evaluate every N steps (default: --save-steps).", panel=RUN)
    eval_before: bool = option(True, help="Measure eval loss before training, as the baseline.", panel=RUN, toggle=True)
    tensorboard: bool = option(False, help="Also log to TensorBoard (in OUTPUT/runs).", panel=RUN)
    resume: bool = option(False, help="Continue from the last checkpoint (optimizer, scheduler, RNG and data position).", panel=RUN, recipe=False)
    force: bool = option(False, help="Start over: replace an existing output or interrupted run.", panel=RUN, aliases=("-f",), recipe=False)
    # distributed engines
    deepspeed: Optional[Path] = option(None, help="DeepSpeed JSON config (e.g. ZeRO-2); run under torchrun or accelerate launch.", panel=DIST,
                                       dir_okay=False)
    fsdp: Optional[str] = option(None, help='FSDP mode for the Trainer, e.g. "full_shard auto_wrap".', panel=DIST)
    # long context
    rope_scaling: Optional[str] = option(None, help="Train for a longer context with this RoPE scaling, written into the model config "
                                         "(linear: position interpolation).", panel=LONG, choices=TRAINING_METHODS)
    rope_factor: Optional[float] = option(None, help="Context extension factor (e.g. 4: 4K → 16K).", panel=LONG)
    original_context: Optional[int] = option(None, help="The base model's trained context (default: its config's max_position_embeddings).", panel=LONG)
    attn_implementation: Optional[str] = option(None, help="transformers attention: eager, sdpa (default) or flash_attention_2 (CUDA with "
                                                "flash-attn installed).", panel=LONG, choices=ATTN_IMPLEMENTATIONS)
    trust_remote_code: bool = option(False, help="Allow model code from the model directory.", panel=MODEL)

    def __post_init__(self) -> None:
        coerce_fields(self)

    @property
    def model_dir(self) -> Path:
        """``model``, which :meth:`validate` requires."""
        return self._required("model")

    @property
    def output_dir(self) -> Path:
        """``output``, which :meth:`validate` requires."""
        return self._required("output")

    def _required(self, name: str) -> Path:
        value = getattr(self, name)
        if value is None:
            raise OptionError("{%s} is required" % name)
        return value

    @property
    def precision_short(self) -> str:
        """``auto``, or fp32/bf16/fp16 whichever word the user chose for it (``precision`` keeps the word)."""
        return "auto" if self.precision.lower() == "auto" else DType(self.precision, where="precision").short

    def to_dict(self) -> dict:
        """Every option of the run, by field name (the method's options hold only what matters to it)."""
        return {f.name: getattr(self, f.name) for f in dataclasses.fields(self)}

    def validate(self) -> None:
        """Option combinations that cannot work: one line each, before anything is loaded."""
        for required in ("model", "data", "output"):
            if not getattr(self, required):
                raise OptionError("{%s} is required" % required)
        if self.precision.lower() not in PRECISIONS:
            raise OptionError("{precision} {value!r} is not one of {allowed}", value=self.precision, allowed=", ".join(PRECISIONS))
        check_declared(self)
        if self.load_in_4bit and self.load_in_8bit:
            raise OptionError("choose one of {load_in_4bit} and {load_in_8bit}")
        if self.full_finetune and (self.peft_path or self.load_in_4bit or self.load_in_8bit):
            raise OptionError("{full_finetune} trains every weight; it cannot be combined with {peft_path}, {load_in_4bit} or {load_in_8bit}")
        if not self.full_finetune and not self.lora_targets and not self.peft_path:
            raise OptionError("{lora_targets} is empty: name at least one linear layer (or use {full_finetune})")
        if self.max_steps == 0 or self.max_steps < -1:
            raise OptionError("{max_steps} must be at least 1, or -1 to train for {epochs}; got {value}", value=self.max_steps)
        if not math.isfinite(self.epochs) or self.epochs <= 0:
            raise OptionError("{epochs} must be a positive number, got {value}", value=self.epochs)
        for name, low, low_ok in (("learning_rate", 0, False), ("lora_alpha", 0, False), ("weight_decay", 0, True), ("max_grad_norm", 0, True)):
            value = getattr(self, name)
            if not math.isfinite(value) or value < low or (value == low and not low_ok):
                raise OptionError("{%s} must be a finite number {bound} {low}, got {value}" % name, bound=">=" if low_ok else ">", low=low, value=value)
        for name in ("lora_dropout", "warmup_ratio", "validation_split"):
            value = getattr(self, name)
            if not 0 <= value < 1:
                raise OptionError("{%s} must be in [0, 1), got {value}" % name, value=value)
        for name in ("lora_rank", "batch_size", "save_steps", "gradient_accumulation_steps", "logging_steps", "save_total_limit", "eval_steps"):
            value = getattr(self, name)
            if value is not None and value < 1:
                raise OptionError("{%s} must be at least 1, got {value}" % name, value=value)
        if self.deepspeed is not None and not self.deepspeed.is_file():
            raise OptionError("{deepspeed}: DeepSpeed config {path} does not exist", path=self.deepspeed)
        if self.peft_path is not None and not (self.peft_path / "adapter_config.json").is_file():
            raise OptionError("{peft_path} {path} is not a PEFT adapter directory (no adapter_config.json)", path=self.peft_path)
        if self.rope_scaling is not None:
            if self.rope_factor is None or self.rope_factor <= 1:
                raise OptionError("{rope_scaling} {method} needs {rope_factor} greater than 1 (e.g. 4 for 4K → 16K)", method=self.rope_scaling)
        elif self.rope_factor is not None or self.original_context is not None:
            raise OptionError("{rope_factor} and {original_context} need {rope_scaling}")
        if self.original_context is not None and self.original_context < 1:
            raise OptionError("{original_context} must be at least 1, got {value}", value=self.original_context)


@dataclass
class ChatTrainOptions(TrainOptions):
    """What the methods trained on conversations (sft, align) add: the template, its system prompt, and bad records."""

    template: str = option("alpaca", help="Chat template the samples are rendered with (auto: the tokenizer's own; align: the one sft trained "
                           "with); recorded in the adapter's tokenizer.", panel=DATA, choices=TEMPLATE_NAMES)
    system: Optional[str] = option(None, help="System prompt replacing the template's default.", panel=DATA)
    skip_invalid: bool = option(False, help="Skip malformed records (counted) instead of stopping at the first.", panel=DATA)
