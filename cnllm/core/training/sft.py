"""``cnllm sft``: instruction tuning; the loss covers the assistant's answers only (:func:`cnllm.core.training.data.build_sft_data`)."""

from __future__ import annotations

from dataclasses import dataclass

from cnllm.core.config import OptionError, option
from cnllm.core.progress import Progress
from cnllm.core.training.method import Data, TrainingMethod
from cnllm.core.training.options import DATA, ChatTrainOptions, learning_rate


@dataclass
class SftOptions(ChatTrainOptions):
    max_seq_length: int = option(1024, help="Longer samples are truncated (and counted).", panel=DATA)
    packing: bool = option(False, help="Join whole samples into sequences of up to --max-seq-length tokens.", panel=DATA)
    learning_rate: float = learning_rate(1e-4)

    def validate(self) -> None:
        super().validate()
        if self.max_seq_length < 1:
            raise OptionError("{max_seq_length} must be at least 1, got {value}", value=self.max_seq_length)


class PaddingCollator:
    """SFT examples padded on the right: pad id for inputs, -100 for labels, a zero attention mask."""

    def __init__(self, pad_id: int):
        self.pad_id = pad_id

    def __call__(self, features: list[dict]) -> dict:
        import torch

        length = max(len(f["input_ids"]) for f in features)
        ids = torch.full((len(features), length), self.pad_id, dtype=torch.long)
        labels = torch.full((len(features), length), -100, dtype=torch.long)
        mask = torch.zeros((len(features), length), dtype=torch.long)
        for row, feature in enumerate(features):
            n = len(feature["input_ids"])
            ids[row, :n] = torch.tensor(feature["input_ids"])
            labels[row, :n] = torch.tensor(feature["labels"])
            mask[row, :n] = 1
        return {"input_ids": ids, "labels": labels, "attention_mask": mask}


def record_template(tokenizer, options: ChatTrainOptions) -> None:
    """The template travels with the model: the adapter's tokenizer (saved beside it, then copied by merge-lora
    into the merged model and by convert-gguf into ``tokenizer.chat_template``) carries the one sft trained with,
    as Jinja, so ``--template auto`` finds it. ``auto`` keeps the tokenizer's own template."""
    from cnllm.core.templates import TEMPLATES

    if options.template in TEMPLATES:
        tokenizer.chat_template = TEMPLATES[options.template].jinja(default_system=options.system)


class Sft(TrainingMethod):
    name = "sft"
    options_type = SftOptions

    def prepare_tokenizer(self, tokenizer, options) -> None:
        record_template(tokenizer, options)

    def build_data(self, plan, tokenizer, progress: Progress) -> Data:
        from cnllm.core.training.data import build_sft_data

        options = plan.options
        built = build_sft_data(
            plan.train_files,
            tokenizer,
            template=options.template,
            system=options.system,
            max_seq_length=options.max_seq_length,
            packing=options.packing,
            validation_files=plan.validation_files,
            validation_split=options.validation_split,
            skip_invalid=options.skip_invalid,
            seed=options.seed,
        )
        if built.skipped:
            progress.log(f"warning: skipped {len(built.skipped)} invalid records (first: {built.skipped[0]})")
        if built.stats.truncated:
            progress.log(f"warning: {built.stats.truncated} of {built.stats.samples} samples were longer than --max-seq-length {options.max_seq_length} and were truncated")
        if built.stats.dropped_no_target:
            progress.log(f"warning: dropped {built.stats.dropped_no_target} samples left without an answer token after truncation")
        pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
        summary = {
            "records": built.stats.samples,
            "train_samples": len(built.train),
            "eval_samples": built.eval_samples,
            "skipped_invalid": len(built.skipped),
            "truncated": built.stats.truncated,
            "dropped_no_target": built.stats.dropped_no_target,
            "trainable_tokens": built.stats.trainable_tokens,
            "total_tokens": built.stats.total_tokens,
            "template": options.template,
            "packing": options.packing,
        }
        return Data(built.train, built.eval, PaddingCollator(pad_id if pad_id is not None else 0), summary)


SFT = Sft()
