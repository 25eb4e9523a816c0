"""``cnllm pipeline``: the whole adaptation as one recipe, run like a build tool.

A recipe (YAML) names the base model, the data and the options of each step. Steps run in a
fixed order — vocab → pt → merge_pt → sft → merge_sft → align → merge_align → convert → quantize → eval → checksum —
each only if the recipe has it, each in its own folder ``WORKDIR/NN-step/`` written atomically.
A step's fingerprint covers its options, the content of its external inputs (SHA-256) and the
fingerprint of the step before it; a step whose fingerprint is unchanged is skipped, so editing
one step's options re-runs that step and everything after it. Steps call the commands' core
functions directly (no CLI subprocesses).
"""

from __future__ import annotations

import hashlib
import json
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from cnllm.core.atomic import atomic_dir, check_output, write_text
from cnllm.core.errors import CnllmError, UsageError
from cnllm.core.hashing import hash_file
from cnllm.core.pipeline_types import STEP_ORDER, Artifacts, Recipe, StepContext, step_folder
from cnllm.core.progress import NULL_PROGRESS, Progress

RECIPE_KEYS = {"name", "workdir", "base", *STEP_ORDER}
STEP_RECORD = "cnllm-step.json"


def _resolve(value: Any, root: Path) -> Any:
    return str((root / value).resolve()) if isinstance(value, str) and not Path(value).is_absolute() else value


def _paths(options: dict, key: str, root: Path) -> None:
    if key in options:
        value = options[key]
        options[key] = [_resolve(v, root) for v in value] if isinstance(value, list) else _resolve(value, root)


def recipe_from_dict(data: dict, *, root: Path, workdir: Path | None = None, source: Path | None = None) -> Recipe:
    """Validate a recipe mapping; relative paths resolve against ``root`` (the recipe's folder)."""
    from cnllm.core.pipeline_steps import STEP_KINDS

    if not isinstance(data, dict):
        raise UsageError("a recipe is a YAML mapping with 'base' and one key per step")
    unknown = sorted(set(data) - RECIPE_KEYS)
    if unknown:
        raise UsageError(f"unknown recipe key(s) {', '.join(unknown)}; steps are {', '.join(STEP_ORDER)}")
    base = data.get("base")
    if not isinstance(base, dict) or "model" not in base:
        raise UsageError("the recipe needs 'base: {model: PATH}' (a Hugging Face LLaMA directory)")
    for key, value in (("base.model", base["model"]), ("base.tokenizer", base.get("tokenizer", "")), ("workdir", data.get("workdir", ""))):
        if not isinstance(value, str) or (key == "base.model" and not value):
            raise UsageError(f"recipe {key} must be a path (text), not {value!r}")
    steps: dict[str, dict] = {}
    for name in STEP_ORDER:
        if name not in data:
            continue
        if not isinstance(data[name] or {}, dict):
            raise UsageError(f"recipe step {name!r} must be a mapping of options")
        options = dict(data[name] or {})
        for key in options:
            if str(key).replace("-", "_") in STEP_KINDS[name].paths:
                _paths(options, key, root)
        if name == "eval":
            for kind in ("ppl", "mc"):
                if isinstance(options.get(kind), dict):
                    options[kind] = dict(options[kind])
                    _paths(options[kind], "data", root)
        steps[name] = options
    if not steps:
        raise UsageError(f"the recipe has no steps; add some of {', '.join(STEP_ORDER)}")
    name = str(data.get("name") or (source.stem if source else "pipeline"))
    base_model = Path(_resolve(base["model"], root))
    return Recipe(
        name=name,
        workdir=Path(workdir) if workdir is not None else Path(_resolve(data.get("workdir", f"{name}-work"), root)),
        base_model=base_model,
        base_tokenizer=Path(_resolve(base.get("tokenizer", str(base_model)), root)),
        steps=steps,
        source=source,
    )


def load_recipe(path: Path | str, *, workdir: Path | None = None) -> Recipe:
    from cnllm.core.config import load_yaml

    path = Path(path)
    return recipe_from_dict(load_yaml(path), root=path.resolve().parent, workdir=workdir, source=path)


# --- fingerprints -----------------------------------------------------------------------------


class HashCache:
    """SHA-256 of external inputs, remembered by (path, size, mtime) in the work directory."""

    def __init__(self, path: Path):
        self.path = path
        try:
            self.entries = json.loads(path.read_text(encoding="utf-8"))
        except (OSError, json.JSONDecodeError):
            self.entries = {}

    def digest(self, target: Path) -> str:
        if target.is_dir():
            parts = [f"{p.relative_to(target).as_posix()}:{self.digest(p)}" for p in sorted(target.rglob("*")) if p.is_file()]
            return hashlib.sha256("\n".join(parts).encode()).hexdigest()
        if not target.exists():
            raise UsageError(f"recipe input {target} does not exist")
        stat = target.stat()
        key = str(target.resolve())
        entry = self.entries.get(key)
        if entry and entry["size"] == stat.st_size and entry["mtime_ns"] == stat.st_mtime_ns:
            return entry["sha256"]
        digest = hash_file(target)
        self.entries[key] = {"size": stat.st_size, "mtime_ns": stat.st_mtime_ns, "sha256": digest}
        return digest

    def save(self) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        write_text(self.path, json.dumps(self.entries, indent=1), force=True)


def fingerprint(step: str, options: dict, previous: str, inputs: dict[str, str]) -> str:
    from cnllm import __version__

    document = {"step": step, "options": options, "previous": previous, "inputs": inputs, "cnllm": __version__}
    return hashlib.sha256(json.dumps(document, sort_keys=True, default=str).encode()).hexdigest()


# --- running ------------------------------------------------------------------------------------


@dataclass
class StepOutcome:
    name: str
    status: str  # ran | skipped | failed | planned | up-to-date | not-run
    folder: Path
    seconds: float = 0.0
    figures: dict = field(default_factory=dict)
    error: str | None = None

    def to_dict(self) -> dict:
        return {"step": self.name, "status": self.status, "folder": str(self.folder), "seconds": round(self.seconds, 3), "figures": self.figures, "error": self.error}


@dataclass
class PipelineResult:
    recipe: Recipe
    outcomes: list[StepOutcome]
    artifacts: Artifacts
    report_md: Path | None = None
    report_json: Path | None = None
    notes: dict = field(default_factory=dict)  # extra report sections, e.g. the demo's chat answer

    @property
    def failed(self) -> StepOutcome | None:
        return next((o for o in self.outcomes if o.status == "failed"), None)

    def to_dict(self) -> dict:
        """The one JSON shape of a run: ``report.json`` and ``pipeline --json``."""
        recipe = self.recipe
        return {
            "recipe": recipe.name,
            "source": str(recipe.source) if recipe.source else None,
            "workdir": str(recipe.workdir),
            "base_model": str(recipe.base_model),
            "steps": [o.to_dict() for o in self.outcomes],
            "total_seconds": round(sum(o.seconds for o in self.outcomes if o.status == "ran"), 3),
            "report": str(self.report_md) if self.report_md else None,
            "report_json": str(self.report_json) if self.report_json else None,
            "notes": self.notes,
        }


def _read_record(folder: Path) -> dict | None:
    try:
        return json.loads((folder / STEP_RECORD).read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError):
        return None


def _check_slice(recipe: Recipe, start: str | None, until: str | None) -> tuple[int, int]:
    names = list(recipe.steps)
    for label, value in (("--from", start), ("--until", until)):
        if value is not None and value not in names:
            raise UsageError(f"{label} {value}: the recipe's steps are {', '.join(names)}")
    first = names.index(start) if start else 0
    last = names.index(until) if until else len(names) - 1
    if first > last:
        raise UsageError(f"--from {start} comes after --until {until}")
    return first, last


def check_recipe(recipe: Recipe) -> dict[str, tuple[Any, list[Path]]]:
    """Every step's typed options and external inputs, checked before anything runs (also by ``--dry-run``).

    A bad option or a missing input is a :class:`UsageError` naming the step, the key and the allowed values.
    """
    from cnllm.core.pipeline_steps import STEP_KINDS

    if not recipe.base_model.exists():
        raise UsageError(f"base model {recipe.base_model} does not exist")
    plans = {}
    for name, options in recipe.steps.items():
        kind = STEP_KINDS[name]
        parsed = kind.parse(recipe, name, options)
        inputs = kind.inputs(recipe, parsed)
        for path in inputs:
            if not path.exists():
                raise UsageError(f"recipe step {name}: input {path} does not exist")
        plans[name] = (parsed, inputs)
    return plans


def run_pipeline(
    recipe: Recipe,
    *,
    start: str | None = None,
    until: str | None = None,
    dry_run: bool = False,
    force: bool = False,
    progress: Progress = NULL_PROGRESS,
) -> PipelineResult:
    """Run (or plan, with ``dry_run``) the recipe's steps; stop at the first failure.

    ``force`` re-runs every selected step even when its fingerprint is unchanged. Every step's options
    and inputs are checked first (:func:`check_recipe`), dry run or not.
    """
    from cnllm.core.pipeline_steps import STEP_KINDS

    first, last = _check_slice(recipe, start, until)
    plans = check_recipe(recipe)
    if recipe.workdir.exists() and not recipe.workdir.is_dir():
        raise UsageError(f"work directory {recipe.workdir} is a file")
    if not dry_run:
        check_output(recipe.workdir / "report.md", force=True, inputs=[recipe.base_model, recipe.base_tokenizer])
    cache = HashCache(recipe.workdir / ".cnllm-hash-cache.json")
    artifacts = Artifacts(model=recipe.base_model, tokenizer=recipe.base_tokenizer, models={"base": recipe.base_model})
    previous = fingerprint("base", {}, "", {str(p): cache.digest(p) for p in dict.fromkeys([recipe.base_model, recipe.base_tokenizer])})
    outcomes: list[StepOutcome] = []
    stopped = False
    for index, (name, options) in enumerate(recipe.steps.items()):
        folder = step_folder(recipe, name)
        kind = STEP_KINDS[name]
        if stopped or index > last:
            outcomes.append(StepOutcome(name, "not-run", folder))
            continue
        parsed, input_paths = plans[name]
        inputs = {str(p): cache.digest(p) for p in input_paths}
        step_print = fingerprint(name, options, previous, inputs)
        record = _read_record(folder) or {}
        up_to_date = record.get("fingerprint") == step_print
        if index < first:
            if not up_to_date:
                raise UsageError(f"--from {start}: the earlier step {name} has no up-to-date output in {folder}; run it first")
            artifacts = Artifacts.from_json(record["artifacts"])
            outcomes.append(StepOutcome(name, "skipped", folder, figures=record.get("figures", {})))
            previous = step_print
            continue
        if dry_run:
            outcomes.append(StepOutcome(name, "up-to-date" if up_to_date and not force else "planned", folder))
            if up_to_date and not force:
                artifacts = Artifacts.from_json(record["artifacts"])
            previous = step_print
            continue
        if up_to_date and not force:
            progress.log(f"{name}: up to date, skipped ({folder})")
            artifacts = Artifacts.from_json(record["artifacts"])
            outcomes.append(StepOutcome(name, "skipped", folder, record.get("seconds", 0.0), record.get("figures", {})))
            previous = step_print
            continue
        progress.log(f"{name}: running in {folder}")
        started = time.perf_counter()
        try:
            with atomic_dir(folder, force=True) as temporary:
                context = StepContext(recipe, temporary, folder, artifacts, progress)
                figures = kind.run(context, parsed)
                seconds = time.perf_counter() - started
                record = {
                    "step": name,
                    "fingerprint": step_print,
                    "options": options,
                    "inputs": inputs,
                    "previous": previous,
                    "figures": figures,
                    "seconds": round(seconds, 3),
                    "artifacts": context.artifacts.to_json(),
                }
                (temporary / STEP_RECORD).write_text(json.dumps(record, ensure_ascii=False, indent=2, default=str) + "\n", encoding="utf-8")
        except CnllmError as exc:
            outcomes.append(StepOutcome(name, "failed", folder, time.perf_counter() - started, error=exc.message))
            stopped = True
            continue
        artifacts = context.artifacts
        outcomes.append(StepOutcome(name, "ran", folder, seconds, figures))
        previous = step_print
        cache.save()
    result = PipelineResult(recipe, outcomes, artifacts)
    if not dry_run:
        cache.save()
        result.report_md, result.report_json = write_report(result)
    return result


# --- report -----------------------------------------------------------------------------------


def _figure_lines(name: str, figures: dict) -> list[str]:
    lines = []
    for key, value in figures.items():
        if key == "loss_curve" and value:
            lines.append(f"![{name} loss curve]({value})")
        elif isinstance(value, dict):
            lines.append(f"- **{key}**: " + ", ".join(f"{k} = {_fmt(v)}" for k, v in value.items()))
        else:
            lines.append(f"- **{key}**: {_fmt(value)}")
    return lines


def _fmt(value: Any) -> str:
    if isinstance(value, float):
        return f"{value:.4g}"
    if isinstance(value, dict):
        return "{" + ", ".join(f"{k}: {_fmt(v)}" for k, v in value.items()) + "}"
    return str(value)


def write_report(result: PipelineResult) -> tuple[Path, Path]:
    """``WORKDIR/report.md`` and ``report.json``: every step's status, wall time and key figures."""
    recipe = result.recipe
    md_path, json_path = recipe.workdir / "report.md", recipe.workdir / "report.json"
    result.report_md, result.report_json = md_path, json_path
    document = result.to_dict()
    lines = [f"# cnllm pipeline report: {recipe.name}", "", f"Base model: `{recipe.base_model}`  ", f"Work directory: `{recipe.workdir}`", ""]
    lines += ["| step | status | seconds | folder |", "| --- | --- | --- | --- |"]
    for o in result.outcomes:
        lines.append(f"| {o.name} | {o.status} | {o.seconds:.1f} | `{o.folder.name}` |")
    for o in result.outcomes:
        if o.figures or o.error:
            lines += ["", f"## {o.name}", ""]
            if o.error:
                lines.append(f"**failed:** {o.error}")
            lines += _figure_lines(o.name, o.figures)
    for title, note in result.notes.items():
        lines += ["", f"## {title}", ""] + [f"- **{k}**: {_fmt(v)}" for k, v in note.items()]
    write_text(md_path, "\n".join(lines) + "\n", force=True)
    write_text(json_path, json.dumps(document, ensure_ascii=False, indent=2, default=str) + "\n", force=True)
    return md_path, json_path
