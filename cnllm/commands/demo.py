"""``cnllm demo``: the whole adaptation on a tiny model and the bundled samples — the README's main job."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from cnllm.cli import output
from cnllm.cli.options import JsonOpt
from cnllm.commands.pipeline import render


def demo(
    workdir: Annotated[Path, typer.Option("--workdir", "-o", file_okay=False, help="Work directory for every step's output.")] = Path("cnllm-demo"),
    force: Annotated[bool, typer.Option("--force", "-f", help="Re-run every step even when up to date.")] = False,
    json_: JsonOpt = False,
) -> None:
    """Run the embedded demo on CPU: tiny LLaMA → Chinese vocabulary → pre-training → SFT → DPO → GGUF → Q8_0/Q4_K → eval → checksums.

    Re-running skips the steps that are up to date. Ends with WORKDIR/report.md and report.json.

    Example: cnllm demo -o /tmp/cnllm-demo
    """
    from cnllm.core.demo import next_commands, run_demo

    result = run_demo(workdir, force=force, progress=output.CliProgress())
    if not json_ and result.answer is not None:
        output.stdout().print(f"Q: {result.question}\nA: {result.answer}", markup=False, highlight=False)
    render(result.pipeline, json_, dry_run=False)
    if not json_:
        lines = [f"  {command}    # {what}" for what, command in next_commands(result.pipeline)]
        output.stdout().print("\nNext, try:\n" + "\n".join(lines), markup=False, highlight=False)
