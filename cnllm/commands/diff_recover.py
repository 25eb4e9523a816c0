"""``cnllm diff-recover``: add a published weight diff back to the raw model (or make one with --make-diff)."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Optional

import typer

from cnllm.cli import output
from cnllm.cli.options import DTYPE_WORDS, ForceOpt, JsonOpt, MaxShardSizeOpt, OutputDirArg
from cnllm.core.errors import CheckFailed, UsageError
from cnllm.core.tensors import DEFAULT_SHARD_SIZE


def diff_recover(
    base: Annotated[Path, typer.Option("--base", "-b", help="The raw (original) model directory.")],
    output_dir: OutputDirArg,
    diff: Annotated[Optional[Path], typer.Option("--diff", help="The published diff directory (recover).")] = None,
    make_diff: Annotated[bool, typer.Option("--make-diff", help="Make a diff (TUNED − BASE) instead of recovering.")] = False,
    tuned: Annotated[Optional[Path], typer.Option("--tuned", help="The tuned model to make a diff of (--make-diff).")] = None,
    dtype: Annotated[
        Optional[str],
        typer.Option("--dtype", help=f"Output dtype: {DTYPE_WORDS}, or fp64 (float64) (default: the diff's when recovering; fp32 for --make-diff)."),
    ] = None,
    max_shard_size: MaxShardSizeOpt = DEFAULT_SHARD_SIZE,
    verify: Annotated[
        Optional[Path], typer.Option(
            "--verify",
            help="Check the recovered files against a published checksum list (any format checksum verify reads); "
            "listed pytorch_model-*.bin / .pth names, which a recovery never writes, are named before any work.",
        )
    ] = None,
    reference: Annotated[
        Optional[Path], typer.Option("--reference", help="Compare every recovered tensor with this reference model directory.")
    ] = None,
    tolerance: Annotated[float, typer.Option("--tolerance", min=0, help="Max absolute difference per tensor for --reference.")] = 1e-3,
    force: ForceOpt = False,
    json_: JsonOpt = False,
) -> None:
    """Recover tuned = raw + diff tensor by tensor (config and tokenizer from the diff), or make a diff.

    Extra vocabulary rows are taken from the diff as-is. --make-diff checks that recovering reproduces the tuned model bit for bit.

    Example: cnllm diff-recover --base llama-7b --diff ziya-diff -o ziya-7b --verify SHA256.md

    Example: cnllm diff-recover --make-diff --base llama-7b --tuned my-model -o my-model-diff
    """
    from cnllm.core import diff as diffs
    from cnllm.core.config import build_options

    progress = output.CliProgress()
    if make_diff:
        if tuned is None:
            raise UsageError("--make-diff needs --tuned TUNED (the model to publish as a diff)")
        if diff is not None or verify is not None or reference is not None:
            raise UsageError("--diff, --verify and --reference apply when recovering, not with --make-diff")
        options = build_options(diffs.MakeDiffOptions, {"dtype": dtype or "fp32", "max_shard_size": max_shard_size})
        result = diffs.make_diff(base, tuned, output_dir, options, force=force, progress=progress)
    else:
        if diff is None:
            raise UsageError("name the diff to recover from with --diff DIFF (or make one with --make-diff --tuned TUNED)")
        if tuned is not None:
            raise UsageError("--tuned applies to --make-diff only")
        values = {"dtype": dtype, "max_shard_size": max_shard_size, "manifest": verify, "reference": reference, "tolerance": tolerance}
        result = diffs.recover(base, diff, output_dir, build_options(diffs.RecoverOptions, values), force=force, progress=progress)
    if json_:
        output.print_json(result.to_dict())
    else:
        _render(result)
    problems = result.problems()
    if problems:
        raise CheckFailed("; ".join(problems))


def _render(result) -> None:
    console = output.stdout()
    verb = "recovered" if result.mode == "recover" else "wrote diff"
    console.print(
        f"{verb} {result.tensors} tensors into {result.output} ({result.dtype}, {output.human_bytes(result.total_bytes)}) "
        f"in {result.seconds:.1f}s, {output.human_bytes(result.throughput)}/s read+written",
        markup=False,
        highlight=False,
    )
    if result.extended:
        console.print(f"extra vocabulary rows taken from the diff: {', '.join(result.extended)}", markup=False, highlight=False)
    if result.mode == "make" and result.signed_zeros:
        console.print(
            f"checked: recovering from this diff reproduces every value; {result.signed_zeros} negative zeros come back as +0.0 "
            "(addition cannot restore the sign of an exact zero)",
            markup=False,
            highlight=False,
        )
    elif result.mode == "make":
        console.print("checked: recovering from this diff reproduces every tensor bit for bit", markup=False, highlight=False)
    if result.manifest_check is not None:
        styles = {"OK": "green", "FAILED": "bold red", "MISSING": "yellow"}
        output.print_table(
            f"checksums ({result.manifest_check.manifest})",
            ["status", "file", "detail"],
            [(f"[{styles[c.status]}]{c.status}[/]", c.path, c.reason or "") for c in result.manifest_check.checks],
        )
    if result.reference_check is not None:
        check = result.reference_check
        console.print(
            f"reference {'OK' if check.passed else 'FAILED'}: max difference {check.max_abs_diff:.3g} over {len(check.tensors)} tensors "
            f"(tolerance {check.tolerance:g})",
            markup=False,
            highlight=False,
        )
        for failure in check.failures[:10]:
            console.print(f"  {failure.name}: {failure.reason or f'{failure.max_abs_diff:.3g}'}", markup=False, highlight=False)
