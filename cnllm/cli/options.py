"""Reusable ``Annotated`` option types: one definition per option, shared by every command."""

from __future__ import annotations

import functools
import inspect
import math
import typing
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any, Callable, Optional

import click
import typer

from cnllm.core.dtypes import DTYPE_WORDS  # noqa: F401 - every --dtype help spells the dtypes with it
from cnllm.core.embeddings import NEW_ROW_INIT_HELP  # noqa: F401 - vocab extend-model's help, as pt's
from cnllm.core.rope import INFERENCE_METHODS, MAX_CONTEXT
from cnllm.core.templates import PROMPT_TEMPLATE_NAMES

if TYPE_CHECKING:
    from cnllm.core.generation.base import LoadOptions

# Short aliases: one meaning each, in every command that has the option (checked by a test over the
# whole CLI; the table is printed at the top of docs/cli-reference.md and in the README).
SHORT_OPTIONS: dict[str, tuple[tuple[str, ...], str]] = {
    "-h": (("--help",), "every command"),
    "-o": (("--output", "--workdir"), "where the result goes; --workdir for pipeline and demo, whose output is a work directory"),
    "-f": (("--force",), "overwrite an existing output (pipeline, demo: re-run up-to-date steps)"),
    "-j": (("--jobs",), "checksum"),
    "-v": (("--verbose",), "chat, serve, quantize"),
    "-c": (("--config",), "pt, sft, align"),
    "-m": (("--model",), "pt, sft, align, vocab extend-model"),
    "-d": (("--data",), "pt, sft, align, eval ppl, eval mc, eval pref, eval longbench"),
    "-b": (("--base",), "merge-lora, diff-recover"),
    "-l": (("--lora",), "merge-lora, chat, serve, eval"),
    "-t": (("--temperature",), "chat"),
    "-n": (("--max-tokens",), "chat"),
    "-p": (("--prompt",), "chat"),
    "-s": (("--system",), "chat"),
    "-q": (("--quiet",), "chat"),
    "-k": (("--shots",), "eval mc"),
    "-a": (("--algo",), "checksum"),
    "-r": (("--root",), "checksum verify"),
}


class _Finite:
    """A float parameter type that refuses NaN and infinities: no option of cnllm means anything by them, and
    comparisons with NaN pass every range check (``--rope-factor nan`` satisfies ``min=1``)."""

    def convert(self, value: Any, param: Optional[click.Parameter], ctx: Optional[click.Context]) -> Any:
        number = super().convert(value, param, ctx)  # type: ignore[misc]  # a mixin: the click float type it is combined with has convert()
        if number is not None and not math.isfinite(number):
            name = param.opts[0] if param is not None and param.opts else (param.human_readable_name if param is not None else "the value")
            raise click.UsageError(f"{name} must be a finite number, got {value}", ctx)
        return number


class FiniteFloat(_Finite, click.types.FloatParamType):
    """``float``, finite."""


class FiniteFloatRange(_Finite, click.FloatRange):
    """``click.FloatRange``, finite (the range shows in the help as before)."""


def refuse_non_finite_floats(command: click.Command) -> click.Command:
    """Give every float parameter of ``command`` (and its subcommands) the finite-only type, ranges kept:
    the one rule for float flags, however a command declares them."""
    for param in command.params:
        kind = param.type
        if isinstance(kind, _Finite):
            continue
        if isinstance(kind, click.FloatRange):
            param.type = FiniteFloatRange(kind.min, kind.max, min_open=kind.min_open, max_open=kind.max_open, clamp=kind.clamp)
        elif isinstance(kind, click.types.FloatParamType):
            param.type = FiniteFloat()
    for sub in getattr(command, "commands", {}).values():
        refuse_non_finite_floats(sub)
    return command


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
# Every command that writes safetensors shards (merge-lora, diff-recover, convert-meta, gguf-to-hf); the value becomes
# core's ShardSize, which checks it (default: cnllm.core.tensors.DEFAULT_SHARD_SIZE).
MaxShardSizeOpt = Annotated[str, typer.Option("--max-shard-size", help="Largest safetensors shard, e.g. 500MB, 2GB or 4GiB.")]

# Loading a model for generation or scoring (chat, serve, eval): the model argument, then the shared group below.
ModelArg = Annotated[Path, typer.Argument(help="A .gguf file (llama.cpp) or a Hugging Face model directory (transformers).")]
TemplateOpt = Annotated[
    str,
    typer.Option(
        "--template",
        click_type=click.Choice(PROMPT_TEMPLATE_NAMES),
        help="Prompt template: a built-in one; auto (the model's own chat template, plain continuation if it has none); "
        "none (plain continuation, no template).",
    ),
]
NCtxOpt = Annotated[
    Optional[int],
    typer.Option(
        "--n-ctx",
        min=16,
        max=MAX_CONTEXT,
        help="Context window in tokens (default: the model's, at most 4096 for GGUF, or trained × --rope-factor); beyond the trained context, choose a --rope-scaling.",
    ),
]
THREADS_HELP = "CPU threads for llama.cpp (default: llama.cpp's choice)."
REPACK_HELP = (
    "llama.cpp: repack the weights into its CPU-optimised layouts (llama.cpp's default) or keep them as stored "
    "(llama.cpp's --no-repack). Default: on, off on CPUs with AMX, where llama.cpp's AMX weights crash; "
    "CNLLM_LLAMA_REPACK=on|off|auto sets the default (docs/cpu.md)."
)
ThreadsOpt = Annotated[Optional[int], typer.Option("--threads", min=1, help=THREADS_HELP)]  # doctor
RepackOpt = Annotated[Optional[bool], typer.Option("--repack/--no-repack", show_default=False, help=REPACK_HELP)]  # doctor
VerboseOpt = Annotated[bool, typer.Option("--verbose", "-v", help="Show the libraries' own logs (llama.cpp load messages, transformers).")]

# The model-loading group: every command that loads a model for generation or scoring (chat, serve, every eval
# subcommand) takes these same flags through with_model_loading, which collects them into one LoadOptions.
LOADING_PANEL = "Model loading"


def _loading(name: str, kind: Any, default: Any, *flags: str, help: str, **kwargs: Any) -> inspect.Parameter:
    option = typer.Option(*flags, help=help, rich_help_panel=LOADING_PANEL, **kwargs)
    return inspect.Parameter(name, inspect.Parameter.KEYWORD_ONLY, annotation=Annotated[kind, option], default=default)


MODEL_LOADING = [
    _loading("lora", Optional[Path], None, "--lora", "-l", file_okay=False, help="Apply this PEFT LoRA adapter (not merged) to a Hugging Face model."),
    _loading("device", Optional[str], None, "--device", help="transformers device: cpu, cuda, cuda:1, mps (default: the best available)."),
    _loading("dtype", str, "auto", "--dtype", help=f"transformers weights dtype: auto (bf16/fp16 on GPUs, fp32 on CPU), {DTYPE_WORDS}."),
    _loading("load_in_4bit", bool, False, "--load-in-4bit", help="Quantise a Hugging Face model to 4 bits on load (CUDA + bitsandbytes)."),
    _loading("load_in_8bit", bool, False, "--load-in-8bit", help="Quantise a Hugging Face model to 8 bits on load (CUDA + bitsandbytes)."),
    _loading("trust_remote_code", bool, False, "--trust-remote-code", help="Allow the model directory's own Python code to run."),
    _loading("threads", Optional[int], None, "--threads", min=1, help=THREADS_HELP),
    _loading("gpu_layers", int, 0, "--gpu-layers", min=-1, help="Layers llama.cpp offloads to the GPU (-1: all)."),
    _loading("repack", Optional[bool], None, "--repack/--no-repack", show_default=False, help=REPACK_HELP),
    # Context extension at load time, one meaning on both backends (cnllm.core.rope).
    _loading(
        "rope_scaling",
        Optional[str],
        None,
        "--rope-scaling",
        click_type=click.Choice(INFERENCE_METHODS),
        help="RoPE context extension: none, linear (position interpolation), ntk (NTK-aware base), ntk-auto (adaptive NTK "
        "from the sequence length, no factor needed), dynamic (dynamic NTK), yarn (default: the model's own setting).",
    ),
    _loading(
        "rope_factor", Optional[float], None, "--rope-factor", min=1.0,
        help="Context extension factor for linear, ntk, dynamic, yarn (default: context / trained context).",
    ),
    _loading("rope_freq_base", Optional[float], None, "--rope-freq-base", min=0.0, help="Override the RoPE base frequency (theta)."),
]


def load_options(
    *,
    lora: Optional[Path],
    device: Optional[str],
    dtype: str,
    load_in_4bit: bool,
    load_in_8bit: bool,
    trust_remote_code: bool,
    threads: Optional[int],
    gpu_layers: int,
    repack: Optional[bool],
    rope_scaling: Optional[str],
    rope_factor: Optional[float],
    rope_freq_base: Optional[float],
) -> LoadOptions:
    """The :class:`LoadOptions` of the model-loading group (the dtype word and the rope flags checked)."""
    from cnllm.core.dtypes import DType
    from cnllm.core.generation.base import LoadOptions

    return LoadOptions(
        lora=lora,
        device=device,
        dtype=None if dtype == "auto" else DType(dtype, where="--dtype"),
        load_in_4bit=load_in_4bit,
        load_in_8bit=load_in_8bit,
        trust_remote_code=trust_remote_code,
        threads=threads,
        gpu_layers=gpu_layers,
        repack=repack,
        rope=rope_options(rope_scaling, rope_factor, rope_freq_base),
    )


def with_model_loading(command: Callable) -> Callable:
    """Give ``command`` the model-loading group after its own options; it receives the group as ``load``
    (a :class:`LoadOptions`), its other parameters as declared. Typer reads the extended signature."""
    hints = typing.get_type_hints(command, include_extras=True)
    own = [p.replace(annotation=hints[p.name]) for p in inspect.signature(command).parameters.values() if p.name != "load"]
    names = [p.name for p in MODEL_LOADING]

    @functools.wraps(command)
    def run(**values: Any) -> Any:
        group = {name: values.pop(name) for name in names}
        return command(**values, load=load_options(**group))

    signature = inspect.Signature([*own, *MODEL_LOADING])
    run.__signature__ = signature  # type: ignore[attr-defined]  # mypy has no function attributes; inspect.signature reads it
    run.__annotations__ = {p.name: p.annotation for p in signature.parameters.values()}
    return run


# An Ollama Modelfile beside a GGUF (convert-gguf, quantize).
ModelfileOpt = Annotated[
    bool, typer.Option("--modelfile", help="Also write an Ollama Modelfile beside the GGUF (X.gguf → X.Modelfile) for 'ollama create NAME -f X.Modelfile'.")
]
ModelfileTemplateOpt = Annotated[
    str,
    typer.Option(
        "--template", help="Chat template for --modelfile: alpaca, llama2, llama3, chatml, or auto (the model's own, when it is one of these)."
    ),
]
ModelfileSystemOpt = Annotated[
    Optional[str], typer.Option("--system", help="System prompt for --modelfile (default: the template's own, if it has one).")
]

def rope_options(scaling: Optional[str], factor: Optional[float], freq_base: Optional[float]):
    """The :class:`~cnllm.core.rope.RopeOptions` of the three rope flags (checked), or None when none is given."""
    from cnllm.core.config import build_options
    from cnllm.core.rope import RopeOptions

    if scaling is None and factor is None and freq_base is None:
        return None
    return build_options(RopeOptions, {"scaling": scaling, "factor": factor, "freq_base": freq_base})


def warn_beyond_trained(n_ctx: Optional[int], trained: Optional[int], rope) -> None:
    """Warn (stderr) when the context runs past the trained one with no rope scaling chosen."""
    from cnllm.cli import output
    from cnllm.core.rope import beyond_trained_warning

    if (message := beyond_trained_warning(n_ctx, trained, rope)) is not None:
        output.print_warning(message)
