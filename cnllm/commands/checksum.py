"""``cnllm checksum``: create and verify checksum manifests of model files."""

from __future__ import annotations

from enum import Enum
from pathlib import Path
from typing import Annotated, List, Optional

import typer
from rich.markup import escape

from cnllm.cli import output
from cnllm.cli.options import ForceOpt, JobsOpt, JsonOpt, OutputFileOpt
from cnllm.core import hashing
from cnllm.core.errors import UsageError

app = typer.Typer(help="Create and verify checksum manifests (GNU, BSD, SHA256.md tables, MD5 lists).", no_args_is_help=True)


class Algorithm(str, Enum):
    sha256 = "sha256"
    md5 = "md5"
    sha1 = "sha1"
    blake2b = "blake2b"


STATUS_STYLE = {hashing.OK: "green", hashing.FAILED: "bold red", hashing.MISSING: "yellow"}
TABLE_ROWS = 500  # longer reports are plain tab-separated lines: a Rich table of 100,000 rows takes minutes


@app.command()
def create(
    paths: Annotated[List[Path], typer.Argument(help="Files and directories (walked recursively, sorted).")],
    output_file: OutputFileOpt = None,
    algo: Annotated[Algorithm, typer.Option("--algo", "-a", help="Hash algorithm.")] = Algorithm.sha256,
    jobs: JobsOpt = None,
    force: ForceOpt = False,
    json_: JsonOpt = False,
) -> None:
    """Hash files into a GNU coreutils manifest (`<hex>  <path>`), paths relative to the manifest's folder.

    Without --output the manifest is printed on stdout.

    Example: cnllm checksum create merged-model/ -o merged-model/SHA256SUMS
    """
    result = hashing.create_manifest(
        paths, manifest=output_file, algorithm=algo.value, jobs=jobs, force=force, progress=output.CliProgress()
    )
    if result.manifest is not None and any(hashing.outside_reason(f.path) for f in result.files):
        output.print_warning(f"{result.manifest} lists files outside its folder; check it with 'cnllm checksum verify --allow-outside'")
    if json_:
        output.print_json(result.to_dict())
    elif result.manifest is None:
        typer.echo(result.text(), nl=False)
    else:
        output.stdout().print(
            f"wrote {len(result.files)} {result.algorithm} checksums ({output.human_bytes(result.total_bytes)}) to {result.manifest}",
            markup=False,
            highlight=False,
        )


@app.command()
def verify(
    manifest: Annotated[Path, typer.Argument(help="Checksum file (GNU, BSD, SHA256.md table or MD5 list); '-' reads stdin.")],
    files: Annotated[
        Optional[List[Path]],
        typer.Argument(help="Files or folders to identify by digest against the manifest (which published entry each one is).", show_default=False),
    ] = None,
    root: Annotated[
        Optional[Path], typer.Option("--root", "-r", help="Folder the listed paths are relative to (default: the manifest's folder).")
    ] = None,
    algo: Annotated[
        Optional[Algorithm], typer.Option("--algo", "-a", help="Force the algorithm (default: from each digest's length or tag).")
    ] = None,
    allow_outside: Annotated[
        bool, typer.Option("--allow-outside", help="Also check listed paths outside the root (absolute or ../); refused by default.")
    ] = False,
    show_all: Annotated[bool, typer.Option("--all", help="List every file (default: the summary and the files that are not OK).")] = False,
    jobs: JobsOpt = None,
    json_: JsonOpt = False,
) -> None:
    """Check files against a manifest: OK / FAILED / MISSING per file; exit 1 if any is not OK.

    Paths that lead outside the manifest's folder (or --root) and files that are not regular files
    (FIFOs, devices) are FAILED with the reason, without being read.

    With FILE arguments, or a SHA256.md whose tables are keyed by model name (Chinese-LLaMA-Alpaca's),
    files are matched by digest instead: each is reported as the published entry it is (model, file
    kind, part) or as matching none (exit 1). Multi-digest cells (<br/>), Parts columns and TBA/-
    placeholders are understood.

    Example: cnllm checksum verify SHA256.md --root downloads/

    Example: cnllm checksum verify SHA256.md chinese-alpaca-7b/consolidated.00.pth
    """
    if files or hashing.is_name_keyed(manifest):
        _verify_by_digest(manifest, files or [], root, jobs, json_)
        return
    result = hashing.verify_manifest(
        manifest,
        root=root,
        algorithm=algo.value if algo else None,
        jobs=jobs,
        allow_outside=allow_outside,
        progress=output.CliProgress(),
    )
    document = result.to_dict()
    if json_:
        output.print_json(document)
    else:
        for m in result.malformed:
            output.print_warning(f"{result.manifest}:{m.line}: skipped malformed line: {m.reason}")
        shown = result.checks if show_all else [c for c in result.checks if c.status != hashing.OK]
        if len(shown) > TABLE_ROWS:
            typer.echo("".join(f"{c.status}\t{c.path}\t{c.algorithm}\t{c.reason or ''}\n" for c in shown), nl=False)
        elif shown:
            rows = [(f"[{STATUS_STYLE[c.status]}]{c.status}[/]", escape(c.path), c.algorithm, escape(c.reason or "")) for c in shown]
            output.print_table(None, ["status", "file", "algorithm", "detail"], rows)
        output.stdout().print(
            f"{document['ok']} OK, {document['failed']} FAILED, {document['missing']} MISSING"
            + (f", {len(result.malformed)} malformed lines skipped" if result.malformed else ""),
            markup=False,
            highlight=False,
        )
    if not result.passed:
        raise typer.Exit(1)


def _verify_by_digest(manifest: Path, files: List[Path], root: Optional[Path], jobs: Optional[int], json_: bool) -> None:
    """Which published entry each file is (``checksum verify SHA256.md FILE…``, or a name-keyed table with --root)."""
    if files and root is not None:
        raise UsageError("give FILE arguments or --root, not both")
    result = hashing.match_published(manifest, files, root=root, jobs=jobs, progress=output.CliProgress())
    document = result.to_dict()
    if json_:
        output.print_json(document)
    else:
        rows = [
            (
                f"[{'green' if f.status == hashing.MATCH else 'bold red'}]{f.status}[/]",
                f.path,
                "; ".join(m.describe() for m in f.matches) or (f.reason or ""),
            )
            for f in result.files
        ]
        output.print_table(None, ["status", "file", "published entry"], rows)
        pending = document["not_yet_published"]
        output.stdout().print(
            f"{document['matched']} of {len(result.files)} files match a published digest ({result.entries} published in {result.manifest})"
            + (f"; {len(pending)} entries not published yet (TBA/-): {', '.join(p['label'] for p in pending[:5])}" if pending else ""),
            markup=False,
            highlight=False,
        )
    if not result.passed:
        raise typer.Exit(1)
