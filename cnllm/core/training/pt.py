"""``cnllm pt``: continued pre-training on raw text, cut into equal blocks (:func:`cnllm.core.training.data.build_pt_data`)."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Optional

from cnllm.core.config import OptionError, option
from cnllm.core.progress import Progress
from cnllm.core.training.method import Data, TrainingMethod
from cnllm.core.training.options import DATA, TrainOptions, learning_rate


@dataclass
class PtOptions(TrainOptions):
    block_size: int = option(1024, help="Tokens per training block (documents are joined with EOS).", panel=DATA)
    streaming: bool = option(False, help="Tokenise while training, for corpora larger than RAM (needs --max-steps; no cache).", panel=DATA)
    cache_dir: Optional[Path] = option(None, help="Where tokenised blocks are cached (default: ~/.cache/cnllm/pt-blocks).", panel=DATA)
    learning_rate: float = learning_rate(2e-4)

    def validate(self) -> None:
        super().validate()
        if self.block_size < 1:
            raise OptionError("{block_size} must be at least 1, got {value}", value=self.block_size)
        if self.streaming and self.max_steps <= 0:
            raise OptionError("{streaming} reads the data once as it goes and cannot count it: set {max_steps}")


class BlockCollator:
    """Equal-length pre-training blocks: labels are the inputs (the model shifts them)."""

    def __call__(self, features: list[dict]) -> dict:
        import torch

        ids = torch.tensor([f["input_ids"] for f in features], dtype=torch.long)
        return {"input_ids": ids, "labels": ids.clone()}


class Pt(TrainingMethod):
    name = "pt"
    options_type = PtOptions
    counts_tokens = "all"  # blocks have no padding

    def build_data(self, plan, tokenizer, progress: Progress) -> Data:
        from cnllm.core.training.data import build_pt_data

        options = plan.options
        built = build_pt_data(
            plan.train_files,
            tokenizer,
            block_size=options.block_size,
            validation_files=plan.validation_files,
            validation_split=options.validation_split,
            streaming=options.streaming,
            cache_dir=options.cache_dir,
            seed=options.seed,
        )
        if built.stats.invalid_utf8_lines:
            progress.log(f"warning: skipped {built.stats.invalid_utf8_lines} lines that are not UTF-8")
        summary = {
            "train_blocks": built.train_blocks,
            "eval_blocks": built.eval_blocks,
            "block_size": options.block_size,
            "documents": built.stats.lines,
            "cache": str(built.cache_path) if built.cache_path else None,
            "cache_hit": built.cache_hit,
        }
        if built.cache_path is not None and built.train_blocks is not None:  # cached blocks (not streamed) are counted
            progress.log(f"{'reused' if built.cache_hit else 'built'} {built.train_blocks + built.eval_blocks} blocks of {options.block_size} tokens ({built.cache_path})")
        return Data(built.train, built.eval, BlockCollator(), summary)


PT = Pt()
