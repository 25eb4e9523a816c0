"""``cnllm eval``: perplexity of text files, C-Eval/CMMLU/MMLU multiple-choice accuracy and preference accuracy
on held-out pairs, on a Hugging Face directory (optionally with an unmerged LoRA adapter) or a GGUF file."""

from __future__ import annotations

from dataclasses import replace
from enum import Enum
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, List, Optional

import click
import typer

from cnllm.cli import output
from cnllm.cli.options import ForceOpt, JsonOpt, ModelArg, OutputFileOpt, TemplateOpt, warn_beyond_trained, with_model_loading
from cnllm.core.errors import UsageError
from cnllm.core.generation.base import LoadOptions

if TYPE_CHECKING:
    from rich.text import Text

app = typer.Typer(
    help="Evaluate a model: perplexity (ppl), multiple-choice exams (mc), preference accuracy (pref), long context (passkey, longbench).",
    no_args_is_help=True,
)


class Format(str, Enum):
    ceval = "ceval"
    cmmlu = "cmmlu"
    mmlu = "mmlu"


def _fmt(value: Optional[float], digits: int = 4) -> str:
    return "—" if value is None else f"{value:.{digits}f}"


def _count(value: Optional[int]) -> str:
    return "—" if value is None else str(value)


def _pct(value: Optional[float]) -> str:
    return "—" if value is None else f"{100 * value:.2f}"


@app.command()
@with_model_loading
def ppl(
    model: ModelArg,
    data: Annotated[List[Path], typer.Option("--data", "-d", help="Text file to score (plain text, or JSONL with a 'text' field); repeat for more.")],
    ctx: Annotated[
        List[int],
        typer.Option("--ctx", min=2, help="Window size in tokens; repeat (--ctx 2048 --ctx 4096 …) for perplexity by context length, beyond the trained one too."),
    ] = [512],  # noqa: B006 - typer reads the default
    stride: Annotated[
        Optional[int], typer.Option("--stride", min=1, help="Slide windows by this many tokens, scoring only new tokens (default: no overlap).")
    ] = None,
    llamacpp_compatible: Annotated[
        bool, typer.Option("--llamacpp-compatible", help="Score as llama.cpp's perplexity tool: whole chunks, BOS first, second half only.")
    ] = False,
    batch_size: Annotated[int, typer.Option("--batch-size", min=1, help="Windows per forward pass (transformers).")] = 1,
    plot: Annotated[
        Optional[Path], typer.Option("--plot", dir_okay=False, help="With several --ctx: draw perplexity by context length here (.png, .svg, .pdf).")
    ] = None,
    output_file: OutputFileOpt = None,
    force: ForceOpt = False,
    json_: JsonOpt = False,
    load: LoadOptions = LoadOptions(),
) -> None:
    """Perplexity, mean NLL, bits per byte and speed of text files, at one context size or several.

    Example: cnllm eval ppl chinese-llama/ --data zh_heldout.txt --ctx 512
    Example: cnllm eval ppl model-q4_k_m.gguf -d wiki.test.raw --ctx 512 --llamacpp-compatible
    Example: cnllm eval ppl model.gguf -d long.txt --ctx 4096 --ctx 8192 --ctx 16384 --rope-scaling yarn --plot yarn.png
    """
    from cnllm.core.atomic import check_output
    from cnllm.core.config import build_options
    from cnllm.core.evaluation.ppl import PplOptions, evaluate_perplexity_sweep, plot_sweep, write_report, write_sweep_report

    rope = load.rope
    contexts = sorted(set(ctx))
    options = build_options(PplOptions, {"ctx": contexts[0], "stride": stride, "llamacpp_compatible": llamacpp_compatible, "batch_size": batch_size})
    if plot is not None and len(contexts) < 2:
        raise UsageError("--plot draws perplexity by context length: give two or more --ctx values")
    for path in (output_file, plot):
        if path is not None:
            check_output(path, force, inputs=[model, load.lora, *data])
    sweep = evaluate_perplexity_sweep(model, data, options, contexts, load, progress=output.CliProgress())
    warn_beyond_trained(contexts[-1], sweep.trained_context, rope)
    single = sweep.results[0] if len(contexts) == 1 else None
    if output_file is not None:
        if single is not None:
            write_report(single, output_file, force=force)
        else:
            write_sweep_report(sweep, output_file, force=force)
    if plot is not None:
        plot_sweep(sweep, plot, force=force)
    if json_:
        output.print_json(single.to_dict() if single is not None else sweep.to_dict())
        return
    mode = "llama.cpp-compatible" if llamacpp_compatible else (f"stride {stride}" if stride else "non-overlapping")
    backend = sweep.results[0].model["backend"]
    scaling = f", rope {rope.scaling}" if rope is not None and rope.scaling else ""
    if single is not None:
        scores = single.files + ([single.total] if len(single.files) > 1 else [])
        rows = [
            (
                Path(s.path).name if s.path != "total" else output.emphasis("total"),
                _fmt(s.bits_per_char),
                _fmt(s.bits_per_byte),
                _fmt(s.chars_per_token, 3),
                f"{s.ppl:.4f}",
                _fmt(s.tokens_per_second, 1),
            )
            for s in scores
        ]
        output.print_table(
            f"perplexity of {model.name} ({backend}, ctx {contexts[0]}, {mode}{scaling})",
            ["file", "bits/char", "bits/byte", "chars/token", "ppl/token", "tokens/s"],
            rows,
        )
    else:
        by_context = []
        for result in sweep.results:
            for s in result.files + ([result.total] if len(result.files) > 1 else []):
                name = Path(s.path).name if s.path != "total" else "total"
                by_context.append((result.options.ctx, name, _fmt(s.bits_per_char), f"{s.ppl:.4f}", f"{s.seconds:.2f}", _fmt(s.tokens_per_second, 1)))
        trained = sweep.trained_context
        output.print_table(
            f"perplexity by context of {model.name} ({backend}, trained context {trained or '?'}, {mode}{scaling})",
            ["ctx", "file", "bits/char", "ppl/token", "seconds", "tokens/s"],
            by_context,
        )
    output.print_note("bits per character (and per byte) compare models whose tokenizers differ; perplexity per token does not")
    for path in (output_file, plot):
        if path is not None:
            output.print_note(f"wrote {path}")


@app.command()
@with_model_loading
def mc(
    model: ModelArg,
    data: Annotated[Path, typer.Option("--data", "-d", help="Dataset folder (dev/, val/, test/ as published).")],
    format_: Annotated[Format, typer.Option("--format", help="Dataset layout.")] = Format.ceval,
    split: Annotated[Optional[str], typer.Option("--split", help="Split to evaluate (default: val; test for cmmlu, which has no val).")] = None,
    shots: Annotated[int, typer.Option("--shots", "-k", min=0, help="Solved dev examples in each prompt (0 or 5 usually).")] = 5,
    subjects: Annotated[Optional[str], typer.Option("--subjects", help="Comma-separated subject keys (default: all in the split).")] = None,
    template: TemplateOpt = "none",
    batch_size: Annotated[int, typer.Option("--batch-size", min=1, help="Questions per forward pass (transformers).")] = 8,
    ctx: Annotated[int, typer.Option("--ctx", min=8, help="Longest prompt allowed in tokens (llama.cpp context size).")] = 4096,
    out_dir: Annotated[
        Optional[Path],
        typer.Option("--output", "-o", file_okay=False, help="Write results.json, predictions.jsonl (and submission.json for test) here."),
    ] = None,
    force: ForceOpt = False,
    json_: JsonOpt = False,
    load: LoadOptions = LoadOptions(),
) -> None:
    """Multiple-choice accuracy (C-Eval, CMMLU, MMLU) from the option letters' next-token probabilities.

    Example: cnllm eval mc chinese-alpaca/ --data ceval-exam/ --split val --shots 5 -o ceval-val/
    Example: cnllm eval mc model.gguf --data ceval-exam/ --split test --shots 0 --template alpaca -o ceval-test/
    """
    from cnllm.core.atomic import check_output
    from cnllm.core.config import build_options
    from cnllm.core.evaluation.mc import (
        McOptions,
        evaluate_multiple_choice,
        write_outputs,
    )
    chosen = tuple(s.strip() for s in subjects.split(",") if s.strip()) if subjects else ()
    if subjects is not None and not chosen:
        raise UsageError("--subjects is empty; give comma-separated subject keys")
    values = {
        "format": format_.value,
        "split": split,
        "shots": shots,
        "subjects": chosen,
        "template": template,
        "batch_size": batch_size,
        "ctx": ctx,
    }
    options = build_options(McOptions, values)
    if out_dir is not None:
        check_output(out_dir, force, inputs=[model, load.lora, data])
    result = evaluate_multiple_choice(model, data, options, load, progress=output.CliProgress())
    if template == "auto" and result.model.get("template") == "none":
        output.print_note(f"note: {model} has no chat template; prompts are plain continuation, as with --template none (choose one with --template)")
    written = write_outputs(result, out_dir, force=force) if out_dir is not None else []
    if json_:
        document = result.to_dict()
        document["output"] = {"dir": str(out_dir), "files": written} if out_dir is not None else None
        output.print_json(document)
        return
    rows = [
        (s.name, s.display_name if s.display_name != s.name else "", s.category or "", s.questions, _count(s.correct), _pct(s.accuracy))
        for s in result.subjects
    ]
    title = f"{options.format} {options.split}, {options.shots}-shot, template {result.model.get('template', 'none')}: {model.name}"
    output.print_table(title, ["subject", "name", "category", "questions", "correct", "accuracy %"], rows)
    if result.categories:
        output.print_table(
            "by category",
            ["category", "subjects", "questions", "correct", "accuracy %"],
            [(c.name, c.subjects, c.questions, _count(c.correct), _pct(c.accuracy)) for c in result.categories],
        )
    if result.labelled:
        output.stdout().print(
            f"average {_pct(result.average)}% over {len(result.subjects)} subjects · overall {_pct(result.overall)}% of "
            f"{len(result.predictions)} questions · {_fmt(result.questions_per_second, 2)} questions/s",
            markup=False,
            highlight=False,
        )
    else:
        output.stdout().print(
            f"{len(result.predictions)} questions predicted (no answers in this split) · {_fmt(result.questions_per_second, 2)} questions/s",
            markup=False,
            highlight=False,
        )
    if out_dir is not None:
        output.print_note(f"wrote {', '.join(written)} to {out_dir}")


@app.command()
@with_model_loading
def passkey(
    model: ModelArg,
    length: Annotated[
        Optional[List[int]], typer.Option("--length", min=64, help="Context length in tokens to test (repeat) (default: 1024, 2048, 4096).")
    ] = None,
    depth: Annotated[
        Optional[List[float]], typer.Option("--depth", min=0.0, max=1.0, help="Where the key hides, 0 (start) … 1 (end) (repeat) (default: 0, .25, .5, .75, 1).")
    ] = None,
    trials: Annotated[int, typer.Option("--trials", min=1, help="Prompts (each with its own key) per length and depth.")] = 3,
    language: Annotated[str, typer.Option("--language", click_type=click.Choice(["en", "zh"]), help="Filler and question language.")] = "en",
    seed: Annotated[int, typer.Option("--seed", help="Seed of the keys (the filler is fixed).")] = 0,
    plot: Annotated[Optional[Path], typer.Option("--plot", dir_okay=False, help="Draw accuracy by length × depth here (.png, .svg, .pdf).")] = None,
    output_file: OutputFileOpt = None,
    force: ForceOpt = False,
    json_: JsonOpt = False,
    load: LoadOptions = LoadOptions(),
) -> None:
    """Passkey retrieval: a random number hidden at chosen depths of filler text, asked for at the end.

    Example: cnllm eval passkey model.gguf --length 4096 --length 8192 --length 16384 --rope-scaling yarn --plot passkey.png
    Example: cnllm eval passkey chinese-llama/ --language zh --length 2048 --depth 0.5 --trials 10 --json
    """
    from cnllm.core.atomic import check_output
    from cnllm.core.config import build_options
    from cnllm.core.evaluation.passkey import PasskeyOptions, evaluate_passkey, plot_passkey, write_report

    rope = load.rope
    values = {"trials": trials, "language": language, "seed": seed}
    if length:
        values["lengths"] = tuple(sorted(set(length)))
    if depth:
        values["depths"] = tuple(depth)
    options = build_options(PasskeyOptions, values)
    for path in (output_file, plot):
        if path is not None:
            check_output(path, force, inputs=[model, load.lora])
    result = evaluate_passkey(model, options, load, progress=output.CliProgress())
    warn_beyond_trained(max(options.lengths), result.model.get("trained_context"), rope)
    if output_file is not None:
        write_report(result, output_file, force=force)
    if plot is not None:
        plot_passkey(result, plot, force=force)
    if json_:
        output.print_json(result.to_dict())
        return
    lengths = sorted(set(options.lengths))
    rows: list[tuple[str | Text, ...]] = [(f"{d:.2f}", *(_pct(result.cell(n, d).accuracy) for n in lengths)) for d in options.depths]
    rows.append((output.emphasis("all depths"), *(_pct(result.accuracy_by_length()[n]) for n in lengths)))
    scaling = f", rope {rope.scaling}" if rope is not None and rope.scaling else ""
    trained = result.model.get("trained_context")
    output.print_table(
        f"passkey accuracy % of {model.name} ({result.model['backend']}, trained context {trained or '?'}{scaling}, {options.trials} trials, {language})",
        ["depth", *(str(n) for n in lengths)],
        rows,
    )
    for path in (output_file, plot):
        if path is not None:
            output.print_note(f"wrote {path}")


@app.command()
@with_model_loading
def longbench(
    model: ModelArg,
    data: Annotated[Path, typer.Option("--data", "-d", file_okay=False, help="Folder of LongBench's {dataset}.jsonl files (its data/ as published).")],
    datasets: Annotated[
        Optional[str], typer.Option("--datasets", help="Comma-separated datasets, e.g. multifieldqa_zh,dureader,vcsum,lsht (default: every one in --data).")
    ] = None,
    max_length: Annotated[int, typer.Option("--max-length", min=16, help="Longest prompt in tokens; longer ones keep their first and last halves (LongBench's middle truncation).")] = 3500,
    limit: Annotated[Optional[int], typer.Option("--limit", min=1, help="Only the first N samples of each dataset (quick runs).")] = None,
    template: TemplateOpt = "none",
    n_ctx: Annotated[Optional[int], typer.Option("--n-ctx", min=16, help="Context window (default: --max-length plus the longest answer).")] = None,
    out_dir: Annotated[Optional[Path], typer.Option("--output", "-o", file_okay=False, help="Write result.json and pred/{dataset}.jsonl here.")] = None,
    force: ForceOpt = False,
    json_: JsonOpt = False,
    load: LoadOptions = LoadOptions(),
) -> None:
    """LongBench on a local copy of its data: per-dataset prompts, generation lengths and metrics, and the average.

    Example: cnllm eval longbench chinese-alpaca-16k/ -d LongBench/data --datasets multifieldqa_zh,dureader,vcsum,lsht --template auto -o lb/
    Example: cnllm eval longbench model.gguf -d LongBench/data --max-length 7500 --rope-scaling yarn --limit 20 --json
    """
    from cnllm.core.atomic import check_output
    from cnllm.core.config import build_options
    from cnllm.core.evaluation.longbench import LongBenchOptions, evaluate_longbench, write_outputs

    chosen = tuple(d.strip() for d in datasets.split(",") if d.strip()) if datasets else ()
    if datasets is not None and not chosen:
        raise UsageError("--datasets is empty; give comma-separated dataset names")
    options = build_options(LongBenchOptions, {"datasets": chosen, "max_length": max_length, "limit": limit, "template": template})
    if out_dir is not None:
        check_output(out_dir, force, inputs=[model, load.lora, data])
    result = evaluate_longbench(model, data, options, replace(load, n_ctx=n_ctx), progress=output.CliProgress())
    warn_beyond_trained(result.model.get("n_ctx"), result.model.get("trained_context"), load.rope)
    written = write_outputs(result, out_dir, force=force) if out_dir is not None else []
    if json_:
        document = result.to_dict()
        document["output"] = {"dir": str(out_dir), "files": written} if out_dir is not None else None
        output.print_json(document)
        return
    rows: list[tuple[object, ...]] = [(d.dataset, d.samples, d.truncated, f"{d.score:.2f}", f"{d.seconds:.1f}") for d in result.datasets]
    rows.append((output.emphasis("average"), sum(d.samples for d in result.datasets), "", _fmt(result.average, 2), ""))
    output.print_table(
        f"LongBench of {model.name} ({result.model['backend']}, max length {max_length}, Chinese words: {result.segmentation})",
        ["dataset", "samples", "truncated", "score", "seconds"],
        rows,
    )
    if out_dir is not None:
        output.print_note(f"wrote {', '.join(written)} to {out_dir}")


@app.command()
@with_model_loading
def pref(
    model: ModelArg,
    data: Annotated[List[Path], typer.Option("--data", "-d", help="Preference pairs (JSON/JSONL: prompt/chosen/rejected, or chosen/rejected message lists); repeat for more.")],
    template: TemplateOpt = "auto",
    system: Annotated[Optional[str], typer.Option("--system", help="System prompt replacing the template's default.")] = None,
    ctx: Annotated[int, typer.Option("--ctx", min=8, help="Longest prompt + answer in tokens (llama.cpp context size).")] = 2048,
    skip_invalid: Annotated[bool, typer.Option("--skip-invalid", help="Skip malformed records (counted) instead of stopping at the first.")] = False,
    output_file: OutputFileOpt = None,
    force: ForceOpt = False,
    json_: JsonOpt = False,
    load: LoadOptions = LoadOptions(),
) -> None:
    """Preference accuracy: the share of pairs where the model's log-probability per token of chosen beats rejected.

    The summed (unnormalised) figure is reported beside it; measure it before and after cnllm align.

    Example: cnllm eval pref sft-merged/ -d pref_heldout.jsonl --template alpaca
    Example: cnllm eval pref sft-merged/ --lora dpo-lora/ -d pref_heldout.jsonl --json
    """
    from cnllm.core.atomic import check_output
    from cnllm.core.config import build_options
    from cnllm.core.evaluation.pref import PrefOptions, evaluate_preference, write_report

    options = build_options(PrefOptions, {"template": template, "system": system, "ctx": ctx, "skip_invalid": skip_invalid})
    if output_file is not None:
        check_output(output_file, force, inputs=[model, load.lora, *data])
    result = evaluate_preference(model, data, options, load, progress=output.CliProgress())
    document = result.to_dict()
    if result.skipped:
        output.print_note(f"warning: skipped {len(result.skipped)} invalid records (first: {result.skipped[0]})")
    if template == "auto" and result.model.get("template") == "none":
        output.print_note(f"note: {model} has no chat template; prompts are plain continuation, as with --template none (choose one with --template)")
    if output_file is not None:
        write_report(result, output_file, data, force=force)
    if json_:
        output.print_json(document)
        return
    output.print_table(
        f"preference accuracy of {model.name} ({result.model['backend']}, template {result.model.get('template')})",
        ["pairs", "accuracy % (per token)", "accuracy % (summed)", "mean margin (nats/token)", "seconds"],
        [(len(result.pairs), _pct(result.accuracy), _pct(result.accuracy_unnormalized), _fmt(result.mean_margin), _fmt(result.seconds, 1))],
    )
    if output_file is not None:
        output.print_note(f"wrote {output_file}")
