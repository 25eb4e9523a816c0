"""Passkey retrieval: the standard synthetic long-context test (Mohtashami & Jaggi 2023, as LongLoRA and
Chinese-LLaMA-Alpaca-2 ran it). A random five-digit number is hidden at a chosen depth of repetitive filler
text and asked for at the end; the model answers greedily and is right when the number is the first one it says.

Each cell of lengths × depths runs ``trials`` prompts with their own keys. Filler, prompts and keys are generated
in code (English or Chinese) from ``seed``, so a run is reproducible on any machine. A model loads once per length
with ``--n-ctx`` set to that length, as a user would run it (llama.cpp's dynamic and ntk-auto rope follow it).
"""

from __future__ import annotations

import random
import re
import time
from dataclasses import dataclass, field, replace
from pathlib import Path

from cnllm.core.backends import backend_for, load_model
from cnllm.core.config import coerce_fields
from cnllm.core.errors import UsageError
from cnllm.core.generation.base import LoadOptions, SamplingParams
from cnllm.core.progress import NULL_PROGRESS, Progress
from cnllm.core.rope import MAX_CONTEXT

LANGUAGES = ("en", "zh")
ANSWER_TOKENS = 12  # room kept for the answer; the prompt fills the rest of each length


@dataclass(frozen=True)
class Texts:
    intro: str
    filler: str  # one unit, repeated
    key: str  # with {key}
    question: str


TEXTS = {
    "en": Texts(
        intro="There is an important piece of information hidden inside a lot of irrelevant text. Find it and memorize it. "
        "I will quiz you about the important information there.\n",
        filler="The grass is green. The sky is blue. The sun is yellow. Here we go. There and back again. ",
        key="The pass key is {key}. Remember it. {key} is the pass key. ",
        question="\nWhat is the pass key? The pass key is",
    ),
    "zh": Texts(
        intro="下面的大量无关文字中藏着一条重要信息。请找到并记住它，之后我会问你这条信息。\n",
        filler="草是绿的。天是蓝的。太阳是黄的。我们出发吧。来来回回，去了又回。",
        key="通行密码是{key}。记住它。{key}是通行密码。",
        question="\n通行密码是什么？通行密码是",
    ),
}


@dataclass(frozen=True)
class PasskeyOptions:
    lengths: tuple[int, ...] = (1024, 2048, 4096)
    depths: tuple[float, ...] = (0.0, 0.25, 0.5, 0.75, 1.0)
    trials: int = 3
    language: str = "en"
    seed: int = 0

    def __post_init__(self) -> None:
        coerce_fields(self)

    def validate(self) -> None:
        if not self.lengths:
            raise UsageError("no lengths given (--length N)")
        if min(self.lengths) < 64:
            raise UsageError(f"--length must be at least 64 tokens, got {min(self.lengths)}")
        if max(self.lengths) > MAX_CONTEXT:
            raise UsageError(f"--length {max(self.lengths)} is beyond the largest context window cnllm loads ({MAX_CONTEXT} tokens)")
        if not self.depths or any(not 0 <= d <= 1 for d in self.depths):
            shown = ", ".join(str(d) for d in self.depths)
            raise UsageError(f"--depth values must be between 0 (start) and 1 (end), got {shown or 'none'}")
        if self.trials < 1:
            raise UsageError(f"--trials must be at least 1, got {self.trials}")
        if self.language not in LANGUAGES:
            raise UsageError(f"--language must be one of {', '.join(LANGUAGES)}; got {self.language!r}")


@dataclass(frozen=True)
class Prompt:
    text: str
    key: str
    depth: float
    filler_units: int
    key_unit: int  # how many filler units come before the key


def passkey(seed: int, length: int, depth: float, trial: int) -> str:
    """The five-digit key of one trial, the same on every machine and run."""
    return str(random.Random(f"passkey-{seed}-{length}-{depth}-{trial}").randint(10000, 99999))


def build_prompt(texts: Texts, key: str, depth: float, units: int) -> Prompt:
    """Intro, ``units`` filler units with the key sentence after ``round(depth · units)`` of them, the question."""
    before = round(depth * units)
    body = texts.filler * before + texts.key.format(key=key) + texts.filler * (units - before)
    return Prompt(texts.intro + body + texts.question, key, depth, units, before)


def fit_prompt(count_tokens, texts: Texts, key: str, depth: float, budget: int) -> Prompt:
    """The prompt with the most filler whose token count (``count_tokens``) stays within ``budget``."""
    fixed = count_tokens(build_prompt(texts, key, depth, 0).text)
    if fixed > budget:
        raise UsageError(f"a passkey prompt needs more than {budget} tokens; use a larger --length")
    per_unit = max(1.0, (count_tokens(build_prompt(texts, key, depth, 20).text) - fixed) / 20)
    units = max(0, int((budget - fixed) / per_unit))
    prompt = build_prompt(texts, key, depth, units)
    while units > 0 and count_tokens(prompt.text) > budget:
        units = max(0, units - max(1, units // 50))
        prompt = build_prompt(texts, key, depth, units)
    return prompt


def answer_is_right(answer: str, key: str) -> bool:
    """Right when the first number in the answer is the key."""
    found = re.search(r"\d+", answer)
    return found is not None and found.group() == key


@dataclass
class Cell:
    length: int
    depth: float
    trials: int = 0
    correct: int = 0
    prompt_tokens: list[int] = field(default_factory=list)
    answers: list[dict] = field(default_factory=list)

    @property
    def accuracy(self) -> float:
        return self.correct / self.trials if self.trials else 0.0

    def to_dict(self) -> dict:
        return {
            "length": self.length,
            "depth": self.depth,
            "trials": self.trials,
            "correct": self.correct,
            "accuracy": self.accuracy,
            "prompt_tokens": self.prompt_tokens,
            "answers": self.answers,
        }


@dataclass
class PasskeyResult:
    model: dict
    options: PasskeyOptions
    cells: list[Cell] = field(default_factory=list)
    seconds_by_length: dict[int, float] = field(default_factory=dict)

    def cell(self, length: int, depth: float) -> Cell:
        return next(c for c in self.cells if c.length == length and c.depth == depth)

    @property
    def accuracy(self) -> float:
        trials = sum(c.trials for c in self.cells)
        return sum(c.correct for c in self.cells) / trials if trials else 0.0

    def accuracy_by_length(self) -> dict[int, float]:
        out = {}
        for length in self.options.lengths:
            cells = [c for c in self.cells if c.length == length]
            out[length] = sum(c.correct for c in cells) / max(1, sum(c.trials for c in cells))
        return out

    def to_dict(self) -> dict:
        return {
            "model": self.model,
            "settings": {
                "lengths": list(self.options.lengths),
                "depths": list(self.options.depths),
                "trials": self.options.trials,
                "language": self.options.language,
                "seed": self.options.seed,
            },
            "accuracy": self.accuracy,
            "accuracy_by_length": {str(k): v for k, v in self.accuracy_by_length().items()},
            "seconds_by_length": {str(k): round(v, 3) for k, v in self.seconds_by_length.items()},
            "cells": [c.to_dict() for c in self.cells],
        }


def evaluate_passkey(
    model: Path, options: PasskeyOptions, load_options: LoadOptions | None = None, *, progress: Progress = NULL_PROGRESS
) -> PasskeyResult:
    """Accuracy for every length × depth on a GGUF or Hugging Face model."""
    options.validate()
    load_options = load_options or LoadOptions()
    backend_for(model, lora=load_options.lora)
    texts = TEXTS[options.language]
    params = SamplingParams(max_tokens=ANSWER_TOKENS, temperature=0.0, repetition_penalty=1.0, seed=0)
    result = PasskeyResult({}, options)
    progress.start(len(options.lengths) * len(options.depths) * options.trials, "passkey", unit="prompt")
    try:
        for length in sorted(set(options.lengths)):
            started = time.perf_counter()
            with load_model(model, replace(load_options, n_ctx=length)) as generator:
                result.model = {
                    "path": str(model),
                    "backend": generator.backend,
                    "trained_context": generator.trained_context,
                    "rope": load_options.rope.to_dict() if load_options.rope is not None and load_options.rope.active else None,
                }
                for depth in options.depths:
                    cell = Cell(length, depth)
                    for trial in range(options.trials):
                        key = passkey(options.seed, length, depth, trial)
                        prompt = fit_prompt(generator.count_tokens, texts, key, depth, length - ANSWER_TOKENS - 1)
                        ids = generator.encode_prompt(prompt.text)
                        completion = generator.complete(ids, params)
                        right = answer_is_right(completion.text, key)
                        cell.trials += 1
                        cell.correct += right
                        cell.prompt_tokens.append(len(ids))
                        cell.answers.append({"key": key, "answer": completion.text, "correct": right})
                        progress.advance(1, accuracy=cell.accuracy)
                    result.cells.append(cell)
            result.seconds_by_length[length] = time.perf_counter() - started
    finally:
        progress.finish()
    return result


def plot_passkey(result: PasskeyResult, path: Path, *, force: bool = False) -> None:
    """Accuracy by depth (rows) and length (columns) as a heat map."""
    from cnllm.core.evaluation.plots import plot_grid

    lengths = sorted(set(result.options.lengths))
    values = [[result.cell(length, depth).accuracy for length in lengths] for depth in result.options.depths]
    rope = (result.model.get("rope") or {}).get("scaling") or "model's own rope"
    plot_grid(
        path,
        [f"{d:.2f}" for d in result.options.depths],
        [str(n) for n in lengths],
        values,
        title=f"passkey: {Path(result.model['path']).name} ({rope})",
        xlabel="context (tokens)",
        ylabel="depth of the key",
        force=force,
    )


def write_report(result: PasskeyResult, path: Path, *, force: bool = False) -> None:
    """The result as JSON at ``path`` (atomically) with its provenance record beside it."""
    import json

    from cnllm.core.atomic import write_text
    from cnllm.core.provenance import write_file_record

    document = result.to_dict()
    write_text(path, json.dumps(document, ensure_ascii=False, indent=2) + "\n", force=force)
    write_file_record(path, "eval-passkey", inputs=[], options={"model": result.model, **document["settings"]}, results={"accuracy": result.accuracy})

