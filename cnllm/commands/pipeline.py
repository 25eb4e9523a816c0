"""``cnllm pipeline``: run a whole adaptation recipe, skipping steps whose inputs and options are unchanged."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Optional

import typer

from cnllm.cli import output
from cnllm.cli.options import JsonOpt
from cnllm.core.pipeline import STEP_ORDER, PipelineResult

StepOpt = Annotated[Optional[str], typer.Option(help=f"A step name: {', '.join(STEP_ORDER)}.")]
STATUS_STYLE = {"ran": "green", "skipped": "cyan", "up-to-date": "cyan", "planned": "yellow", "failed": "bold red", "not-run": "dim"}


def render(result: PipelineResult, json_: bool, dry_run: bool) -> None:
    """Print the plan or the outcome; exit 1 when a step failed."""
    if json_:
        output.print_json({**result.to_dict(), "dry_run": dry_run})
    else:
        rows = [(o.name, f"[{STATUS_STYLE.get(o.status, '')}]{o.status}[/]", f"{o.seconds:.1f}", str(o.folder)) for o in result.outcomes]
        output.print_table(f"{'plan' if dry_run else 'pipeline'}: {result.recipe.name}", ["step", "status", "seconds", "folder"], rows)
        if result.report_md:
            output.stdout().print(f"report: {result.report_md}", markup=False, highlight=False)
    failed = result.failed
    if failed is not None:
        if not json_:
            output.print_error(f"step {failed.name} failed: {failed.error}")
        raise typer.Exit(1)


def pipeline(
    recipe: Annotated[Path, typer.Argument(exists=True, dir_okay=False, help="Recipe YAML (see examples/recipes/).")],
    workdir: Annotated[Optional[Path], typer.Option("--workdir", "-o", file_okay=False, help="Work directory (default: the recipe's 'workdir').")] = None,
    from_step: Annotated[Optional[str], typer.Option("--from", help=f"Start at this step ({', '.join(STEP_ORDER)}); earlier steps must be up to date.")] = None,
    until: Annotated[Optional[str], typer.Option("--until", help="Stop after this step.")] = None,
    dry_run: Annotated[bool, typer.Option("--dry-run", help="Check every step's options and inputs, print the plan (which steps would run) and exit.")] = False,
    force: Annotated[bool, typer.Option("--force", "-f", help="Re-run the selected steps even when up to date.")] = False,
    json_: JsonOpt = False,
) -> None:
    """Run a recipe: vocab → pt → merge_pt → sft → merge_sft → align → merge_align → convert → quantize → eval → checksum.

    Each step writes its own folder in the work directory with a record of its inputs' checksums and
    options; unchanged steps are skipped on re-runs. Ends with WORKDIR/report.md and report.json.

    Example: cnllm pipeline examples/recipes/chinese-llama-2-7b.yaml --until merge_pt
    """
    from cnllm.core.pipeline import load_recipe, run_pipeline

    loaded = load_recipe(recipe, workdir=workdir)
    result = run_pipeline(loaded, start=from_step, until=until, dry_run=dry_run, force=force, progress=output.CliProgress())
    render(result, json_, dry_run)
