"""The root ``cnllm`` app. Commands register here; their heavy imports happen inside them."""

from __future__ import annotations

import importlib
import sys
from typing import Annotated

import click
import typer
from typer.core import TyperGroup

from cnllm import __version__
from cnllm.cli import errors
from cnllm.cli.paths import Downloads, apply_path_rule

# Every command, in the order a user walks them: name → (module, attribute, one-line help).
# Modules are imported only when their command runs (or completes), so `cnllm --help` stays fast;
# a test checks each line here against the command's own docstring.
COMMANDS: dict[str, tuple[str, str, str]] = {
    "convert-meta": (
        "cnllm.commands.convert_meta",
        "convert_meta",
        "Convert a Meta LLaMA checkpoint (params.json + consolidated.NN.pth) to a Hugging Face model, one layer at a time.",
    ),
    "vocab": ("cnllm.commands.vocab", "app", "Train a Chinese vocabulary, merge it into a LLaMA tokenizer, extend a model to it, and inspect tokenizers."),
    "pt": ("cnllm.commands.pt", "pt", 'Continue pre-training a model on raw text with LoRA (text files, directories, JSONL "text").'),
    "sft": ("cnllm.commands.sft", "sft", "Instruction-tune a model with LoRA; the loss covers the assistant's answers only."),
    "align": ("cnllm.commands.align", "align", "Align a model to preference pairs (DPO, ORPO, …) with TRL; LoRA by default, the reference is the base."),
    "merge-lora": ("cnllm.commands.merge_lora", "merge_lora", "Merge LoRA adapters into a base model: W += scale·B·A in fp32, one tensor at a time."),
    "diff-recover": (
        "cnllm.commands.diff_recover",
        "diff_recover",
        "Recover tuned = raw + diff tensor by tensor (config and tokenizer from the diff), or make a diff.",
    ),
    "convert-gguf": ("cnllm.commands.convert_gguf", "convert_gguf", "Convert a LLaMA 1/2/3, Chinese-LLaMA/Alpaca, Mistral or Qwen2 checkpoint to GGUF, one tensor at a time."),
    "gguf-to-hf": (
        "cnllm.commands.gguf_to_hf",
        "gguf_to_hf",
        "Turn a LLaMA-family GGUF into a Hugging Face checkpoint (safetensors, config, tokenizer, chat template).",
    ),
    "quantize": (
        "cnllm.commands.quantize",
        "quantize",
        "Quantize a GGUF (from cnllm convert-gguf) with llama.cpp's quantizer, then summarize sizes and bits per weight.",
    ),
    "chat": ("cnllm.commands.chat", "chat", "Chat with a model (GGUF via llama.cpp, or a Hugging Face directory via transformers)."),
    "serve": (
        "cnllm.commands.serve",
        "serve",
        "Serve a model as a local OpenAI-compatible API: /v1/models, /v1/chat/completions (stream or not), "
        "/v1/completions (echo, logprobs), /v1/embeddings, /tokenize, /detokenize, /health, /metrics (Prometheus), and a chat page in the browser at /.",
    ),
    "eval": (
        "cnllm.commands.eval",
        "app",
        "Evaluate a model: perplexity (ppl), multiple-choice exams (mc), preference accuracy (pref), long context (passkey, longbench).",
    ),
    "checksum": ("cnllm.commands.checksum", "app", "Create and verify checksum manifests (GNU, BSD, SHA256.md tables, MD5 lists)."),
    "pipeline": ("cnllm.commands.pipeline", "pipeline", "Run a recipe: vocab → pt → merge_pt → sft → merge_sft → align → merge_align → convert → quantize → eval → checksum."),
    "demo": (
        "cnllm.commands.demo",
        "demo",
        "Run the embedded demo on CPU: tiny LLaMA → Chinese vocabulary → pre-training → SFT → DPO → GGUF → Q8_0/Q4_K → eval → checksums.",
    ),
    "doctor": (
        "cnllm.commands.doctor",
        "doctor",
        "Show library versions, the CPU and its features, llama.cpp's build, and what cnllm will use (repacking, threads, backends).",
    ),
}


def load_command(name: str) -> click.Command:
    """Import a command's module and turn its Typer app or function into a Click command."""
    module_name, attribute, _ = COMMANDS[name]
    target = getattr(importlib.import_module(module_name), attribute)
    if not isinstance(target, typer.Typer):
        single = typer.Typer()
        single.command(name)(target)
        target = single
    from cnllm.cli.options import refuse_non_finite_floats

    command = typer.main.get_command(target)
    command.name = name
    return apply_path_rule(refuse_non_finite_floats(command))


class LazyGroup(TyperGroup):
    """The root group: lists commands from :data:`COMMANDS` and imports one only when it is used.

    While the root help is rendered, commands are stand-ins carrying their one-line help.
    """

    _listing_help = False

    def list_commands(self, ctx: click.Context) -> list[str]:
        return list(COMMANDS)

    def get_command(self, ctx: click.Context, name: str) -> click.Command | None:
        if name not in COMMANDS:
            return None
        if self._listing_help:
            return click.Command(name, help=COMMANDS[name][2], short_help=COMMANDS[name][2])
        return load_command(name)

    def format_help(self, ctx: click.Context, formatter: click.HelpFormatter) -> None:
        self._listing_help = True
        try:
            super().format_help(ctx, formatter)
        finally:
            self._listing_help = False


app = typer.Typer(
    name="cnllm",
    cls=LazyGroup,
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
    allow_download: Annotated[
        bool,
        typer.Option(
            "--allow-download", help="Download a Hugging Face model id given as a model path when it is not in the local cache (default: cache only); "
            "a request without an answer for HF_HUB_DOWNLOAD_TIMEOUT seconds (default 30) fails."
        ),
    ] = False,
) -> None:
    State.debug = debug
    Downloads.allowed = allow_download


def main(argv: list[str] | None = None) -> None:
    args = sys.argv[1:] if argv is None else argv
    command = typer.main.get_command(app)
    code = errors.run(command, args, debug=lambda: State.debug or "--debug" in args)
    sys.exit(code)
