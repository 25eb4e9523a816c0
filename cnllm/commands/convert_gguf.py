"""``cnllm convert-gguf``: a Hugging Face LLaMA checkpoint → GGUF for llama.cpp, Ollama and LM Studio."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Optional

import typer

from cnllm.cli import output
from cnllm.cli.options import ForceOpt, JsonOpt, ModelfileOpt, ModelfileSystemOpt, ModelfileTemplateOpt
from cnllm.core.errors import UsageError


def convert_gguf(
    model_dir: Annotated[Path, typer.Argument(help="Hugging Face model directory (config.json, weights, tokenizer).")],
    output_file: Annotated[
        Optional[Path], typer.Option("--output", "-o", dir_okay=False, help="The GGUF file to write (atomically).")
    ] = None,
    outtype: Annotated[
        str,
        typer.Option(
            "--outtype",
            help="Type of the 2-D weights (norms stay f32): f32, f16, bf16, q8_0 or a dtype word (fp16, float16, half, …); "
            "auto keeps the checkpoint's bf16/f16, else f16.",
        ),
    ] = "auto",
    vocab_only: Annotated[bool, typer.Option("--vocab-only", help="Write only the tokenizer and metadata (no tensors).")] = False,
    pre_tokenizer: Annotated[
        Optional[str],
        typer.Option("--pre-tokenizer", help="llama.cpp BPE pre-tokenizer name (e.g. llama-bpe) when it cannot be read from tokenizer.json."),
    ] = None,
    modelfile: ModelfileOpt = False,
    template: ModelfileTemplateOpt = "auto",
    system: ModelfileSystemOpt = None,
    force: ForceOpt = False,
    json_: JsonOpt = False,
) -> None:
    """Convert a LLaMA 1/2/3, Chinese-LLaMA/Alpaca, Mistral or Qwen2 checkpoint to GGUF, one tensor at a time.

    Names, q/k permutation, types and metadata follow llama.cpp's convert_hf_to_gguf.py (byte for byte;
    families: cnllm/core/architectures.py). Vocabulary
    sizes, tokenizer files and weight headers are checked before anything is written.

    Example: cnllm convert-gguf chinese-alpaca-merged/ -o chinese-alpaca-f16.gguf --outtype f16

    Example: cnllm convert-gguf chinese-alpaca-merged/ -o alpaca.gguf --modelfile --template alpaca (then: ollama create alpaca -f alpaca.Modelfile)
    """
    from cnllm.core.config import build_options
    from cnllm.core.gguf import ollama
    from cnllm.core.gguf.convert import ConvertOptions, convert_to_gguf

    if output_file is None:
        raise UsageError("missing --output/-o: the GGUF file to write")
    if not modelfile and (template != "auto" or system is not None):
        raise UsageError("--template and --system describe the Modelfile; add --modelfile")
    options = build_options(ConvertOptions, {"outtype": outtype, "vocab_only": vocab_only, "pre_tokenizer": pre_tokenizer})
    plan = None
    if modelfile:
        jinja = ollama.hf_chat_template(model_dir) if model_dir.is_dir() else None
        plan = ollama.plan_modelfile(output_file, template=template, system=system, jinja_source=jinja, source=f"{model_dir}'s tokenizer_config.json", force=force)
    result = convert_to_gguf(model_dir, output_file, options, force=force, progress=output.CliProgress())
    document = result.to_dict()
    if plan is not None:
        ollama.write_modelfile(plan, output_file)
        document["modelfile"] = plan.to_dict()
    if json_:
        output.print_json(document)
        return
    what = "vocabulary" if document["vocab_only"] else f"{document['tensors']} tensors, {document['parameters']:,} parameters"
    tokenizer = document["tokenizer"]
    output.stdout().print(
        f"wrote {document['output']} ({output.human_bytes(document['bytes'])}, {document['outtype']}, {what}; "
        f"tokenizer {tokenizer['model']}/{tokenizer['pre']}, {tokenizer['tokens']} tokens) in {document['seconds']:.1f}s",
        markup=False,
        highlight=False,
    )
    if plan is not None:
        output.stdout().print(f"wrote {plan.path} ({plan.template} template); ollama create NAME -f {plan.path}", markup=False, highlight=False)
