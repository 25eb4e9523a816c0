"""Preference accuracy: how often a model prefers the ``chosen`` answer of held-out pairs to the ``rejected`` one.

For each pair the prompt is rendered with the template (as sft and align train it) and both answers,
end marker included, are scored by the model's log-probability given the prompt. The headline figure
compares the mean log-probability per answer token (length-normalised, so a short answer is not
preferred for being short); the summed log-probability is reported too. A tie counts as not preferred.
Any model :func:`cnllm.core.backends.load_model` loads works: Hugging Face (with an unmerged LoRA) or GGUF.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Optional, Sequence

from cnllm.core.backends import load_model
from cnllm.core.config import coerce_fields
from cnllm.core.errors import UsageError
from cnllm.core.generation.base import LoadedModel, LoadOptions
from cnllm.core.progress import NULL_PROGRESS, Progress
from cnllm.core.templates import check_template_name
from cnllm.core.training.preference import PreferencePair, read_preference_pairs, render_pair


@dataclass(frozen=True)
class PrefOptions:
    template: str = "auto"
    system: Optional[str] = None
    ctx: int = 2048  # longest prompt + answer scored (llama.cpp context size)
    skip_invalid: bool = False

    def __post_init__(self) -> None:
        coerce_fields(self)

    def validate(self) -> None:
        check_template_name(self.template)
        if self.ctx < 8:
            raise UsageError(f"--ctx must be at least 8, got {self.ctx}")


@dataclass
class PairScore:
    where: str
    chosen_logprob: float
    rejected_logprob: float
    chosen_tokens: int
    rejected_tokens: int

    @property
    def chosen_mean(self) -> float:
        return self.chosen_logprob / self.chosen_tokens

    @property
    def rejected_mean(self) -> float:
        return self.rejected_logprob / self.rejected_tokens

    def to_dict(self) -> dict:
        return {"where": self.where, "chosen_logprob": self.chosen_logprob, "rejected_logprob": self.rejected_logprob,
                "chosen_tokens": self.chosen_tokens, "rejected_tokens": self.rejected_tokens}


@dataclass
class PrefResult:
    model: dict
    options: PrefOptions
    pairs: list[PairScore] = field(default_factory=list)
    skipped: list[str] = field(default_factory=list)
    seconds: float = 0.0

    @property
    def accuracy(self) -> float:
        """Share of pairs whose chosen answer has the higher mean log-probability per token."""
        return sum(p.chosen_mean > p.rejected_mean for p in self.pairs) / len(self.pairs)

    @property
    def accuracy_unnormalized(self) -> float:
        """The same on summed log-probabilities (what a length-blind comparison says)."""
        return sum(p.chosen_logprob > p.rejected_logprob for p in self.pairs) / len(self.pairs)

    @property
    def mean_margin(self) -> float:
        """Mean of (chosen − rejected) mean log-probability per token."""
        return sum(p.chosen_mean - p.rejected_mean for p in self.pairs) / len(self.pairs)

    def to_dict(self) -> dict:
        return {
            "model": self.model,
            "settings": {"template": self.options.template, "system": self.options.system, "ctx": self.options.ctx},
            "pairs": len(self.pairs),
            "accuracy": self.accuracy,
            "accuracy_unnormalized": self.accuracy_unnormalized,
            "mean_margin": self.mean_margin,
            "skipped_invalid": len(self.skipped),
            "seconds": round(self.seconds, 2),
            "scores": [p.to_dict() for p in self.pairs],
        }


def score_pair(model: LoadedModel, prompt_format, pair: PreferencePair, options: PrefOptions) -> PairScore:
    """Log-probabilities of both answers after the rendered prompt (special-token text parsed when templated)."""
    templated = not prompt_format.is_plain
    prompt_segments, chosen, rejected = render_pair(pair, lambda messages: prompt_format.segments(messages, options.system, add_generation_prompt=False))
    prompt_text = "".join(s.text for s in prompt_segments)
    prompt_ids = model.encode_prompt(prompt_text, special=templated)
    figures = []
    for answer in (chosen, rejected):
        answer_ids = model.tokenize(answer, add_bos=False, special=templated)
        if not answer_ids:
            raise UsageError(f"{pair.where}: an answer has no tokens")
        ids = prompt_ids + answer_ids
        if len(ids) > options.ctx:
            raise UsageError(f"{pair.where}: prompt and answer take {len(ids)} tokens, more than --ctx {options.ctx}")
        logprobs = model.target_logprobs([ids], max(1, len(prompt_ids)))[0]
        answer_logprobs = logprobs[len(logprobs) - len(answer_ids):]
        figures.append((float(answer_logprobs.sum()), len(answer_ids)))
    return PairScore(pair.where, figures[0][0], figures[1][0], figures[0][1], figures[1][1])


def evaluate_preference(
    model_path: Path, data: Sequence[Path], options: PrefOptions, load_options: LoadOptions | None = None, *, progress: Progress = NULL_PROGRESS
) -> PrefResult:
    """Score every pair of ``data`` on the model at ``model_path``."""
    load_options = load_options or LoadOptions()
    read = read_preference_pairs(data, skip_invalid=options.skip_invalid)
    started = time.monotonic()
    with load_model(model_path, replace(load_options, n_ctx=max(load_options.n_ctx or 0, options.ctx))) as model:
        prompt_format = model.prompt_format(options.template)
        described = {**model.describe(), "template": prompt_format.name}
        result = PrefResult(described, options, skipped=read.skipped)
        progress.start(len(read.pairs), "scoring pairs", unit="pair")
        for pair in read.pairs:
            result.pairs.append(score_pair(model, prompt_format, pair, options))
            progress.advance(1)
        progress.finish()
    result.seconds = time.monotonic() - started
    return result


def write_report(result: PrefResult, path: Path, data: Sequence[Path], *, force: bool = False) -> None:
    """The result as JSON at ``path`` (atomically) with its provenance record beside it (``path.cnllm.json``)."""
    import json

    from cnllm.core.atomic import write_text
    from cnllm.core.provenance import write_file_record

    document = result.to_dict()
    write_text(path, json.dumps(document, ensure_ascii=False, indent=2) + "\n", force=force)
    figures = {k: document[k] for k in ("pairs", "accuracy", "accuracy_unnormalized", "mean_margin")}
    write_file_record(path, "eval-pref", inputs=list(data), options={"model": result.model, **document["settings"]}, results=figures)
