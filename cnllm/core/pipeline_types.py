"""The types the pipeline runner and its steps share: a recipe, the artifacts flowing between steps,
a step's context and a step kind. They sit below both ``pipeline`` and ``pipeline_steps``."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

from cnllm.core.progress import Progress

STEP_ORDER = ("vocab", "pt", "merge_pt", "sft", "merge_sft", "align", "merge_align", "convert", "quantize", "eval", "checksum")


@dataclass
class Recipe:
    name: str
    workdir: Path
    base_model: Path
    base_tokenizer: Path
    steps: dict[str, dict[str, Any]]
    source: Path | None = None


@dataclass
class Artifacts:
    """What flows from step to step: the current model, tokenizer, adapters and GGUF files."""

    model: Path
    tokenizer: Path
    models: dict[str, Path] = field(default_factory=dict)
    adapters: dict[str, Path] = field(default_factory=dict)
    gguf: dict[str, Path] = field(default_factory=dict)

    def to_json(self) -> dict:
        return {
            "model": str(self.model),
            "tokenizer": str(self.tokenizer),
            "models": {k: str(v) for k, v in self.models.items()},
            "adapters": {k: str(v) for k, v in self.adapters.items()},
            "gguf": {k: str(v) for k, v in self.gguf.items()},
        }

    @classmethod
    def from_json(cls, data: dict) -> "Artifacts":
        return cls(
            model=Path(data["model"]),
            tokenizer=Path(data["tokenizer"]),
            models={k: Path(v) for k, v in data["models"].items()},
            adapters={k: Path(v) for k, v in data["adapters"].items()},
            gguf={k: Path(v) for k, v in data["gguf"].items()},
        )


@dataclass
class StepContext:
    recipe: Recipe
    folder: Path  # the temporary folder the step writes into; final location is ``final``
    final: Path
    artifacts: Artifacts
    progress: Progress

    def final_path(self, temporary: Path) -> Path:
        """Where a file written under ``folder`` will live once the step succeeds."""
        return self.final / temporary.relative_to(self.folder)


@dataclass
class StepKind:
    parse: Callable[[Recipe, str, dict], Any]  # (recipe, step name, recipe options) -> typed options; UsageError naming the key
    run: Callable[[StepContext, Any], dict]  # (context, typed options) -> figures; updates context.artifacts
    inputs: Callable[[Recipe, Any], list[Path]]  # (recipe, typed options) -> external inputs to fingerprint
    paths: tuple[str, ...] = ()  # option keys holding paths, relative to the recipe's folder (from the options' declared types)


def step_folder(recipe: Recipe, name: str) -> Path:
    """``WORKDIR/NN-step``: the step's folder, numbered by its place in :data:`STEP_ORDER`."""
    return recipe.workdir / f"{STEP_ORDER.index(name) + 1:02d}-{name}"
