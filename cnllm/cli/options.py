"""Reusable ``Annotated`` option types: one definition per option, shared by every command."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Optional

import typer

JsonOpt = Annotated[
    bool,
    typer.Option("--json", help="Print exactly one JSON document on stdout (and nothing else there)."),
]
ForceOpt = Annotated[bool, typer.Option("--force", "-f", help="Overwrite the output if it already exists.")]
JobsOpt = Annotated[
    Optional[int],
    typer.Option("--jobs", "-j", min=1, help="Files processed in parallel [default: number of CPUs]."),
]
OutputFileOpt = Annotated[
    Optional[Path],
    typer.Option("--output", "-o", dir_okay=False, help="Write the result to this file (atomically)."),
]
OutputDirArg = Annotated[Path, typer.Option("--output", "-o", file_okay=False, help="Output directory (written atomically).")]
