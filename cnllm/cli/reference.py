"""Generate ``docs/cli-reference.md`` from the CLI itself, so the reference never drifts.

Regenerate:  python -m cnllm.cli.reference          (writes docs/cli-reference.md)
Check:       python -m cnllm.cli.reference --check  (exit 1 when the file is stale; a test runs this)
"""

from __future__ import annotations

import inspect
import sys
from pathlib import Path

import click

DEFAULT_TARGET = Path(__file__).resolve().parents[2] / "docs" / "cli-reference.md"


def _param_row(param: click.Parameter) -> str:
    if isinstance(param, click.Argument):
        name = f"`{param.human_readable_name}`"
        kind = "argument" + (" (repeatable)" if param.nargs == -1 else "")
        default = "required" if param.required else ""
        help_text = getattr(param, "help", "") or ""
    else:
        assert isinstance(param, click.Option)
        names = ", ".join(f"`{n}`" for n in [*param.opts, *param.secondary_opts])
        name = names
        kind = "flag" if param.is_flag else (param.type.name if not isinstance(param.type, click.Choice) else " / ".join(param.type.choices))
        default = "" if param.default in (None, False, ()) or param.is_flag and not param.default else f"`{param.default}`"
        help_text = param.help or ""
    escaped = help_text.replace("|", "\\|")
    return f"| {name} | {kind} | {default} | {escaped} |"


def _section(command: click.Command, path: list[str], lines: list[str]) -> None:
    if getattr(command, "hidden", False):
        return
    title = " ".join(path)
    lines += [f"## `{title}`", ""]
    doc = inspect.cleandoc(command.help or "")
    if doc:
        lines += [doc.replace("\b\n", ""), ""]
    params = [p for p in command.params if p.name not in ("help",) and not getattr(p, "hidden", False)]
    if params:
        lines += ["| option | type | default | description |", "| --- | --- | --- | --- |"]
        lines += [_param_row(p) for p in params]
        lines.append("")
    if isinstance(command, click.Group):
        ctx = click.Context(command)
        for name in command.list_commands(ctx):
            subcommand = command.get_command(ctx, name)
            if subcommand is not None:  # listed names always resolve
                _section(subcommand, [*path, name], lines)


def short_option_table() -> list[str]:
    """The short aliases, one meaning each across commands (README shows the same table)."""
    from cnllm.cli.options import SHORT_OPTIONS

    lines = ["| short | long | where |", "| --- | --- | --- |"]
    for short, (longs, where) in SHORT_OPTIONS.items():
        lines.append(f"| `{short}` | {' / '.join(f'`{name}`' for name in longs)} | {where} |")
    return lines


def reference() -> str:
    import typer

    from cnllm.cli.app import app

    root = typer.main.get_command(app)
    lines = ["# cnllm command reference", "", "Generated from the CLI by `python -m cnllm.cli.reference`; do not edit by hand.", ""]
    lines += [
        "## Conventions",
        "",
        "Results go to stdout (`--json`: exactly one JSON document), progress and logs to stderr. Exit codes: 0 ok,",
        "1 a check failed, 2 usage or bad input. Dtype options (`--dtype`, `--precision`, `--outtype`) accept one",
        "vocabulary: fp16 / float16 / half, bf16 / bfloat16, fp32 / float32 / float (fp64 / float64 for diffs), and",
        "echo back the word given. A short alias has one meaning in every command that has it:",
        "",
        *short_option_table(),
        "",
    ]
    _section(root, ["cnllm"], lines)
    return "\n".join(lines).rstrip("\n") + "\n"


def main(argv: list[str] | None = None) -> int:
    args = sys.argv[1:] if argv is None else argv
    target = Path(next((a for a in args if not a.startswith("--")), DEFAULT_TARGET))
    text = reference()
    if "--check" in args:
        if not target.exists() or target.read_text(encoding="utf-8") != text:
            print(f"{target} is stale; regenerate with: python -m cnllm.cli.reference", file=sys.stderr)
            return 1
        return 0
    target.parent.mkdir(parents=True, exist_ok=True)
    target.write_text(text, encoding="utf-8")
    return 0


if __name__ == "__main__":
    sys.exit(main())
