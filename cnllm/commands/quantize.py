"""``cnllm quantize``: quantize a GGUF with llama.cpp's own quantizer."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Optional

import typer

from cnllm.cli import output
from cnllm.cli.options import ForceOpt, JsonOpt, ModelfileOpt, ModelfileSystemOpt, ModelfileTemplateOpt
from cnllm.core.errors import UsageError


def _list_types(json_: bool) -> None:
    from cnllm.core.gguf.quantize import ALIASES, QUANT_TYPES

    if json_:
        output.print_json(
            {
                "types": [
                    {
                        "name": q.name,
                        "main_type": q.main_type,
                        "bits_per_weight": round(q.bits_per_weight, 4),
                        "description": q.description,
                        "needs_imatrix": q.needs_imatrix,
                    }
                    for q in QUANT_TYPES
                ],
                "aliases": ALIASES,
            }
        )
        return
    rows = [
        (q.name, q.main_type, f"{q.bits_per_weight:.3g}", "yes" if q.needs_imatrix else "", q.description) for q in QUANT_TYPES
    ]
    output.print_table(None, ["type", "main tensor type", "bits/weight", "needs --imatrix", "llama.cpp's note"], rows)
    output.stdout().print(
        "aliases: " + ", ".join(f"{a} = {t}" for a, t in ALIASES.items()) + ". Bits/weight is the main type's; mixes such as "
        "Q4_K_M keep some tensors at a higher type.",
        markup=False,
        highlight=False,
    )


def quantize(
    input_file: Annotated[Optional[Path], typer.Argument(help="The f16/bf16/f32 GGUF to quantize.")] = None,
    output_file: Annotated[
        Optional[Path], typer.Option("--output", "-o", dir_okay=False, help="The quantized GGUF to write (atomically).")
    ] = None,
    type_: Annotated[Optional[str], typer.Option("--type", help="Quantization type, e.g. Q4_K_M or Q8_0 (see --list-types).")] = None,
    list_types: Annotated[bool, typer.Option("--list-types", help="List the quantization types with bits per weight and exit.")] = False,
    imatrix: Annotated[
        Optional[Path], typer.Option("--imatrix", exists=True, dir_okay=False, help="Importance matrix (GGUF, from llama-imatrix).")
    ] = None,
    threads: Annotated[Optional[int], typer.Option("--threads", min=1, help="Quantization threads (default: all cores).")] = None,
    allow_requantize: Annotated[
        bool, typer.Option("--allow-requantize", help="Accept an already-quantized input (quality suffers).")
    ] = False,
    leave_output_tensor: Annotated[
        bool, typer.Option("--leave-output-tensor", help="Keep output.weight unquantized (bigger, slightly better).")
    ] = False,
    output_tensor_type: Annotated[
        Optional[str], typer.Option("--output-tensor-type", help="ggml type for output.weight, e.g. q8_0 or f16.")
    ] = None,
    token_embedding_type: Annotated[
        Optional[str], typer.Option("--token-embedding-type", help="ggml type for token_embd.weight, e.g. q8_0 or f16.")
    ] = None,
    verbose: Annotated[bool, typer.Option("--verbose", "-v", help="Show llama.cpp's own log on stderr.")] = False,
    modelfile: ModelfileOpt = False,
    template: ModelfileTemplateOpt = "auto",
    system: ModelfileSystemOpt = None,
    force: ForceOpt = False,
    json_: JsonOpt = False,
) -> None:
    """Quantize a GGUF (from cnllm convert-gguf) with llama.cpp's quantizer, then summarize sizes and bits per weight.

    Extended vocabularies (49,953 or 55,296 tokens) quantize like any other; tensors whose rows are not a
    multiple of a k-quant's 256 block fall back per tensor, as in llama.cpp. Compare quality with 'cnllm eval ppl'.

    Example: cnllm quantize chinese-alpaca-f16.gguf -o chinese-alpaca-q4_k_m.gguf --type Q4_K_M
    """
    if list_types:
        _list_types(json_)
        return
    if input_file is None:
        raise UsageError("missing the input GGUF (cnllm quantize IN.gguf -o OUT.gguf --type TYPE)")
    if output_file is None:
        raise UsageError("missing --output/-o: the quantized GGUF to write")
    if type_ is None:
        raise UsageError("missing --type, e.g. --type Q4_K_M (see 'cnllm quantize --list-types')")
    if not modelfile and (template != "auto" or system is not None):
        raise UsageError("--template and --system describe the Modelfile; add --modelfile")
    from cnllm.core.config import build_options
    from cnllm.core.gguf import ollama
    from cnllm.core.gguf.quantize import QuantizeOptions, quantize_gguf

    values = {
        "type": type_,
        "threads": threads,
        "allow_requantize": allow_requantize,
        "leave_output_tensor": leave_output_tensor,
        "output_tensor_type": output_tensor_type,
        "token_embedding_type": token_embedding_type,
        "imatrix": imatrix,
    }
    options = build_options(QuantizeOptions, values)
    plan = None
    if modelfile:
        jinja = ollama.gguf_chat_template(input_file) if input_file.is_file() else None
        plan = ollama.plan_modelfile(output_file, template=template, system=system, jinja_source=jinja, source=f"{input_file}'s tokenizer.chat_template", force=force)
    result = quantize_gguf(input_file, output_file, options, force=force, verbose=verbose, progress=output.CliProgress())
    document = result.to_dict()
    if plan is not None:
        ollama.write_modelfile(plan, output_file)
        document["modelfile"] = plan.to_dict()
    if json_:
        output.print_json(document)
        return
    types = ", ".join(f"{count} {name}" for name, count in sorted(document["tensor_types"].items()))
    output.stdout().print(
        f"wrote {document['output']} ({document['type']}): {output.human_bytes(document['input_bytes'])} -> {output.human_bytes(document['output_bytes'])} "
        f"({document['ratio']:.2f}x smaller), {document['bits_per_weight']:.2f} bits per weight, tensors: {types}; {document['seconds']:.1f}s",
        markup=False,
        highlight=False,
    )
    if plan is not None:
        output.stdout().print(f"wrote {plan.path} ({plan.template} template); ollama create NAME -f {plan.path}", markup=False, highlight=False)
    if document["fallback_tensors"]:
        output.print_note(
            f"{document['fallback_tensors']} tensor(s) had rows not divisible by the type's block and used llama.cpp's fallback type"
        )
