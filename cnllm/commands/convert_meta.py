"""``cnllm convert-meta``: an original Meta LLaMA checkpoint → a Hugging Face model directory."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Optional

import typer

from cnllm.cli import output
from cnllm.cli.options import DTYPE_WORDS, ForceOpt, JsonOpt, MaxShardSizeOpt, OutputDirArg
from cnllm.core.tensors import DEFAULT_SHARD_SIZE


def convert_meta(
    source: Annotated[Path, typer.Argument(help="Meta checkpoint folder: params.json and consolidated.00.pth (… .NN.pth).")],
    output_dir: OutputDirArg,
    dtype: Annotated[Optional[str], typer.Option("--dtype", help=f"Output dtype: {DTYPE_WORDS} (default: the checkpoint's).")] = None,
    max_shard_size: MaxShardSizeOpt = DEFAULT_SHARD_SIZE,
    tokenizer: Annotated[
        Optional[Path],
        typer.Option(
            "--tokenizer",
            help="tokenizer.model (SentencePiece or Llama-3 tiktoken) or a tokenizer folder (default: the checkpoint folder's, else its parent's).",
        ),
    ] = None,
    max_position_embeddings: Annotated[
        Optional[int],
        typer.Option(
            "--max-position-embeddings", min=1, help="Context length (default: params.json's max_seq_len, else 2048 LLaMA-1, 4096 LLaMA-2, 8192 Llama-3)."
        ),
    ] = None,
    force: ForceOpt = False,
    json_: JsonOpt = False,
) -> None:
    """Convert a Meta LLaMA checkpoint (params.json + consolidated.NN.pth) to a Hugging Face model, one layer at a time.

    Model-parallel parts are joined, q/k rows permuted as Hugging Face's LLaMA expects, LLaMA-1/2/3 with GQA, rope_theta and the feed-forward width from params.json; the tokenizer becomes Hugging Face files. Writes cnllm-convert-meta.json and SHA256SUMS beside the weights.

    Example: cnllm convert-meta llama-2-7b/ -o llama-2-7b-hf --dtype fp16
    """
    from cnllm.core.config import build_options
    from cnllm.core.meta import MetaOptions, convert_meta as run_convert

    options = build_options(
        MetaOptions, {"dtype": dtype, "max_shard_size": max_shard_size, "tokenizer": tokenizer, "max_position_embeddings": max_position_embeddings}
    )
    result = run_convert(source, output_dir, options, force=force, progress=output.CliProgress())
    for note in result.notes:
        output.print_note(note)
    document = result.to_dict()
    if json_:
        output.print_json(document)
        return
    config, tokenizer_info = document["config"], document["tokenizer"]
    console = output.stdout()
    console.print(
        f"converted {document['generation']} checkpoint ({document['shards']} part(s), {document['tensors']} tensors) into {document['output']} "
        f"({document['dtype']}, {len(document['files'])} files, {output.human_bytes(document['total_bytes'])}) in {document['seconds']:.1f}s",
        markup=False,
        highlight=False,
    )
    console.print(
        f"{config['num_hidden_layers']} layers, hidden {config['hidden_size']}, {config['num_attention_heads']} heads "
        f"({config['num_key_value_heads']} key/value), ffn {config['intermediate_size']}, vocab {config['vocab_size']}, "
        f"rope_theta {config['rope_theta']:g}, context {config['max_position_embeddings']}"
        + (f"; tokenizer {tokenizer_info['kind']} ({tokenizer_info['tokens']} tokens)" if tokenizer_info else "; no tokenizer"),
        markup=False,
        highlight=False,
    )
