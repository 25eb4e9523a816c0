"""``cnllm vocab``: train a Chinese vocabulary, merge it into a LLaMA tokenizer, inspect tokenizers."""

from __future__ import annotations

from enum import Enum
from pathlib import Path
from typing import Annotated, List, Optional

import click
import typer

from cnllm.cli import output
from cnllm.cli.options import NEW_ROW_INIT_HELP, ForceOpt, JsonOpt, OutputDirArg
from cnllm.core.embeddings import DEFAULT_INIT, INIT_METHODS
from cnllm.core.tokenizers.train import MAX_VOCAB_SIZE

app = typer.Typer(
    help="Train a Chinese vocabulary, merge it into a LLaMA tokenizer, extend a model to it, and inspect tokenizers.", no_args_is_help=True
)


class ModelType(str, Enum):
    bpe = "bpe"
    unigram = "unigram"


class Scores(str, Enum):
    ranked = "ranked"
    zero = "zero"


@app.command()
def train(
    corpus: Annotated[List[Path], typer.Argument(help="Text files (one document per line), JSONL with a 'text' field, or directories.")],
    output_file: Annotated[Path, typer.Option("--output", "-o", dir_okay=False, help="The SentencePiece model to write (atomically).")],
    vocab_size: Annotated[int, typer.Option("--vocab-size", min=8, max=MAX_VOCAB_SIZE, help="Pieces in the model.")] = 20000,
    model_type: Annotated[ModelType, typer.Option("--model-type", help="SentencePiece algorithm.")] = ModelType.bpe,
    character_coverage: Annotated[
        float, typer.Option("--character-coverage", min=0.98, max=1.0, help="Share of characters covered by single-character pieces.")
    ] = 0.9995,
    input_sentence_size: Annotated[
        int, typer.Option("--input-sentence-size", min=0, help="Sample this many lines of a big corpus (0: use all).")
    ] = 0,
    threads: Annotated[Optional[int], typer.Option("--threads", min=1, help="Training threads (default: number of CPUs).")] = None,
    force: ForceOpt = False,
    json_: JsonOpt = False,
) -> None:
    """Train a SentencePiece vocabulary with LLaMA's settings (byte fallback, split digits, identity normalizer).

    Lines that are not valid UTF-8 are skipped and counted.

    Example: cnllm vocab train corpus/ --vocab-size 20000 -o zh.model
    """
    from cnllm.core.config import build_options
    from cnllm.core.tokenizers.train import TrainVocabOptions, train_vocab

    values = {
        "vocab_size": vocab_size,
        "model_type": model_type.value,
        "character_coverage": character_coverage,
        "input_sentence_size": input_sentence_size,
        "threads": threads,
    }
    result = train_vocab(corpus, output_file, build_options(TrainVocabOptions, values), force=force, progress=output.CliProgress())
    document = result.to_dict()
    stats = document["corpus"]
    if stats["invalid_utf8_lines"]:
        output.print_warning(f"skipped {stats['invalid_utf8_lines']} lines that are not valid UTF-8")
    if stats["invalid_json_lines"]:
        output.print_warning(f"skipped {stats['invalid_json_lines']} JSONL lines without a text field")
    if json_:
        output.print_json(document)
    else:
        output.stdout().print(
            f"wrote {document['output']}: {document['pieces']} pieces ({document['model_type']}) in {document['seconds']:.1f}s from "
            f"{stats['lines']} lines, {stats['characters']} characters ({output.human_bytes(stats['bytes'])}) in {stats['files']} files",
            markup=False,
            highlight=False,
        )


@app.command()
def merge(
    base: Annotated[Path, typer.Option("--base", help="LLaMA tokenizer: tokenizer.model, tokenizer.json (Llama-3) or a directory holding one.")],
    add: Annotated[List[Path], typer.Option("--add", help="SentencePiece model or word list (one token per line); repeatable.")],
    output_dir: OutputDirArg,
    scores: Annotated[
        Scores, typer.Option("--scores", help="New pieces' scores: 'ranked' (above the base, exact tokenizer.json) or 'zero' (the published method).")
    ] = Scores.ranked,
    pad_to_multiple_of: Annotated[
        Optional[int], typer.Option("--pad-to-multiple-of", min=1, help="Pad with unused pieces to a multiple of N (e.g. 64).")
    ] = None,
    add_pad_token: Annotated[bool, typer.Option("--add-pad-token", help="Add a <pad> special token right after the base vocabulary.")] = False,
    force: ForceOpt = False,
    json_: JsonOpt = False,
) -> None:
    """Append the pieces of ADD that BASE lacks; base ids stay; write a Hugging Face tokenizer directory.

    Example: cnllm vocab merge --base llama-2/tokenizer.model --add zh.model -o merged-tokenizer/
    """
    from cnllm.core.config import build_options
    from cnllm.core.tokenizers.merge import MergeVocabOptions, merge_vocab

    values = {"scores": scores.value, "add_pad_token": add_pad_token, "pad_to_multiple_of": pad_to_multiple_of}
    result = merge_vocab(base, add, output_dir, build_options(MergeVocabOptions, values), force=force, progress=output.CliProgress())
    for warning in result.warnings:
        output.print_warning(warning)
    if json_:
        output.print_json(result.to_dict())
        return
    output.print_table(
        None,
        ["add", "kind", "candidates", "added"],
        [(s.path, s.kind, s.candidates, s.added) for s in result.sources],
    )
    details = [f"{result.already_present} already present"]
    if result.skipped:
        why = "byte/control pieces" if result.family == "spm" else "byte/control pieces or spanning several pre-tokens"
        details.append(f"{result.skipped} skipped ({why})")
    if result.unreachable:
        details.append(f"{result.unreachable} not added: unreachable without changing base merges")
    if result.unproducible:
        details.append(f"{result.unproducible} new pieces no text can produce (no split into two pieces)")
    if result.padding:
        details.append(f"{result.padding} unused padding pieces")
    if result.pad_token_id is not None:
        details.append(f"<pad> = {result.pad_token_id}")
    output.stdout().print(
        f"wrote {result.output}: {result.base_size} → {result.final_size} tokens, {result.added} added "
        f"({', '.join(details)}) in {result.seconds:.2f}s",
        markup=False,
        highlight=False,
    )


@app.command("extend-model")
def extend_model(
    model: Annotated[Path, typer.Option("--model", "-m", file_okay=False, help="Base model directory (Hugging Face format, with its own tokenizer).")],
    tokenizer: Annotated[Path, typer.Option("--tokenizer", help="The merged tokenizer directory (from `cnllm vocab merge`).")],
    output_dir: OutputDirArg,
    new_row_init: Annotated[str, typer.Option("--new-row-init", click_type=click.Choice(INIT_METHODS), help=NEW_ROW_INIT_HELP)] = DEFAULT_INIT,
    pad_to_multiple_of: Annotated[int, typer.Option("--pad-to-multiple-of", min=1, help="Embedding rows padded to a multiple of N (as pt pads them).")] = 64,
    trust_remote_code: Annotated[bool, typer.Option("--trust-remote-code", help="Allow the model directory's own Python code to run.")] = False,
    force: ForceOpt = False,
    json_: JsonOpt = False,
) -> None:
    """Grow a model's embeddings to a merged tokenizer and initialise the new rows, without training (step 0).

    The result is a complete model folder: evaluate it (`cnllm eval ppl`), convert it, chat with it, or train it.

    Example: cnllm vocab extend-model -m llama-2-7b --tokenizer merged-tokenizer -o llama-2-7b-zh-step0
    """
    from cnllm.core.embeddings import extend_model as extend

    result = extend(model, tokenizer, output_dir, method=new_row_init, multiple=pad_to_multiple_of, force=force,
                    trust_remote_code=trust_remote_code, progress=output.CliProgress())
    document = result.to_dict()
    if json_:
        output.print_json(document)
        return
    rows = document["new_rows"]
    fallback = ", ".join(f"{n} {why}" for why, n in rows["mean_fallback"].items()) or "none"
    output.stdout().print(
        f"wrote {document['output']}: {rows['base_tokens']} → {rows['tokens']} tokens, embedding rows {document['rows_before']} → "
        f"{document['rows']} ({document['method']}: {rows['decomposed']} from their base pieces, {rows['mean_pieces']} pieces each on "
        f"average; at the mean: {fallback}) in {document['seconds']:.1f}s",
        markup=False,
        highlight=False,
    )


def _rate(value: float) -> str:
    return f"{100 * value:.2f}%"


@app.command()
def inspect(
    tokenizer: Annotated[Path, typer.Argument(help="Tokenizer directory, tokenizer.model or tokenizer.json.")],
    text: Annotated[Optional[Path], typer.Option("--text", help="Text (or JSONL) to measure the tokenizer on.")] = None,
    compare: Annotated[Optional[Path], typer.Option("--compare", help="Another tokenizer to measure side by side.")] = None,
    json_: JsonOpt = False,
) -> None:
    """Vocabulary size, type and special tokens; with --text: tokens, characters per token, byte-fallback and unknown rates, round trip.

    Example: cnllm vocab inspect merged-tokenizer/ --text held-out.txt --compare llama-2/
    """
    from cnllm.core.tokenizers.inspect import inspect_tokenizer, token_ratio

    results = [inspect_tokenizer(tokenizer, text)]
    if compare is not None:
        results.append(inspect_tokenizer(compare, text))
    ratio = token_ratio(results[0], results[1]) if len(results) == 2 else None
    if json_:
        document: dict[str, object] = {"tokenizers": [r.to_dict() for r in results]}
        if compare is not None:
            document["token_ratio"] = round(ratio, 4) if ratio is not None else None
        output.print_json(document)
        return
    rows = [
        ("type", *(r.kind for r in results)),
        ("vocabulary size", *(r.vocab_size for r in results)),
        ("special tokens", *(_specials(r.special_tokens) for r in results)),
    ]
    if text is not None:
        stats = [r.text for r in results if r.text is not None]  # each of them: every tokenizer measured the text
        rows += [
            ("lines", *(s.lines for s in stats)),
            ("characters", *(s.characters for s in stats)),
            ("tokens", *(s.tokens for s in stats)),
            ("characters / token", *(f"{s.chars_per_token:.3f}" for s in stats)),
            ("Chinese characters / token", *(f"{s.cjk_per_token:.3f}" for s in stats)),
            ("byte tokens", *(_rate(s.byte_rate) for s in stats)),
            ("unknown tokens", *(_rate(s.unknown_rate) for s in stats)),
            ("round trip", *("ok" if s.roundtrip_failures == 0 else f"{s.roundtrip_failures} lines differ" for s in stats)),
        ]
    output.print_table(None, ["", *(str(r.path) for r in results)], rows)
    if ratio is not None:
        output.stdout().print(
            f"{results[0].path} needs {ratio:.3f}× the tokens of {results[1].path} on {text}", markup=False, highlight=False
        )


def _specials(specials: dict[str, int], shown: int = 6) -> str:
    items = [f"{name}={index}" for name, index in list(specials.items())[:shown]]
    if len(specials) > shown:
        items.append(f"… ({len(specials)} in all)")
    return " ".join(items)
