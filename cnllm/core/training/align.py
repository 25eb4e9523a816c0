"""``cnllm align``: preference optimisation through TRL, on the training core pt and sft share.

The run (model loading, LoRA, checkpoints, resume, distributed engines, metrics) is the one of
:mod:`cnllm.core.training.trainer`; this module supplies what differs: TRL's configuration
(``DPOConfig`` with the method's ``loss_type``, or ORPO's), its trainer, and the tokenised pairs
(:mod:`cnllm.core.training.preference`, rendered with the sft template so the prompt is laid out as sft
trained it). With LoRA no reference model is loaded: TRL scores the reference by disabling the
adapter (and keeps a frozen copy of a continued ``--peft-path`` adapter for it).
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

from cnllm.core.config import OptionError, option
from cnllm.core.progress import Progress
from cnllm.core.training.method import Data, TrainingMethod
from cnllm.core.training.options import DATA, OPTIM, ChatTrainOptions, learning_rate
from cnllm.core.training.sft import record_template


class PreferenceLoss(ABC):
    """A preference method of ``cnllm align --method``: TRL's config and trainer for it."""

    uses_reference = True  # scores a reference model (the base: the policy with its LoRA adapter disabled)

    @abstractmethod
    def config(self, common: dict):
        """TRL's config for the method from the shared Trainer arguments plus beta and the lengths."""

    @abstractmethod
    def trainer(self, *, model, args, train_dataset, eval_dataset, tokenizer, callbacks, peft_config):
        """TRL's trainer, fed the pairs already tokenised with the sft template."""


class DpoLoss(PreferenceLoss):
    """DPO and its relatives: TRL's DPOTrainer with its ``loss_type``."""

    def __init__(self, loss_type: str):
        self.loss_type = loss_type

    def config(self, common: dict):
        from trl import DPOConfig

        return DPOConfig(**common, loss_type=[self.loss_type], truncation_mode="keep_start", pad_to_multiple_of=None)

    def trainer(self, *, model, args, train_dataset, eval_dataset, tokenizer, callbacks, peft_config):
        from trl import DPOTrainer

        class PretokenizedDPOTrainer(DPOTrainer):
            def _prepare_dataset(self, dataset, processing_class, args, dataset_name):
                return dataset  # already prompt_ids / chosen_ids / rejected_ids

        return PretokenizedDPOTrainer(model=model, ref_model=None, args=args, train_dataset=train_dataset, eval_dataset=eval_dataset,
                                      processing_class=tokenizer, callbacks=callbacks, peft_config=peft_config)


class OrpoLoss(PreferenceLoss):
    """ORPO: the odds ratio against the rejected answer, added to the sft loss; no reference model."""

    uses_reference = False

    def config(self, common: dict):
        import os

        os.environ.setdefault("TRL_EXPERIMENTAL_SILENCE", "1")  # ORPO lives in trl.experimental in TRL 1.x
        from trl.experimental.orpo import ORPOConfig

        return ORPOConfig(**common)

    def trainer(self, *, model, args, train_dataset, eval_dataset, tokenizer, callbacks, peft_config):
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


# cnllm align --method: TRL's DPOTrainer loss_type for each DPO-family name; ORPO has its own trainer (no reference).
PREFERENCE_LOSSES: dict[str, PreferenceLoss] = {
    **{name: DpoLoss(loss) for name, loss in {"dpo": "sigmoid", "ipo": "ipo", "hinge": "hinge", "robust": "robust", "dpo-norm": "sigmoid_norm",
                                               "bco": "bco_pair", "nca": "nca_pair", "sppo": "sppo_hard", "apo-zero": "apo_zero",
                                               "apo-down": "apo_down"}.items()},
    "orpo": OrpoLoss(),
}
ALIGN_METHODS = tuple(PREFERENCE_LOSSES)


@dataclass
class AlignOptions(ChatTrainOptions):
    method: str = option("dpo", help="Preference loss: dpo (sigmoid), ipo, hinge, robust, dpo-norm, bco, nca, sppo, apo-zero, apo-down "
                         "(TRL's DPO losses) or orpo (no reference model).", panel=OPTIM, choices=ALIGN_METHODS)
    beta: float = option(0.1, help="Strength of the pull towards the reference model (DPO family); ORPO's odds-ratio weight.", panel=OPTIM)
    max_length: int = option(1024, help="Longest prompt + answer in tokens (answers are cut, counted).", panel=DATA)
    max_prompt_length: Optional[int] = option(None, help="Longest prompt in tokens (its beginning is cut, counted; default: half of "
                                              "--max-length).", panel=DATA)
    cache_dir: Optional[Path] = option(None, help="Where tokenised pairs are cached (default: ~/.cache/cnllm/preference).", panel=DATA)
    learning_rate: float = learning_rate(5e-5)

    @property
    def prompt_length(self) -> int:
        """The longest prompt align keeps: ``max_prompt_length``, by default half of ``max_length``."""
        return self.max_prompt_length if self.max_prompt_length is not None else max(1, self.max_length // 2)

    @property
    def loss(self) -> PreferenceLoss:
        return PREFERENCE_LOSSES[self.method]

    def validate(self) -> None:
        super().validate()
        if self.beta <= 0:
            raise OptionError("{beta} must be positive, got {value}", value=self.beta)
        if self.max_length < 1:
            raise OptionError("{max_length} must be at least 1, got {value}", value=self.max_length)
        if self.max_prompt_length is not None and not 1 <= self.max_prompt_length < self.max_length:
            raise OptionError("{max_prompt_length} ({value}) must be at least 1 and below {max_length} ({limit})",
                              value=self.max_prompt_length, limit=self.max_length)


class Align(TrainingMethod):
    """Preference pairs through TRL; ``--method`` picks the loss (:data:`PREFERENCE_LOSSES`)."""

    name = "align"
    options_type = AlignOptions
    reports_perplexity = False

    def prepare_tokenizer(self, tokenizer, options) -> None:
        record_template(tokenizer, options)

    def arguments(self, options, arguments: dict):
        import warnings

        # TRL's configs still carry transformers' old name for activation checkpointing; cnllm enables it itself.
        warnings.filterwarnings("ignore", message=".*`gradient_checkpointing` is deprecated.*", category=FutureWarning)
        return options.loss.config(dict(arguments, beta=options.beta, max_length=options.max_length, gradient_checkpointing=False,
                                        disable_dropout=True, dataset_num_proc=None))

    def adapter_for_trainer(self, options) -> bool:
        """A new adapter for a reference-based loss goes to TRL as a config: TRL then scores the reference by
        disabling it (a wrapped model would make it keep a frozen copy of the adapter as well)."""
        return options.loss.uses_reference and options.peft_path is None and not (options.load_in_4bit or options.load_in_8bit)

    def trainer(self, options, *, model, args, data: Data, tokenizer, callbacks, peft_config):
        if tokenizer.pad_token is None:
            tokenizer.pad_token = tokenizer.eos_token
        return options.loss.trainer(model=model, args=args, train_dataset=data.train, eval_dataset=data.eval, tokenizer=tokenizer,
                                    callbacks=callbacks, peft_config=peft_config)

    def figures(self, document: dict) -> dict:
        return {key: {"before": document[f"{key}_before"], "after": document[key]} for key in ("reward_accuracy", "reward_margin")}

    def build_data(self, plan, tokenizer, progress: Progress) -> Data:
        """Tokenised pairs (cached), held-out pairs and the summary; TRL brings its own collator."""
        from cnllm.core.training.preference import build_preference_data

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
        return Data(built.train, built.eval, None, summary)


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


ALIGN = Align()
