"""Every option of a training run, in one dataclass: the CLI, ``--config`` files and the resolved
config written beside the adapter all use these names."""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional

from cnllm.core.config import coerce_fields
from cnllm.core.dtypes import FLOAT_DTYPES, DType, words_for
from cnllm.core.embeddings import DEFAULT_INIT, check_init_method
from cnllm.core.errors import UsageError

DEFAULT_LORA_TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
PRECISIONS = ("auto", *words_for(FLOAT_DTYPES))
PT_ONLY = ("block_size", "streaming", "cache_dir")
SFT_ONLY = ("template", "system", "max_seq_length", "packing", "skip_invalid")
ALIGN_ONLY = ("method", "beta", "max_length", "max_prompt_length")
# cnllm align --method: TRL's DPOTrainer loss_type for each DPO-family name; ORPO has its own trainer (no reference).
ALIGN_LOSSES = {"dpo": "sigmoid", "ipo": "ipo", "hinge": "hinge", "robust": "robust", "dpo-norm": "sigmoid_norm",
                "bco": "bco_pair", "nca": "nca_pair", "sppo": "sppo_hard", "apo-zero": "apo_zero", "apo-down": "apo_down"}
ALIGN_METHODS = (*ALIGN_LOSSES, "orpo")


@dataclass
class TrainOptions:
    # what to train, and where the result goes
    model: Optional[Path] = None
    data: list[Path] = field(default_factory=list)
    output: Optional[Path] = None
    tokenizer: Optional[Path] = None
    validation_data: list[Path] = field(default_factory=list)
    validation_split: float = 0.01
    # LoRA / full fine-tuning
    lora_rank: int = 64
    lora_alpha: float = 128.0
    lora_dropout: float = 0.05
    lora_targets: list[str] = field(default_factory=lambda: list(DEFAULT_LORA_TARGETS))
    train_embeddings: Optional[bool] = None
    new_row_init: str = DEFAULT_INIT  # how rows for tokens the tokenizer adds start (cnllm.core.embeddings)
    full_finetune: bool = False
    peft_path: Optional[Path] = None
    # optimisation
    learning_rate: float = 2e-4
    batch_size: int = 1
    gradient_accumulation_steps: int = 1
    epochs: float = 1.0
    max_steps: int = -1
    warmup_ratio: float = 0.03
    weight_decay: float = 0.0
    max_grad_norm: float = 1.0
    seed: int = 42
    precision: str = "auto"
    gradient_checkpointing: bool = False
    load_in_4bit: bool = False
    load_in_8bit: bool = False
    # checkpoints, logging, evaluation
    save_steps: int = 500
    save_total_limit: int = 3
    logging_steps: int = 10
    eval_steps: Optional[int] = None
    eval_before: bool = True
    tensorboard: bool = False
    resume: bool = False
    force: bool = False
    # distributed engines
    deepspeed: Optional[Path] = None
    fsdp: Optional[str] = None
    trust_remote_code: bool = False
    # long context
    rope_scaling: Optional[str] = None
    rope_factor: Optional[float] = None
    original_context: Optional[int] = None
    attn_implementation: Optional[str] = None
    # pt data
    block_size: int = 1024
    streaming: bool = False
    cache_dir: Optional[Path] = None
    # sft data
    template: str = "alpaca"
    system: Optional[str] = None
    max_seq_length: int = 1024
    packing: bool = False
    skip_invalid: bool = False
    # preference alignment (align; template, system and skip_invalid as sft)
    method: str = "dpo"
    beta: float = 0.1
    max_length: int = 1024
    max_prompt_length: Optional[int] = None  # None: half of max_length

    def __post_init__(self) -> None:
        coerce_fields(self)

    @property
    def prompt_length(self) -> int:
        """The longest prompt align keeps: ``max_prompt_length``, by default half of ``max_length``."""
        return self.max_prompt_length if self.max_prompt_length is not None else max(1, self.max_length // 2)

    @property
    def precision_short(self) -> str:
        """``auto``, or fp32/bf16/fp16 whichever word the user chose for it (``precision`` keeps the word)."""
        return "auto" if self.precision.lower() == "auto" else DType(self.precision, where="--precision").short

    def to_dict(self, mode: str | None = None) -> dict:
        """The options (those that matter to ``mode`` when given: pt has no template, sft no block size)."""
        skip = {"pt": SFT_ONLY + ALIGN_ONLY, "sft": PT_ONLY + ALIGN_ONLY,
                "align": ("block_size", "streaming", "max_seq_length", "packing")}.get(mode or "", ())
        return {f.name: getattr(self, f.name) for f in dataclasses.fields(self) if f.name not in skip}

    def validate(self, mode: str) -> None:
        """Option combinations that cannot work: one line each, before anything is loaded."""
        if self.model is None:
            raise UsageError("--model is required (on the command line or in --config)")
        if not self.data:
            raise UsageError("--data is required (on the command line or in --config)")
        if self.output is None:
            raise UsageError("--output is required (on the command line or in --config)")
        if self.precision.lower() not in PRECISIONS:
            raise UsageError(f"--precision {self.precision!r} is not one of {', '.join(PRECISIONS)}")
        check_init_method(self.new_row_init)
        if self.load_in_4bit and self.load_in_8bit:
            raise UsageError("choose one of --load-in-4bit and --load-in-8bit")
        if self.full_finetune and (self.peft_path or self.load_in_4bit or self.load_in_8bit):
            raise UsageError("--full-finetune trains every weight; it cannot be combined with --peft-path or --load-in-4bit/8bit")
        if not self.full_finetune and not self.lora_targets and not self.peft_path:
            raise UsageError("--lora-targets is empty: name at least one linear layer (or use --full-finetune)")
        if self.max_steps == 0 or self.max_steps < -1:
            raise UsageError(f"--max-steps must be at least 1, or -1 to train for --epochs; got {self.max_steps}")
        if not math.isfinite(self.epochs) or self.epochs <= 0:
            raise UsageError(f"--epochs must be a positive number, got {self.epochs}")
        if self.streaming and self.max_steps <= 0:
            raise UsageError("--streaming reads the data once as it goes and cannot count it: set --max-steps")
        for name, value, low, low_ok in (
            ("learning-rate", self.learning_rate, 0, False),
            ("lora-alpha", self.lora_alpha, 0, False),
            ("weight-decay", self.weight_decay, 0, True),
            ("max-grad-norm", self.max_grad_norm, 0, True),
        ):
            if not math.isfinite(value) or value < low or (value == low and not low_ok):
                raise UsageError(f"--{name} must be a finite number {'>=' if low_ok else '>'} {low}, got {value}")
        if not 0 <= self.lora_dropout < 1:
            raise UsageError(f"--lora-dropout must be in [0, 1), got {self.lora_dropout}")
        if not 0 <= self.warmup_ratio < 1:
            raise UsageError(f"--warmup-ratio must be in [0, 1), got {self.warmup_ratio}")
        if not 0 <= self.validation_split < 1:
            raise UsageError(f"--validation-split must be in [0, 1), got {self.validation_split}")
        positive = {"lora-rank": self.lora_rank, "batch-size": self.batch_size, "save-steps": self.save_steps,
                    "gradient-accumulation-steps": self.gradient_accumulation_steps, "logging-steps": self.logging_steps,
                    "block-size": self.block_size, "max-seq-length": self.max_seq_length, "save-total-limit": self.save_total_limit,
                    "eval-steps": 1 if self.eval_steps is None else self.eval_steps}
        for name, value in positive.items():
            if value < 1:
                raise UsageError(f"--{name} must be at least 1, got {value}")
        if self.deepspeed is not None and not self.deepspeed.is_file():
            raise UsageError(f"DeepSpeed config {self.deepspeed} does not exist")
        if self.peft_path is not None and not (self.peft_path / "adapter_config.json").is_file():
            raise UsageError(f"--peft-path {self.peft_path} is not a PEFT adapter directory (no adapter_config.json)")
        if self.rope_scaling is not None:
            from cnllm.core.rope import TRAINING_METHODS

            if self.rope_scaling not in TRAINING_METHODS:
                raise UsageError(f"--rope-scaling must be one of {', '.join(TRAINING_METHODS)}; got {self.rope_scaling!r}")
            if self.rope_factor is None or self.rope_factor <= 1:
                raise UsageError(f"--rope-scaling {self.rope_scaling} needs --rope-factor greater than 1 (e.g. 4 for 4K → 16K)")
        elif self.rope_factor is not None or self.original_context is not None:
            raise UsageError("--rope-factor and --original-context need --rope-scaling")
        if self.original_context is not None and self.original_context < 1:
            raise UsageError(f"--original-context must be at least 1, got {self.original_context}")
        if self.attn_implementation is not None:
            from cnllm.core.modelio import ATTN_IMPLEMENTATIONS

            if self.attn_implementation not in ATTN_IMPLEMENTATIONS:
                raise UsageError(f"--attn-implementation must be one of {', '.join(ATTN_IMPLEMENTATIONS)}; got {self.attn_implementation!r}")
        if mode in ("sft", "align") and self.streaming:
            raise UsageError(f"--streaming is for pt corpora; {mode} data is read into memory")
        if mode == "align":
            self.validate_align()

    def validate_align(self) -> None:
        if self.method not in ALIGN_METHODS:
            raise UsageError(f"--method {self.method!r} is not one of {', '.join(ALIGN_METHODS)}")
        if self.beta <= 0:
            raise UsageError(f"--beta must be positive, got {self.beta}")
        if self.max_prompt_length is not None and not 1 <= self.max_prompt_length < self.max_length:
            raise UsageError(f"--max-prompt-length ({self.max_prompt_length}) must be at least 1 and below --max-length ({self.max_length})")
