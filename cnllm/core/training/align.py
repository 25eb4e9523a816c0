"""``cnllm align``: preference optimisation through TRL, on the training core pt and sft share.

The run (model loading, LoRA, checkpoints, resume, distributed engines, metrics) is the one of
:mod:`cnllm.core.training.trainer`; this module supplies what differs: TRL's configuration
(``DPOConfig`` with the method's ``loss_type``, or ORPO's), its trainer, and the tokenised pairs
(:mod:`cnllm.core.preference`, rendered with the sft template so the prompt is laid out as sft
trained it). With LoRA no reference model is loaded: TRL scores the reference by disabling the
adapter (and keeps a frozen copy of a continued ``--peft-path`` adapter for it).
"""

from __future__ import annotations

from typing import Any

from cnllm.core.progress import Progress
from cnllm.core.training.options import ALIGN_LOSSES

def preference_arguments(options, arguments: dict[str, Any]):
    """TRL's config for the method: the shared Trainer arguments plus beta and the lengths."""
    import warnings

    # TRL's configs still carry transformers' old name for activation checkpointing; cnllm enables it itself.
    warnings.filterwarnings("ignore", message=".*`gradient_checkpointing` is deprecated.*", category=FutureWarning)
    common = dict(arguments, beta=options.beta, max_length=options.max_length, gradient_checkpointing=False,
                  disable_dropout=True, dataset_num_proc=None)
    if options.method == "orpo":
        import os

        os.environ.setdefault("TRL_EXPERIMENTAL_SILENCE", "1")  # ORPO lives in trl.experimental in TRL 1.x
        from trl.experimental.orpo import ORPOConfig

        return ORPOConfig(**common)
    from trl import DPOConfig

    return DPOConfig(**common, loss_type=[ALIGN_LOSSES[options.method]], truncation_mode="keep_start", pad_to_multiple_of=None)


def build_align_data(plan, tokenizer, progress: Progress):
    """Tokenised pairs (cached), held-out pairs and the summary; TRL brings its own collator."""
    from cnllm.core.preference import build_preference_data

    options = plan.options
    built = build_preference_data(
        plan.train_files,
        tokenizer,
        template=options.template,
        system=options.system,
        max_length=options.max_length,
        max_prompt_length=options.prompt_length,
        validation_files=plan.validation_files,
        validation_split=options.validation_split,
        skip_invalid=options.skip_invalid,
        seed=options.seed,
        cache_dir=options.cache_dir,
    )
    stats = built.stats
    if built.skipped:
        progress.log(f"warning: skipped {len(built.skipped)} invalid records (first: {built.skipped[0]})")
    if stats.truncated_prompts:
        progress.log(f"warning: {stats.truncated_prompts} prompts were longer than --max-prompt-length {options.prompt_length} and lost their beginning")
    if stats.truncated_answers:
        progress.log(f"warning: {stats.truncated_answers} pairs had answers cut to fit --max-length {options.max_length}")
    if stats.dropped_no_answer:
        progress.log(f"warning: dropped {stats.dropped_no_answer} pairs whose prompt leaves no room for an answer")
    progress.log(f"{'reused' if built.cache_hit else 'built'} {stats.pairs} training and {stats.eval_pairs} held-out pairs ({built.cache_path})")
    summary = {
        "pairs": stats.pairs,
        "eval_pairs": stats.eval_pairs,
        "skipped_invalid": stats.skipped_invalid,
        "truncated_prompts": stats.truncated_prompts,
        "truncated_answers": stats.truncated_answers,
        "dropped_no_answer": stats.dropped_no_answer,
        "total_tokens": stats.total_tokens,
        "template": options.template,
        "method": options.method,
        "beta": options.beta,
        "cache": str(built.cache_path),
        "cache_hit": built.cache_hit,
    }
    return built.train, built.eval, None, summary


def preference_trainer(options, *, model, args, train_dataset, eval_dataset, tokenizer, callbacks, peft_config=None):
    """TRL's trainer for the method, fed the pairs already tokenised with the sft template. ``peft_config``:
    a new adapter TRL adds, so the reference is the model with it disabled (no copy of anything)."""
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    if options.method == "orpo":
        from trl.experimental.orpo import ORPOTrainer

        class PretokenizedORPOTrainer(ORPOTrainer):
            def __init__(self, **kwargs):
                super().__init__(**kwargs)
                collate = self.data_collator
                self.data_collator = lambda features: with_token_count(collate(features))

            def tokenize_row(self, feature, model=None):
                return orpo_row(feature)

        return PretokenizedORPOTrainer(model=model, args=args, train_dataset=train_dataset, eval_dataset=eval_dataset,
                                       processing_class=tokenizer, callbacks=callbacks)
    from trl import DPOTrainer

    class PretokenizedDPOTrainer(DPOTrainer):
        def _prepare_dataset(self, dataset, processing_class, args, dataset_name):
            return dataset  # already prompt_ids / chosen_ids / rejected_ids

    return PretokenizedDPOTrainer(model=model, ref_model=None, args=args, train_dataset=train_dataset, eval_dataset=eval_dataset,
                                  processing_class=tokenizer, callbacks=callbacks, peft_config=peft_config)


def orpo_row(feature: dict) -> dict:
    """ORPO's columns from a tokenised pair: prompt, and prompt + answer with the prompt labelled -100."""
    from cnllm.core.training.data import IGNORE_INDEX

    prompt = list(feature["prompt_ids"])
    row = {"prompt_input_ids": prompt, "prompt_attention_mask": [1] * len(prompt)}
    for side in ("chosen", "rejected"):
        answer = list(feature[f"{side}_ids"])
        row[f"{side}_input_ids"] = prompt + answer
        row[f"{side}_attention_mask"] = [1] * (len(prompt) + len(answer))
        row[f"{side}_labels"] = [IGNORE_INDEX] * len(prompt) + answer
    return row


def with_token_count(batch: dict) -> dict:
    """ORPO's batches carry chosen_*/rejected_* keys only; the Trainer counts tokens from ``input_ids`` and
    ``attention_mask`` (tokens/s), which ORPO's loss ignores: give it both sides' masks."""
    import torch

    masks = [batch[f"{side}_attention_mask"].flatten() for side in ("chosen", "rejected")]
    batch["attention_mask"] = torch.cat(masks)
    batch["input_ids"] = batch["chosen_input_ids"]
    return batch
