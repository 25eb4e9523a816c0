"""``cnllm merge-lora``: merge LoRA adapters into a base model, streaming tensor by tensor."""

from __future__ import annotations

from enum import Enum
from pathlib import Path
from typing import Annotated, List, Optional

import typer

from cnllm.cli import output
from cnllm.cli.options import DTYPE_WORDS, ForceOpt, JsonOpt, MaxShardSizeOpt, OutputDirArg
from cnllm.core.errors import CheckFailed
from cnllm.core.tensors import DEFAULT_SHARD_SIZE


class MergeFormat(str, Enum):
    hf = "hf"
    pth = "pth"


def merge_lora(
    base: Annotated[Path, typer.Option("--base", "-b", help="Base model directory (Hugging Face safetensors or .bin shards).")],
    lora: Annotated[
        List[Path], typer.Option("--lora", "-l", help="PEFT LoRA adapter directory; repeat to apply several in the order given.")
    ],
    output_dir: OutputDirArg,
    dtype: Annotated[Optional[str], typer.Option("--dtype", help=f"Output dtype: {DTYPE_WORDS} (default: the base's).")] = None,
    max_shard_size: MaxShardSizeOpt = DEFAULT_SHARD_SIZE,
    output_format: Annotated[
        MergeFormat, typer.Option("--format", help="hf: Hugging Face directory; pth: Meta consolidated.NN.pth + params.json.")
    ] = MergeFormat.hf,
    shards: Annotated[int, typer.Option("--shards", min=1, help="Number of consolidated.NN.pth files (--format pth).")] = 1,
    verify: Annotated[
        bool, typer.Option("--verify", help="Compare logits of PEFT's base+adapters (unmerged) with the merged output; exit 1 above tolerance.")
    ] = False,
    tolerance: Annotated[
        Optional[float], typer.Option("--tolerance", min=0, help="Max logit difference for --verify (default: 1e-3 fp32, 5e-2 fp16, 0.2 bf16).")
    ] = None,
    force: ForceOpt = False,
    json_: JsonOpt = False,
) -> None:
    """Merge LoRA adapters into a base model: W += scale·B·A in fp32, one tensor at a time.

    Adapters carrying full embed_tokens/lm_head (extended vocabularies) replace the base's; the tokenizer comes from the last adapter directory that has one. Writes cnllm-merge.json and SHA256SUMS beside the weights.

    Example: cnllm merge-lora --base llama-7b --lora chinese-llama-plus-lora --lora chinese-alpaca-plus-lora -o alpaca-plus-7b --dtype fp16
    """
    from cnllm.core.config import build_options
    from cnllm.core.merge import MergeOptions, merge_lora as run_merge

    options = build_options(
        MergeOptions,
        {"dtype": dtype, "max_shard_size": max_shard_size, "format": output_format.value, "shards": shards, "verify": verify, "tolerance": tolerance},
    )
    result = run_merge(base, lora, output_dir, options, force=force, progress=output.CliProgress())
    for note in result.notes:
        output.print_note(note)
    document = result.to_dict()
    if json_:
        output.print_json(document)
    else:
        console = output.stdout()
        console.print(
            f"merged {len(document['adapters'])} adapter(s) into {document['output']} ({document['format']}, {document['dtype']}, "
            f"{len(document['files'])} files, {output.human_bytes(document['total_bytes'])}) in {document['seconds']:.1f}s",
            markup=False,
            highlight=False,
        )
        vocab = document["vocab"]
        console.print(
            f"{document['updated']} tensors updated, {document['replaced']} replaced; vocabulary {vocab['embedding']} rows"
            + (f", tokenizer {vocab['tokenizer']} from {document['tokenizer_from']}" if document["tokenizer_from"] else ""),
            markup=False,
            highlight=False,
        )
        report = document["verify"]
        if report is not None:
            console.print(
                f"verify {'OK' if report['passed'] else 'FAILED'}: max logit difference {report['max_abs_diff']:.3g} "
                f"(tolerance {report['tolerance']:g}, {report['tokens']} tokens)",
                markup=False,
                highlight=False,
            )
    problems = result.problems()
    if problems:
        raise CheckFailed("; ".join(problems))
