"""The root ``cnllm`` app. Commands register here; their heavy imports happen inside them."""

from __future__ import annotations

import sys
from typing import Annotated

import typer

from cnllm import __version__
from cnllm.cli import errors
from cnllm.commands import checksum
from cnllm.commands import vocab
from cnllm.commands import pt, sft
from cnllm.commands import convert_gguf, quantize
from cnllm.commands import merge_lora, diff_recover
from cnllm.commands import eval as eval_cmd
from cnllm.commands import chat, serve
from cnllm.commands import demo, pipeline

app = typer.Typer(
    name="cnllm",
    help="Adapt LLaMA-family models to Chinese: vocabulary, training, merging, GGUF, chat, serving, evaluation.",
    no_args_is_help=True,
    rich_markup_mode="rich",
    pretty_exceptions_enable=False,
    context_settings={"help_option_names": ["-h", "--help"]},
)


class State:
    debug = False


def _version(value: bool) -> None:
    if value:
        typer.echo(f"cnllm {__version__}")
        raise typer.Exit()


@app.callback()
def root(
    debug: Annotated[bool, typer.Option("--debug", help="Show the full traceback when a command fails.")] = False,
    version: Annotated[
        bool, typer.Option("--version", callback=_version, is_eager=True, help="Print the version and exit.")
    ] = False,
) -> None:
    State.debug = debug


app.add_typer(checksum.app, name="checksum")
app.add_typer(vocab.app, name="vocab")
app.command("pt")(pt.pt)
app.command("sft")(sft.sft)
app.command("convert-gguf")(convert_gguf.convert_gguf)
app.command("quantize")(quantize.quantize)
app.command("merge-lora")(merge_lora.merge_lora)
app.command("diff-recover")(diff_recover.diff_recover)
app.add_typer(eval_cmd.app, name="eval")
app.command("chat")(chat.chat)
app.command("serve")(serve.serve)
app.command("pipeline")(pipeline.pipeline)
app.command("demo")(demo.demo)


def main(argv: list[str] | None = None) -> None:
    args = sys.argv[1:] if argv is None else argv
    command = typer.main.get_command(app)
    code = errors.run(command, args, debug=lambda: State.debug or "--debug" in args)
    sys.exit(code)
