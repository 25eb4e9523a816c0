"""What a training method is to the shared run of :mod:`cnllm.core.training.trainer`.

The run (plan, checks, model loading, LoRA, checkpoints, resume, distributed engines, metrics, output) is
one; a method brings its options, its data, its Trainer and what it reports. A new method (KTO, SimPO,
GRPO) is one module with a :class:`TrainingMethod` and its options, registered in
:data:`cnllm.core.training.methods.METHODS`.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass
from typing import Any, Callable

from cnllm.core.progress import Progress


@dataclass
class Data:
    """What a method's data step hands the run: the sets, the batch collator (None: the Trainer's own) and a summary."""

    train: Any
    eval: Any  # None: no held-out data
    collator: Callable | None
    summary: dict


class TrainingMethod(ABC):
    """The defaults are those of plain causal-LM training on a Hugging Face ``Trainer`` (pt, sft)."""

    name: str  # the command and the pipeline step
    options_type: type  # its TrainOptions subclass
    counts_tokens = "non_padding"  # the Trainer's include_num_input_tokens_seen: what tokens/s counts
    reports_perplexity = True  # eval loss is a language-model loss (preference losses are not)

    @abstractmethod
    def build_data(self, plan, tokenizer, progress: Progress) -> Data:
        """The tokenised sets from ``plan.train_files`` and ``plan.validation_files``."""

    def prepare_tokenizer(self, tokenizer, options) -> None:  # noqa: B027 - an optional hook: pt records nothing
        """Whatever the method records in the tokenizer saved beside the adapter (sft's chat template)."""

    def arguments(self, options, arguments: dict):
        """The Trainer's configuration from the shared arguments."""
        from transformers import TrainingArguments

        return TrainingArguments(**arguments)

    def adapter_for_trainer(self, options) -> bool:
        """Whether a new LoRA adapter goes to the Trainer as a config instead of wrapping the model first."""
        return False

    def trainer(self, options, *, model, args, data: Data, tokenizer, callbacks, peft_config):
        from transformers import Trainer

        return Trainer(model=model, args=args, train_dataset=data.train, eval_dataset=data.eval, data_collator=data.collator,
                       processing_class=tokenizer, callbacks=callbacks)

    def figures(self, document: dict) -> dict:
        """The result's held-out figures for a pipeline report, before and after training."""
        return {"perplexity": {"before": document["perplexity_before"], "after": document["perplexity"]}}
