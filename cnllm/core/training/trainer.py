"""One training core for ``cnllm pt``, ``cnllm sft`` and ``cnllm align``: Hugging Face ``Trainer`` + PEFT LoRA.

What differs between them is a :class:`~cnllm.core.training.method.TrainingMethod` (its options, data,
Trainer and figures; :data:`~cnllm.core.training.methods.METHODS`); the plan, the checks, the model, the
loop, checkpoints, resume and the output are this module's, shared.

The run trains inside a working directory beside the output (``.<name>.cnllm-training``) so
checkpoints survive an interruption and ``--resume`` can continue them; only a finished run is
renamed to the output name. Distributed runs (torchrun / accelerate launch, DDP, DeepSpeed, FSDP)
use the Trainer's own engines; only the main process writes.
"""

from __future__ import annotations

import json
import os
import shutil
import time
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from cnllm.core.atomic import check_not_input, check_output, replace_dir
from cnllm.core.config import OptionError, dump_yaml
from cnllm.core.errors import CheckFailed, Terminated, UsageError
from cnllm.core.modelio import (
    CONFIG_OVERRIDES_NAME,
    VocabSizes,
    adapter_config_overrides,
    adapter_vocab_rows,
    check_vocab_agreement,
    copy_missing_tokenizer_files,
    has_tokenizer,
    load_config,
    read_adapter_config,
    vocab_sizes,
)
from cnllm.core.progress import NULL_PROGRESS, Progress
from cnllm.core.provenance import write_record
from cnllm.core.tensors import read_safetensors_header
from cnllm.core.training.method import Data, TrainingMethod
from cnllm.core.training.methods import method_for
from cnllm.core.training.options import LR_SCHEDULERS, TrainOptions

VOCAB_MULTIPLE = 64
EMBEDDING_MODULES = ["embed_tokens", "lm_head"]
WORK_SUFFIX = ".cnllm-training"
CONFIG_NAME = "train-config.yaml"
METRICS_NAME = "metrics.jsonl"
LOSS_PNG = "loss.png"
ADAPTER_WEIGHTS = "adapter_model.safetensors"


@dataclass
class TrainResult:
    output: Path
    mode: str
    steps: int = 0
    train_loss: float | None = None
    eval_loss_before: float | None = None
    eval_loss: float | None = None
    perplexity_before: float | None = None
    perplexity: float | None = None
    reward_accuracy_before: float | None = None  # align: held-out pairs whose implicit reward ranks chosen first
    reward_accuracy: float | None = None
    reward_margin_before: float | None = None
    reward_margin: float | None = None
    tokens_per_second: float | None = None
    tokens_seen: int = 0
    train_cpu_seconds: float = 0.0
    trainable_parameters: int = 0
    total_parameters: int = 0
    vocab: dict[str, Any] = field(default_factory=dict)
    data: dict[str, Any] = field(default_factory=dict)
    resumed_from: str | None = None
    peak_memory_bytes: int = 0
    seconds: float = 0.0
    main_process: bool = True

    def to_dict(self) -> dict[str, Any]:
        return {k: (str(v) if isinstance(v, Path) else v) for k, v in self.__dict__.items() if k != "main_process"}


def work_dir_for(output: Path) -> Path:
    return output.parent / f".{output.name}{WORK_SUFFIX}"


def round_up(value: int, multiple: int) -> int:
    return -(-value // multiple) * multiple


def last_complete_checkpoint(directory: Path) -> Path | None:
    """The newest ``checkpoint-N`` whose trainer state was written (it is saved last, so the rest is there)."""
    candidates = []
    for item in directory.glob("checkpoint-*") if directory.is_dir() else []:
        suffix = item.name.rsplit("-", 1)[-1]
        if suffix.isdigit() and (item / "trainer_state.json").is_file():
            candidates.append((int(suffix), item))
    return max(candidates)[1] if candidates else None


def world_rank() -> int:
    return int(os.environ.get("RANK", "0"))


# ------------------------------------------------------------------------------- checks before work


def plan_output(options: TrainOptions) -> tuple[Path, bool]:
    """The working directory and whether an earlier run is continued; refuses to clobber anything."""
    output = options.output_dir
    check_not_input(output, [options.model, options.tokenizer, options.peft_path, options.deepspeed, *options.data, *options.validation_data])
    work = work_dir_for(output)
    if options.resume:
        if work.is_dir() or last_complete_checkpoint(output):
            return work, True
        raise OptionError("{resume}: nothing to resume, neither {work} nor {output} holds a checkpoint", work=work, output=output)
    if (output.exists() or output.is_symlink()) and not options.force:
        raise OptionError("output {path} already exists; pass {resume} to continue its training or {force} to start over", path=output)
    if work.exists() and not options.force:
        raise OptionError("an interrupted run left checkpoints in {work}; pass {resume} to continue it or {force} to start over", work=work)
    check_output(work, force=True)  # the folder must be writable before any data is tokenised
    return work, False


def check_vocabulary(model_dir: Path, tokenizer_dir: Path) -> VocabSizes:
    """Config, embedding and lm_head must agree; the tokenizer may be larger (we resize) but not smaller."""
    sizes = vocab_sizes(model_dir, tokenizer_dir)
    check_vocab_agreement(VocabSizes(None, sizes.config, sizes.embedding, sizes.lm_head), where=str(model_dir))
    rows = sizes.embedding if sizes.embedding is not None else sizes.config
    if sizes.tokenizer is not None and rows is not None and round_up(sizes.tokenizer, VOCAB_MULTIPLE) < rows:
        raise OptionError(
            "the tokenizer in {directory} has {tokens} tokens, fewer than the model's {rows} embedding rows "
            "({sizes}): pass the tokenizer the model was trained with ({tokenizer})",
            directory=tokenizer_dir, tokens=sizes.tokenizer, rows=rows, sizes=sizes.describe(),
        )
    return sizes


def linear_layer_names(model) -> list[str]:
    import torch

    return sorted({name.rsplit(".", 1)[-1] for name, module in model.named_modules() if isinstance(module, torch.nn.Linear)})


def check_lora_targets(model_dir: Path, targets: list[str], trust_remote_code: bool) -> None:
    """Every LoRA target must be a linear layer name of the model (built on the meta device: no weights read)."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    config = AutoConfig.from_pretrained(str(model_dir), trust_remote_code=trust_remote_code)
    with torch.device("meta"):
        skeleton = AutoModelForCausalLM.from_config(config, trust_remote_code=trust_remote_code)
    names = linear_layer_names(skeleton)
    missing = [t for t in targets if t not in names]
    if missing:
        raise UsageError(f"LoRA target {', '.join(missing)} is not a linear layer of the model; its linear layers are: {', '.join(names)}")


def check_quantization(options: TrainOptions) -> None:
    if not (options.load_in_4bit or options.load_in_8bit):
        return
    import importlib.util

    import torch

    flag = "{load_in_4bit}" if options.load_in_4bit else "{load_in_8bit}"
    if not torch.cuda.is_available():
        raise OptionError(flag + " (QLoRA) needs a CUDA GPU and none is available here; drop it to train unquantised")
    if importlib.util.find_spec("bitsandbytes") is None:
        raise OptionError(flag + " (QLoRA) needs bitsandbytes: pip install bitsandbytes")


def check_optional_packages(options: TrainOptions) -> None:
    import importlib.util

    if options.deepspeed is not None and importlib.util.find_spec("deepspeed") is None:
        raise OptionError("{deepspeed} needs the deepspeed package: pip install deepspeed")
    if options.tensorboard and not any(importlib.util.find_spec(n) for n in ("tensorboard", "tensorboardX")):
        raise OptionError("{tensorboard} needs the tensorboard package: pip install tensorboard")


def choose_precision(requested: str) -> str:
    import torch

    if requested == "auto":
        if torch.cuda.is_available():
            return "bf16" if torch.cuda.is_bf16_supported() else "fp16"
        return "fp32"
    if requested == "fp16" and not torch.cuda.is_available():
        raise OptionError("{precision} fp16 needs a CUDA GPU; use fp32 (or bf16) on this machine")
    return requested


# ------------------------------------------------------------------------------------ model setup


def load_model(options: TrainOptions, precision: str, config_overrides: dict | None = None):
    """The base through the one loader, left for the Trainer to place. LoRA freezes the base: keep it in half
    precision on a GPU; full fine-tuning keeps fp32 master weights; 4/8-bit computes in the half type."""
    import torch

    from cnllm.core.modelio import load_causal_lm

    half = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(precision)
    quantized = options.load_in_4bit or options.load_in_8bit
    dtype = (half or torch.float32) if quantized else half if (half is not None and not options.full_finetune) else torch.float32
    return load_causal_lm(
        options.model_dir,
        place=False,
        dtype=dtype,
        load_in_4bit=options.load_in_4bit,
        load_in_8bit=options.load_in_8bit,
        trust_remote_code=options.trust_remote_code,
        attn_implementation=options.attn_implementation,
        config_overrides=config_overrides,
    )


def lora_config(options: TrainOptions, train_embeddings: bool):
    from peft import LoraConfig

    return LoraConfig(
        task_type="CAUSAL_LM",
        r=options.lora_rank,
        lora_alpha=options.lora_alpha,  # type: ignore[arg-type]  # PEFT annotates an int; the scale alpha / r takes any number
        lora_dropout=options.lora_dropout,
        target_modules=list(options.lora_targets),
        modules_to_save=list(EMBEDDING_MODULES) if train_embeddings else None,
    )


def apply_peft(model, options: TrainOptions, train_embeddings: bool, precision: str):
    from peft import PeftModel, get_peft_model, prepare_model_for_kbit_training

    if options.load_in_4bit or options.load_in_8bit:
        model = prepare_model_for_kbit_training(model, use_gradient_checkpointing=options.gradient_checkpointing)
    if options.peft_path is not None:
        model = PeftModel.from_pretrained(model, str(options.peft_path), is_trainable=True)
    else:
        model = get_peft_model(model, lora_config(options, train_embeddings))
    trained_weights_fp32(model, precision)
    return model


def trained_weights_fp32(model, precision: str) -> None:
    """Trained weights stay fp32 (the optimizer and the fp16 grad scaler need it); autocast does the rest."""
    import torch

    if precision in ("fp16", "bf16"):
        for parameter in model.parameters():
            if parameter.requires_grad and parameter.dtype != torch.float32:
                parameter.data = parameter.data.float()


def enable_activation_checkpointing(model) -> None:
    """Recompute activations in the backward pass (transformers 5 name first, the older alias otherwise)."""
    enable = getattr(model, "activation_checkpointing_enable", None)
    if enable is not None:
        enable(activation_checkpointing_kwargs={"use_reentrant": False})
    else:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})


def count_parameters(model) -> tuple[int, int]:
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    return trainable, sum(p.numel() for p in model.parameters())


def verify_adapter(directory: Path, targets: list[str], train_embeddings: bool) -> dict[str, Any]:
    """The saved adapter must hold the trained tensors: LoRA A/B for each target, full embedding/lm_head if trained."""
    weights = directory / ADAPTER_WEIGHTS
    if not weights.is_file():
        raise CheckFailed(f"training finished but no {ADAPTER_WEIGHTS} was written to {directory}")
    names = [n for n in read_safetensors_header(weights) if n != "__metadata__"]
    missing = [t for t in targets if not any(f".{t}.lora_A" in n for n in names) or not any(f".{t}.lora_B" in n for n in names)]
    if train_embeddings:
        missing += [m for m in EMBEDDING_MODULES if not any(f"{m}.weight" in n and "lora" not in n for n in names)]
    if missing:
        raise CheckFailed(f"the saved adapter {weights} lacks the trained tensors of {', '.join(missing)} ({len(names)} tensors, {weights.stat().st_size} bytes)")
    return {"tensors": len(names), "bytes": weights.stat().st_size}


# ---------------------------------------------------------------------------------------- the run


def training_arguments(plan: Plan, has_eval: bool):
    import torch

    options, precision = plan.options, plan.precision

    distributed = int(os.environ.get("WORLD_SIZE", "1")) > 1
    arguments = dict(
        output_dir=str(plan.work),
        per_device_train_batch_size=options.batch_size,
        per_device_eval_batch_size=options.batch_size,
        gradient_accumulation_steps=options.gradient_accumulation_steps,
        num_train_epochs=options.epochs,
        max_steps=options.max_steps,
        learning_rate=options.learning_rate,
        lr_scheduler_type=LR_SCHEDULERS[options.lr_scheduler],
        warmup_steps=options.warmup_ratio,
        weight_decay=options.weight_decay,
        max_grad_norm=options.max_grad_norm,
        seed=options.seed,
        data_seed=options.seed,
        bf16=precision == "bf16",
        fp16=precision == "fp16",
        use_cpu=not torch.cuda.is_available(),
        logging_steps=options.logging_steps,
        logging_first_step=True,
        logging_nan_inf_filter=False,  # a NaN loss must show, for StopOnNonFinite to stop the run
        include_num_input_tokens_seen=plan.method.counts_tokens,
        eval_strategy="steps" if has_eval else "no",
        eval_steps=options.eval_steps or options.save_steps,
        save_strategy="steps",
        save_steps=options.save_steps,
        save_total_limit=options.save_total_limit,
        report_to=["tensorboard"] if options.tensorboard else [],
        disable_tqdm=True,
        remove_unused_columns=False,
        dataloader_num_workers=0,
        ddp_backend="gloo" if distributed and not torch.cuda.is_available() else None,
        ddp_find_unused_parameters=False if distributed else None,
        deepspeed=str(options.deepspeed) if options.deepspeed else None,
        fsdp=options.fsdp or "",
        log_level="error",
        log_level_replica="error",
    )
    return plan.method.arguments(options, arguments)


@dataclass
class Plan:
    """Everything checked before any work: what to train on, with which tokenizer, where, how."""

    method: TrainingMethod
    options: TrainOptions  # the method's own subclass
    work: Path
    resuming: bool
    train_files: list[Path]
    validation_files: list[Path]
    tokenizer_dir: Path
    sizes: VocabSizes
    precision: str
    train_embeddings: bool
    config_overrides: dict = field(default_factory=dict)  # long-context rope scaling written into the model config


def plan_run(options: TrainOptions) -> Plan:
    """Every usage check, cheapest first; raises UsageError before anything is loaded or written."""
    from cnllm.core.training.data import check_data_files

    method = method_for(options)
    options.validate()
    work, resuming = plan_output(options)
    train_files = check_data_files(options.data)
    validation_files = check_data_files(options.validation_data, what="validation data") if options.validation_data else []
    load_config(options.model_dir)
    tokenizer_dir = options.tokenizer
    if tokenizer_dir is None:
        tokenizer_dir = options.peft_path if options.peft_path is not None and has_tokenizer(options.peft_path) else options.model_dir
    if not has_tokenizer(tokenizer_dir):
        raise OptionError("{directory} has no tokenizer (tokenizer.json or tokenizer.model); pass {tokenizer}", directory=tokenizer_dir)
    sizes = check_vocabulary(options.model_dir, tokenizer_dir)
    if options.peft_path is None and not options.full_finetune:
        check_lora_targets(options.model_dir, options.lora_targets, options.trust_remote_code)
    check_quantization(options)
    check_optional_packages(options)
    overrides = {}
    if options.rope_scaling is not None and options.rope_factor is not None:  # validate() requires the factor with a scaling
        from cnllm.core.rope import training_overrides

        overrides = training_overrides(options.rope_scaling, options.rope_factor, load_config(options.model_dir), options.original_context)
    elif options.peft_path is not None:
        overrides = adapter_config_overrides(options.peft_path)  # continuing a long-context adapter keeps its scaling
    if options.attn_implementation is not None:
        from cnllm.core.modelio import check_attn_implementation

        check_attn_implementation(options.attn_implementation)
    precision = choose_precision(options.precision_short)
    rows = sizes.embedding if sizes.embedding is not None else sizes.config
    needs_resize = sizes.tokenizer is not None and rows is not None and sizes.tokenizer > rows
    if options.peft_path is not None:
        read_adapter_config(options.peft_path)  # a config that is not an object is refused here, not deep inside PEFT
        adapter_rows = adapter_vocab_rows(options.peft_path)
        expected = round_up(sizes.tokenizer, VOCAB_MULTIPLE) if needs_resize and sizes.tokenizer is not None else rows
        if adapter_rows is not None and adapter_rows != expected:
            raise OptionError(
                "the adapter {adapter} has {adapter_rows} embedding rows but the model with tokenizer {directory} "
                "has {expected}: pass the {tokenizer} the adapter was trained with",
                adapter=options.peft_path, adapter_rows=adapter_rows, directory=tokenizer_dir, expected=expected,
            )
    train_embeddings = options.train_embeddings if options.train_embeddings is not None else needs_resize
    return Plan(method, options, work, resuming, train_files, validation_files, Path(tokenizer_dir), sizes, precision, train_embeddings, overrides)


def run_training(options: TrainOptions, progress: Progress = NULL_PROGRESS) -> TrainResult:
    """Check everything, then train the method ``options`` belong to (a PtOptions trains pt); returns the
    figures (``main_process`` False on the other ranks)."""
    from transformers import AutoTokenizer

    from cnllm.core.runtime import quiet_libraries

    started = time.monotonic()
    quiet_libraries()
    warnings.filterwarnings("ignore", message=".*is_gradient_checkpointing.*", category=FutureWarning)
    warnings.filterwarnings("ignore", message=".*save_embedding_layers.*")  # PEFT noting the resize we did on purpose
    warnings.filterwarnings("ignore", message=".*ensure_weight_tying.*")  # tied embeddings trained apart: merge-lora unties them
    plan = plan_run(options)
    result = TrainResult(output=options.output_dir, mode=plan.method.name, main_process=world_rank() == 0)
    tokenizer = AutoTokenizer.from_pretrained(str(plan.tokenizer_dir), trust_remote_code=options.trust_remote_code)
    base_tokenizer = None
    if plan.tokenizer_dir.resolve() != Path(options.model_dir).resolve():  # another tokenizer: new rows decompose with the model's own
        from cnllm.core.embeddings import check_extends, load_base_tokenizer

        base_tokenizer = load_base_tokenizer(options.model_dir, options.new_row_init, trust_remote_code=options.trust_remote_code)
        if base_tokenizer is not None:
            check_extends(base_tokenizer, tokenizer, base_name=str(options.model_dir), name=str(plan.tokenizer_dir))
    plan.method.prepare_tokenizer(tokenizer, options)
    # Arguments first: they join the process group, so the main process can build the data cache before the others.
    args = training_arguments(plan, has_eval=False)
    main = args.process_index == 0
    with args.main_process_first(desc="prepare the data and the working directory"):
        data = plan.method.build_data(plan, tokenizer, progress)
        result.data = data.summary
        if main:
            _prepare_work_dir(plan, progress)
    try:
        _train(plan, result, tokenizer, base_tokenizer, data, progress)
    except BaseException:
        if main and plan.work.is_dir() and last_complete_checkpoint(plan.work) is None:
            shutil.rmtree(plan.work, ignore_errors=True)  # nothing worth resuming: leave no trace
        raise
    result.seconds = round(time.monotonic() - started, 2)
    if main:
        _finish_output(plan, result)
    return result


def _train(plan: Plan, result: TrainResult, tokenizer, base_tokenizer, data: Data, progress: Progress) -> None:
    from transformers import set_seed
    from transformers.trainer_callback import PrinterCallback, ProgressCallback

    from cnllm.core.embeddings import resize_and_fill
    from cnllm.core.training.callbacks import StopOnNonFinite, TrainingMonitor, perplexity, read_metrics, truncate_metrics

    options, work = plan.options, plan.work
    args = training_arguments(plan, has_eval=data.eval is not None)
    main = args.process_index == 0
    keep_freed_tensor_memory()
    set_seed(options.seed)  # LoRA and resized rows are initialised before the Trainer seeds anything
    model = load_model(options, plan.precision, plan.config_overrides)
    if plan.config_overrides:
        rope = plan.config_overrides["rope_parameters"]
        progress.log(f"rope scaling {rope['rope_type']} × {rope['factor']}: max_position_embeddings {plan.config_overrides['max_position_embeddings']}")
    old_rows, new_rows, new_tokens = resize_and_fill(model, tokenizer, base_tokenizer, options.new_row_init, multiple=VOCAB_MULTIPLE,
                                                     base_name=str(options.model_dir), name=str(plan.tokenizer_dir))
    result.vocab = {"tokenizer": len(tokenizer), "config": plan.sizes.config, "embedding_rows_before": old_rows,
                    "embedding_rows": new_rows, "resized": new_rows != old_rows, "train_embeddings": plan.train_embeddings}
    if new_tokens is not None:
        result.vocab.update(new_row_init=options.new_row_init, new_rows=new_tokens.to_dict())
        progress.log(f"{new_tokens.added} new tokens: embedding rows {old_rows} → {new_rows}, initialised by {options.new_row_init}")
        if not plan.train_embeddings and not options.full_finetune:
            progress.log("warning: the new embedding rows stay as initialised; pass --train-embeddings to learn them")
    model.config.use_cache = False
    peft_config = None
    if options.full_finetune:
        for parameter in model.parameters():
            parameter.requires_grad_(True)
    elif plan.method.adapter_for_trainer(options):
        peft_config = lora_config(options, plan.train_embeddings)
        for parameter in model.parameters():
            parameter.requires_grad_(False)
    else:
        model = apply_peft(model, options, plan.train_embeddings, plan.precision)
    if options.gradient_checkpointing:
        enable_activation_checkpointing(model)
        if not options.full_finetune and not plan.train_embeddings:
            model.enable_input_require_grads()
    metrics_path = work / METRICS_NAME
    monitor = TrainingMonitor(progress, metrics_path)
    trainer = plan.method.trainer(options, model=model, args=args, data=data, tokenizer=tokenizer, callbacks=[monitor, StopOnNonFinite()],
                                  peft_config=peft_config)
    if peft_config is not None:
        trained_weights_fp32(trainer.model, plan.precision)  # the Trainer added the adapter; the optimizer is made later, in train()
    result.trainable_parameters, result.total_parameters = count_parameters(trainer.model)
    progress.log(f"training {result.trainable_parameters:,} of {result.total_parameters:,} parameters ({plan.precision}, {plan.method.name})")
    trainer.remove_callback(PrinterCallback)
    trainer.remove_callback(ProgressCallback)

    checkpoint = last_complete_checkpoint(work) if plan.resuming else None
    if checkpoint is not None:
        result.resumed_from = checkpoint.name
        if main:
            truncate_metrics(metrics_path, json.loads((checkpoint / "trainer_state.json").read_text(encoding="utf-8"))["global_step"])
        progress.log(f"resuming from {checkpoint}")
    elif data.eval is not None and options.eval_before:
        trainer.evaluate()
    before = [r for r in read_metrics(metrics_path) if r.get("step") == 0 and "eval_loss" in r] if main else []
    if before:
        result.eval_loss_before, result.perplexity_before = before[0]["eval_loss"], before[0].get("perplexity")
        result.reward_accuracy_before, result.reward_margin_before = before[0].get("reward_accuracy"), before[0].get("reward_margin")

    tokens_at_start = _checkpoint_tokens(checkpoint)
    cpu_at_start = time.process_time()
    try:
        output = trainer.train(resume_from_checkpoint=str(checkpoint) if checkpoint else None)
    except (KeyboardInterrupt, Terminated):
        if last_complete_checkpoint(work) is not None:
            progress.log(f"checkpoints are in {work}: rerun with --resume to continue")
        raise
    result.train_cpu_seconds = round(time.process_time() - cpu_at_start, 2)
    result.steps = trainer.state.global_step
    result.tokens_seen = int(trainer.state.num_input_tokens_seen)
    losses = [h["loss"] for h in trainer.state.log_history if "loss" in h]
    result.train_loss = losses[-1] if losses else output.training_loss
    runtime = output.metrics.get("train_runtime") or 0.0
    result.tokens_per_second = round((result.tokens_seen - tokens_at_start) / runtime, 1) if runtime > 0 else None
    if data.eval is not None:
        evals = [h for h in trainer.state.log_history if "eval_loss" in h and h.get("step") == result.steps]
        final = evals[-1] if evals else trainer.evaluate()
        result.eval_loss = float(final["eval_loss"])
        result.perplexity = perplexity(result.eval_loss) if plan.method.reports_perplexity else None
        if "eval_rewards/accuracies" in final:
            result.reward_accuracy, result.reward_margin = float(final["eval_rewards/accuracies"]), float(final["eval_rewards/margins"])
    trainer.save_model(str(work))
    if main:
        copy_missing_tokenizer_files(plan.tokenizer_dir, work)
        if plan.config_overrides and not options.full_finetune:  # a full model's config.json already says it
            (work / CONFIG_OVERRIDES_NAME).write_text(json.dumps(plan.config_overrides, indent=2) + "\n", encoding="utf-8")
        (work / "training_args.bin").unlink(missing_ok=True)  # a pickle; train-config.yaml says the same in YAML
    result.peak_memory_bytes = peak_memory_bytes()


def _checkpoint_tokens(checkpoint: Path | None) -> int:
    if checkpoint is None:
        return 0
    return int(json.loads((checkpoint / "trainer_state.json").read_text(encoding="utf-8")).get("num_input_tokens_seen", 0))


# glibc's own ceiling for its adaptive mmap threshold (64-bit), and the trim threshold it pairs with it.
MALLOC_MMAP_THRESHOLD = 32 << 20
MALLOC_TRIM_THRESHOLD = 2 * MALLOC_MMAP_THRESHOLD
M_TRIM_THRESHOLD, M_MMAP_THRESHOLD = -1, -3  # mallopt() parameters from glibc's malloc.h
MALLOC_ENVIRONMENT = ("MALLOC_MMAP_THRESHOLD_", "MALLOC_TRIM_THRESHOLD_")


def keep_freed_tensor_memory() -> bool:
    """Let glibc reuse the memory of freed CPU tensors instead of handing it back to the OS every step.

    Each training step frees and reallocates the same few-MiB activations. glibc's adaptive
    thresholds depend on what the process happened to free before training, and with low ones
    every step unmaps that memory and faults it in again, zero-filled (measured: 3x the page faults
    and ~5% of the step time of the same loop in a process whose thresholds had grown). Fixing them
    at glibc's own ceiling makes the speed independent of that history. A no-op off glibc and when
    the user tunes malloc through the environment. Returns whether the thresholds were set.
    """
    import ctypes
    import ctypes.util
    import platform

    if platform.system() != "Linux" or platform.libc_ver()[0] != "glibc":
        return False
    if any(name in os.environ for name in MALLOC_ENVIRONMENT) or "glibc.malloc." in os.environ.get("GLIBC_TUNABLES", ""):
        return False
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
    except OSError:
        return False
    return bool(libc.mallopt(M_MMAP_THRESHOLD, MALLOC_MMAP_THRESHOLD)) and bool(libc.mallopt(M_TRIM_THRESHOLD, MALLOC_TRIM_THRESHOLD))


def peak_memory_bytes() -> int:
    import resource

    import torch

    if torch.cuda.is_available():
        return int(torch.cuda.max_memory_allocated())
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def _prepare_work_dir(plan: Plan, progress: Progress) -> None:
    """Start fresh (``--force``), continue the working directory, or move a finished output back to continue it."""
    work = plan.work
    if not plan.resuming:
        if work.exists():
            shutil.rmtree(work)
        work.mkdir(parents=True)
    elif not work.exists():
        os.replace(plan.options.output_dir, work)
        progress.log(f"continuing the finished run in {plan.options.output_dir}")
    elif last_complete_checkpoint(work) is None:
        shutil.rmtree(work)  # killed before its first checkpoint: start again
        work.mkdir()


def _finish_output(plan: Plan, result: TrainResult) -> None:
    """Verify the adapter, add curve, config and provenance, then rename the working directory to the output."""
    from cnllm.core.training.callbacks import plot_loss_curve

    options, work, mode = plan.options, plan.work, plan.method.name
    if not options.full_finetune:
        targets = [] if options.peft_path else list(options.lora_targets)
        result.data["adapter"] = verify_adapter(work, targets, plan.train_embeddings and not options.peft_path)
    plot_loss_curve(work / METRICS_NAME, work / LOSS_PNG, f"cnllm {mode}: {options.model_dir.name}")
    (work / CONFIG_NAME).write_text(dump_yaml(options.to_dict()), encoding="utf-8")
    inputs = [*plan.train_files, *plan.validation_files, options.model_dir / "config.json"]
    write_record(work, "train", inputs=inputs, options={"mode": mode, **options.to_dict()}, results=result.to_dict())
    replace_dir(work, options.output_dir, force=True)  # plan_output refused an existing output without --force/--resume
