"""Reusable ``Annotated`` option types: one definition per option, shared by every command."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Optional

import click
import typer

from cnllm.core.rope import INFERENCE_METHODS
from cnllm.core.templates import PROMPT_TEMPLATE_NAMES

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

# The one dtype vocabulary (cnllm.core.dtypes), spelled out in every --dtype / --precision help.
DTYPE_WORDS = "fp16 (float16, half), bf16 (bfloat16) or fp32 (float32, float)"

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

# Rows for the tokens a merged vocabulary adds (pt, sft, align, vocab extend-model): cnllm.core.embeddings.
NEW_ROW_INIT_HELP = (
    "How embedding rows for tokens the tokenizer adds start: subword-mean (the mean of the base pieces each new token "
    "splits into, so the model keeps what it knew) or mean (the mean of all rows)."
)

# Loading a model for generation or scoring (chat, serve, eval).
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
        help="Context window in tokens (default: the model's, at most 4096 for GGUF, or trained × --rope-factor); beyond the trained context, choose a --rope-scaling.",
    ),
]
# Context extension at load time (chat, serve, eval), one meaning on both backends (cnllm.core.rope).
RopeScalingOpt = Annotated[
    Optional[str],
    typer.Option(
        "--rope-scaling",
        click_type=click.Choice(INFERENCE_METHODS),
        help="RoPE context extension: none, linear (position interpolation), ntk (NTK-aware base), ntk-auto (adaptive NTK "
        "from the sequence length, no factor needed), dynamic (dynamic NTK), yarn (default: the model's own setting).",
    ),
]
RopeFactorOpt = Annotated[
    Optional[float],
    typer.Option("--rope-factor", min=1.0, help="Context extension factor for linear, ntk, dynamic, yarn (default: context / trained context)."),
]
RopeFreqBaseOpt = Annotated[Optional[float], typer.Option("--rope-freq-base", min=0.0, help="Override the RoPE base frequency (theta).")]
ThreadsOpt = Annotated[Optional[int], typer.Option("--threads", min=1, help="CPU threads for llama.cpp (default: llama.cpp's choice).")]
RepackOpt = Annotated[
    Optional[bool],
    typer.Option(
        "--repack/--no-repack",
        show_default=False,
        help="llama.cpp: repack the weights into its CPU-optimised layouts (llama.cpp's default) or keep them as stored "
        "(llama.cpp's --no-repack). Default: on, off on CPUs with AMX, where llama.cpp's AMX weights crash; "
        "CNLLM_LLAMA_REPACK=on|off|auto sets the default (docs/cpu.md).",
    ),
]
GpuLayersOpt = Annotated[int, typer.Option("--gpu-layers", min=-1, help="Layers llama.cpp offloads to the GPU (-1: all).")]
LoraOpt = Annotated[Optional[Path], typer.Option("--lora", "-l", file_okay=False, help="Apply this PEFT LoRA adapter (not merged) to a Hugging Face model.")]
LoadIn4bitOpt = Annotated[bool, typer.Option("--load-in-4bit", help="Quantise a Hugging Face model to 4 bits on load (CUDA + bitsandbytes).")]
LoadIn8bitOpt = Annotated[bool, typer.Option("--load-in-8bit", help="Quantise a Hugging Face model to 8 bits on load (CUDA + bitsandbytes).")]
TrustRemoteCodeOpt = Annotated[bool, typer.Option("--trust-remote-code", help="Allow the model directory's own Python code to run.")]
VerboseOpt = Annotated[bool, typer.Option("--verbose", "-v", help="Show the libraries' own logs (llama.cpp load messages, transformers).")]

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
