"""The pipeline's steps: each calls one command's core function and records its key figures.

A step reads and updates :class:`~cnllm.core.pipeline.Artifacts` (current model, tokenizer,
adapters, GGUF files) and returns the figures that go into the report. Paths it records are the
final ones (``context.final_path``), since it writes into a temporary folder renamed on success.
"""

from __future__ import annotations

from pathlib import Path

from cnllm.core.errors import CheckFailed, UsageError
from cnllm.core.pipeline import Artifacts, Recipe, StepContext, StepKind

TRAIN_KEYS_NOT_IN_RECIPE = {"model", "tokenizer", "output", "force", "resume"}


def _files(options: dict, key: str, step: str) -> list[Path]:
    value = options.get(key)
    if not value:
        raise UsageError(f"recipe step {step} needs '{key}': one path or a list of paths")
    return [Path(v) for v in (value if isinstance(value, list) else [value])]


def _no_inputs(recipe: Recipe, options: dict, artifacts: Artifacts) -> list[Path]:
    return []


# --- vocab ---------------------------------------------------------------------------------------

VOCAB_TRAIN_KEYS = ("vocab_size", "model_type", "character_coverage", "input_sentence_size", "threads")
VOCAB_MERGE_KEYS = ("scores", "add_pad_token", "pad_to_multiple_of")


def run_vocab(context: StepContext, options: dict) -> dict:
    """Train a Chinese SentencePiece model on ``corpus`` and merge it into the base tokenizer."""
    from cnllm.core.tokenizers.inspect import inspect_tokenizer
    from cnllm.core.tokenizers.merge import merge_vocab
    from cnllm.core.tokenizers.train import train_vocab

    unknown = set(options) - {"corpus", "add", "measure_text", *VOCAB_TRAIN_KEYS, *VOCAB_MERGE_KEYS}
    if unknown:
        raise UsageError(f"recipe step vocab: unknown option(s) {', '.join(sorted(unknown))}")
    corpus = _files(options, "corpus", "vocab")
    trained = train_vocab(corpus, context.folder / "chinese_sp.model", progress=context.progress, **{k: options[k] for k in VOCAB_TRAIN_KEYS if k in options})
    extra = [Path(p) for p in options.get("add", [])]
    merged = merge_vocab(
        context.artifacts.tokenizer,
        [trained.output, *extra],
        context.folder / "tokenizer",
        progress=context.progress,
        **{k: options[k] for k in VOCAB_MERGE_KEYS if k in options},
    )
    context.artifacts.tokenizer = context.final_path(merged.output)
    figures = {"trained_pieces": trained.pieces, "base_vocab": merged.base_size, "merged_vocab": merged.final_size, "added": merged.added}
    measure_text = options.get("measure_text")
    if measure_text:
        before = inspect_tokenizer(context.artifacts.models["base"] if context.recipe.base_tokenizer == context.recipe.base_model else context.recipe.base_tokenizer, measure_text).text
        after = inspect_tokenizer(merged.output, measure_text).text
        figures["chinese_chars_per_token"] = {"before": round(before.cjk_per_token, 3), "after": round(after.cjk_per_token, 3)}
        figures["tokens_on_text"] = {"before": before.tokens, "after": after.tokens}
    return figures


def _vocab_inputs(recipe: Recipe, options: dict, artifacts: Artifacts) -> list[Path]:
    paths = _files(options, "corpus", "vocab") + [Path(p) for p in options.get("add", [])]
    if options.get("measure_text"):
        paths.append(Path(options["measure_text"]))
    return paths + [recipe.base_tokenizer]


# --- pt / sft --------------------------------------------------------------------------------------


def _train(mode: str, context: StepContext, options: dict) -> dict:
    import dataclasses

    from cnllm.core.training.options import TrainOptions
    from cnllm.core.training.trainer import run_training

    known = {f.name for f in dataclasses.fields(TrainOptions)} - TRAIN_KEYS_NOT_IN_RECIPE
    unknown = set(options) - known
    if unknown:
        raise UsageError(f"recipe step {mode}: unknown option(s) {', '.join(sorted(unknown))}")
    values = dict(options)
    for key in ("data", "validation_data"):
        if key in values:
            values[key] = [Path(p) for p in (values[key] if isinstance(values[key], list) else [values[key]])]
    for key in ("peft_path", "deepspeed", "cache_dir"):
        if values.get(key):
            values[key] = Path(values[key])
    train_options = TrainOptions(model=context.artifacts.model, tokenizer=context.artifacts.tokenizer, output=context.folder / "adapter", **values)
    result = run_training(mode, train_options, progress=context.progress)
    context.artifacts.adapters[mode] = context.final_path(result.output)
    figures = {
        "steps": result.steps,
        "train_loss": result.train_loss,
        "eval_loss": {"before": result.eval_loss_before, "after": result.eval_loss},
        "perplexity": {"before": result.perplexity_before, "after": result.perplexity},
        "tokens_per_second": result.tokens_per_second,
        "trainable_parameters": result.trainable_parameters,
    }
    curve = result.output / "loss.png"
    if curve.exists():
        figures["loss_curve"] = str(context.final_path(curve).relative_to(context.recipe.workdir))
    return figures


def _train_inputs(step: str):
    def inputs(recipe: Recipe, options: dict, artifacts: Artifacts) -> list[Path]:
        return _files(options, "data", step) + [Path(p) for p in options.get("validation_data", []) or []]

    return inputs


# --- merge -----------------------------------------------------------------------------------------


def _merge(adapter_key: str):
    def run(context: StepContext, options: dict) -> dict:
        from cnllm.core.merge import merge_lora

        adapter = context.artifacts.adapters.get(adapter_key)
        if adapter is None:
            raise UsageError(f"recipe step merge_{adapter_key} needs the {adapter_key} step before it")
        unknown = set(options) - {"dtype", "max_shard_size", "verify"}
        if unknown:
            raise UsageError(f"recipe step merge_{adapter_key}: unknown option(s) {', '.join(sorted(unknown))}")
        result = merge_lora(context.artifacts.model, [adapter], context.folder / "model", progress=context.progress, **options)
        merged = context.final_path(context.folder / "model")
        context.artifacts.model = context.artifacts.tokenizer = merged
        context.artifacts.models[adapter_key] = merged
        problems = result.problems()
        if problems:
            raise CheckFailed(problems[0])
        figures = {"tensors": result.tensors, "updated": result.updated, "replaced": result.replaced, "vocab_size": result.vocab.embedding}
        if result.verify is not None:
            figures["max_logit_difference"] = result.verify.max_abs_diff
        return figures

    return run


# --- convert / quantize ----------------------------------------------------------------------------


def run_convert(context: StepContext, options: dict) -> dict:
    from cnllm.core.gguf.convert import convert_to_gguf

    outtype = options.get("outtype", "f16")
    result = convert_to_gguf(context.artifacts.model, context.folder / f"{context.recipe.name}-{outtype}.gguf", outtype=outtype, progress=context.progress)
    context.artifacts.gguf[result.outtype] = context.final_path(result.output)
    return {"outtype": result.outtype, "size_bytes": result.bytes_written, "tensors": result.tensor_count, "tokenizer": f"{result.tokenizer_model}/{result.tokenizer_pre}"}


def run_quantize(context: StepContext, options: dict) -> dict:
    from cnllm.core.gguf.quantize import quantize_gguf

    if not context.artifacts.gguf:
        raise UsageError("recipe step quantize needs the convert step before it")
    source_type, source = next(iter(context.artifacts.gguf.items()))
    types = options.get("types") or ["q4_k_m"]
    figures: dict = {"source": {"type": source_type, "size_bytes": source.stat().st_size}}
    for quant_type in types:
        result = quantize_gguf(source, context.folder / f"{context.recipe.name}-{quant_type.lower()}.gguf", quant_type=quant_type, progress=context.progress)
        context.artifacts.gguf[quant_type.lower()] = context.final_path(result.output)
        figures[quant_type.lower()] = {"size_bytes": result.output_size, "bits_per_weight": round(result.bits_per_weight, 3), "seconds": round(result.seconds, 2)}
    return figures


# --- eval ----------------------------------------------------------------------------------------

EVAL_TARGET_DEFAULT = "all"


def _eval_targets(artifacts: Artifacts, wanted) -> dict[str, Path]:
    """Every model the run produced (base, pt, sft, each GGUF), or the names the recipe lists."""
    targets = {name: path for name, path in artifacts.models.items()}
    targets.update({f"gguf-{kind}": path for kind, path in artifacts.gguf.items()})
    if wanted in (None, EVAL_TARGET_DEFAULT):
        return targets
    missing = [name for name in wanted if name not in targets]
    if missing:
        raise UsageError(f"recipe step eval: no model named {', '.join(missing)} (available: {', '.join(targets)})")
    return {name: targets[name] for name in wanted}


def run_eval(context: StepContext, options: dict) -> dict:
    """Perplexity (``ppl``) and multiple-choice accuracy (``mc``) of every model of the run, side by side."""
    import json

    from cnllm.core.evaluation.mc import McOptions, evaluate_multiple_choice
    from cnllm.core.evaluation.models import ModelSpec
    from cnllm.core.evaluation.ppl import PplOptions, evaluate_perplexity

    unknown = set(options) - {"ppl", "mc", "models"}
    if unknown or not ({"ppl", "mc"} & set(options)):
        raise UsageError("recipe step eval takes 'ppl: {data: [...], ctx: N}', 'mc: {data: DIR, format: ceval, ...}' and optionally 'models: [...]'")
    targets = _eval_targets(context.artifacts, options.get("models"))
    figures: dict = {}
    if "ppl" in options:
        settings = dict(options["ppl"])
        files = _files(settings, "data", "eval.ppl")
        ppl_options = PplOptions(**{k: v for k, v in settings.items() if k != "data"})
        figures["perplexity"], figures["bits_per_byte"] = {}, {}
        for name, path in targets.items():
            result = evaluate_perplexity(ModelSpec(Path(path)), files, ppl_options, progress=context.progress)
            total = result.total
            figures["perplexity"][name] = round(total.ppl, 3)
            figures["bits_per_byte"][name] = round(total.bits_per_byte, 4)
            (context.folder / f"ppl-{name}.json").write_text(json.dumps(result.to_dict(), ensure_ascii=False, indent=2), encoding="utf-8")
    if "mc" in options:
        settings = dict(options["mc"])
        data = Path(settings.pop("data"))
        if "subjects" in settings:
            settings["subjects"] = tuple(settings["subjects"])
        mc_options = McOptions(**settings)
        figures["mc_accuracy"] = {}
        for name, path in targets.items():
            result = evaluate_multiple_choice(ModelSpec(Path(path)), data, mc_options, progress=context.progress)
            figures["mc_accuracy"][name] = round(result.average, 4) if result.average is not None else None
            (context.folder / f"mc-{name}.json").write_text(json.dumps(result.to_dict(), ensure_ascii=False, indent=2), encoding="utf-8")
    return figures


def _eval_inputs(recipe: Recipe, options: dict, artifacts: Artifacts) -> list[Path]:
    paths: list[Path] = []
    if isinstance(options.get("ppl"), dict):
        paths += _files(options["ppl"], "data", "eval.ppl")
    if isinstance(options.get("mc"), dict) and options["mc"].get("data"):
        paths.append(Path(options["mc"]["data"]))
    return paths


# --- checksum --------------------------------------------------------------------------------------


def run_checksum(context: StepContext, options: dict) -> dict:
    """A SHA256SUMS over the final model directory and every GGUF file, relative to the working folder
    (``cnllm checksum verify WORK/09-checksum/SHA256SUMS --root WORK``: verify keeps to its root)."""
    from cnllm.core.hashing import create_manifest

    targets = [context.artifacts.model, *context.artifacts.gguf.values()]
    manifest = context.folder / "SHA256SUMS"
    result = create_manifest(targets, manifest=manifest, relative_to=context.recipe.workdir, progress=context.progress)
    return {"files": len(result.files), "total_bytes": result.total_bytes, "manifest": str((context.final / "SHA256SUMS").relative_to(context.recipe.workdir))}


STEP_KINDS: dict[str, StepKind] = {
    "vocab": StepKind(run_vocab, _vocab_inputs),
    "pt": StepKind(lambda c, o: _train("pt", c, o), _train_inputs("pt")),
    "merge_pt": StepKind(_merge("pt"), _no_inputs),
    "sft": StepKind(lambda c, o: _train("sft", c, o), _train_inputs("sft")),
    "merge_sft": StepKind(_merge("sft"), _no_inputs),
    "convert": StepKind(run_convert, _no_inputs),
    "quantize": StepKind(run_quantize, _no_inputs),
    "eval": StepKind(run_eval, _eval_inputs),
    "checksum": StepKind(run_checksum, _no_inputs),
}
