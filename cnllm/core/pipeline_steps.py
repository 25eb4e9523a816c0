"""The pipeline's steps: each calls one command's core function and records its key figures.

A step first parses its recipe options into that function's typed options (``MergeOptions``,
``PtOptions``, …) through :func:`~cnllm.core.config.build_options`, the coercion and validation
the commands' flags and ``--config`` files go through; the pipeline does this for every step
before any runs, so ``--dry-run`` names the step, key and allowed values of a bad option. A step
reads and updates :class:`~cnllm.core.pipeline_types.Artifacts` (current model, tokenizer,
adapters, GGUF files) and returns the figures that go into the report. Paths it records are the
final ones (``context.final_path``), since it writes into a temporary folder renamed on success.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional

from cnllm.core.config import build_options, coerce_fields, option_names, options_spelled, path_fields, recipe_fields
from cnllm.core.embeddings import DEFAULT_INIT, check_init_method
from cnllm.core.errors import CheckFailed, UsageError
from cnllm.core.pipeline_types import Artifacts, Recipe, StepContext, StepKind, step_folder
from cnllm.core.training.align import ALIGN, AlignOptions
from cnllm.core.training.methods import METHODS
from cnllm.core.training.pt import PT, PtOptions
from cnllm.core.training.sft import SFT, SftOptions

MERGE_KEYS_NOT_IN_RECIPE = {"format", "shards"}  # later steps need a Hugging Face directory
CONVERT_KEYS_NOT_IN_RECIPE = {"vocab_only"}  # later steps need the weights


def split_options(options: dict, where: str, *parts: tuple[type, dict]) -> list[Any]:
    """Build several option dataclasses from one recipe mapping: each key goes to the dataclass that
    has it (``(type, extra)`` pairs; ``extra`` may exclude or fix fields); a key none has is an error."""
    owners: dict[str, type] = {}
    for options_type, extra in parts:
        for name in option_names(options_type):
            if name not in extra.get("exclude", ()) and name not in extra.get("fixed", {}):
                owners.setdefault(name, options_type)
    unknown = [k for k in options if str(k).replace("-", "_") not in owners]
    if unknown:
        known = ", ".join(n.replace("_", "-") for n in owners)
        raise UsageError(f"{where}: unknown option {str(unknown[0]).replace('_', '-')!r}; known options: {known}")
    built = []
    for options_type, extra in parts:
        mine = {k: v for k, v in options.items() if owners[str(k).replace("-", "_")] is options_type}
        built.append(build_options(options_type, mine, where=where, exclude=extra.get("exclude", ()), **extra.get("fixed", {})))
    return built


def _needs(recipe: Recipe, step: str, before: str) -> None:
    if before not in recipe.steps:
        raise UsageError(f"recipe step {step} needs the {before} step before it")


def _check_files(paths: list[Path], key: str) -> None:
    if not paths:
        raise UsageError(f"'{key}' needs one path or a list of paths")


# --- vocab ---------------------------------------------------------------------------------------


@dataclass
class VocabInputs:
    """The vocab step's own inputs: the corpus to train on, extra pieces to add, a text to measure on; with
    ``extend_model`` it also writes the base model extended to the merged vocabulary, untrained (step 0, which the
    eval step then measures beside the others), its new rows initialised by ``new_row_init`` as pt initialises them."""

    corpus: list[Path] = field(default_factory=list)
    add: list[Path] = field(default_factory=list)
    measure_text: Optional[Path] = None
    extend_model: bool = False
    new_row_init: str = DEFAULT_INIT

    def __post_init__(self) -> None:
        coerce_fields(self)

    def validate(self) -> None:
        _check_files(self.corpus, "corpus")
        check_init_method(self.new_row_init, where="new_row_init")


@dataclass
class VocabStep:
    inputs: VocabInputs
    train: Any  # TrainVocabOptions
    merge: Any  # MergeVocabOptions


def parse_vocab(recipe: Recipe, name: str, options: dict) -> VocabStep:
    from cnllm.core.tokenizers.merge import MergeVocabOptions
    from cnllm.core.tokenizers.train import TrainVocabOptions

    return VocabStep(*split_options(options, f"recipe step {name}", (VocabInputs, {}), (TrainVocabOptions, {}), (MergeVocabOptions, {})))


def run_vocab(context: StepContext, step: VocabStep) -> dict:
    """Train a Chinese SentencePiece model on ``corpus`` and merge it into the base tokenizer."""
    from cnllm.core.tokenizers.inspect import inspect_tokenizer
    from cnllm.core.tokenizers.merge import merge_vocab
    from cnllm.core.tokenizers.train import train_vocab

    trained = train_vocab(step.inputs.corpus, context.folder / "chinese_sp.model", step.train, progress=context.progress)
    merged = merge_vocab(context.artifacts.tokenizer, [trained.output, *step.inputs.add], context.folder / "tokenizer", step.merge, progress=context.progress)
    context.artifacts.tokenizer = context.final_path(merged.output)
    figures: dict[str, object] = {"trained_pieces": trained.pieces, "base_vocab": merged.base_size, "merged_vocab": merged.final_size, "added": merged.added}
    measure_text = step.inputs.measure_text
    if measure_text:
        before = inspect_tokenizer(context.artifacts.models["base"] if context.recipe.base_tokenizer == context.recipe.base_model else context.recipe.base_tokenizer, measure_text).text
        after = inspect_tokenizer(merged.output, measure_text).text
        assert before is not None and after is not None  # both measured measure_text
        figures["chinese_chars_per_token"] = {"before": round(before.cjk_per_token, 3), "after": round(after.cjk_per_token, 3)}
        figures["tokens_on_text"] = {"before": before.tokens, "after": after.tokens}
    if step.inputs.extend_model:
        from cnllm.core.embeddings import extend_model

        extended = extend_model(context.artifacts.model, merged.output, context.folder / "extended-model", method=step.inputs.new_row_init,
                                progress=context.progress)
        context.artifacts.models["extended"] = context.final_path(extended.output)
        figures["extended_model"] = {"new_row_init": extended.method, "rows": extended.rows, "decomposed": extended.new_rows["decomposed"]}
    return figures


def _vocab_inputs(recipe: Recipe, step: VocabStep) -> list[Path]:
    paths = [*step.inputs.corpus, *step.inputs.add]
    if step.inputs.measure_text:
        paths.append(step.inputs.measure_text)
    return paths + [recipe.base_tokenizer]


# --- pt / sft / align --------------------------------------------------------------------------------------


def _parse_train(method):
    def parse(recipe: Recipe, name: str, options: dict):
        """The step's options, validated with the step folder as output (model and tokenizer are set when it runs)."""
        fixed: dict[str, Any] = {"model": recipe.base_model, "tokenizer": recipe.base_tokenizer, "output": step_folder(recipe, name) / "adapter"}
        excluded = set(option_names(method.options_type)) - set(recipe_fields(method.options_type))
        return build_options(method.options_type, options, where=f"recipe step {name}", exclude=excluded, **fixed)

    return parse


def _run_train(method):
    def run(context: StepContext, train_options) -> dict:
        from cnllm.core.training.trainer import run_training

        train_options = dataclasses.replace(train_options, model=context.artifacts.model, tokenizer=context.artifacts.tokenizer,
                                            output=context.folder / "adapter")
        written = {str(key).replace("-", "_"): str(key) for key in context.recipe.steps[method.name]}
        with options_spelled(lambda field: written.get(field, field), prefix=f"recipe step {method.name}: "):
            result = run_training(train_options, progress=context.progress)
        context.artifacts.adapters[method.name] = context.final_path(result.output)
        document = result.to_dict()
        figures = {key: document[key] for key in ("steps", "train_loss", "tokens_per_second", "trainable_parameters")}
        figures["eval_loss"] = {"before": document["eval_loss_before"], "after": document["eval_loss"]}
        figures.update(method.figures(document))
        curve = result.output / "loss.png"
        if curve.exists():
            figures["loss_curve"] = str(context.final_path(curve).relative_to(context.recipe.workdir))
        return figures

    return run


def run_align(context: StepContext, train_options) -> dict:
    """Preference training on the model so far; with held-out pairs (``validation_data``), the preference
    accuracy of the model before (no adapter) and after (with it), as ``cnllm eval pref`` measures it."""
    from cnllm.core.evaluation.pref import PrefOptions, evaluate_preference
    from cnllm.core.generation.base import LoadOptions

    model = context.artifacts.model
    figures = _run_train(ALIGN)(context, train_options)
    adapter = context.folder / "adapter"
    if train_options.validation_data:
        options = PrefOptions(template=train_options.template, system=train_options.system, ctx=train_options.max_length * 2)
        before = evaluate_preference(model, train_options.validation_data, options, progress=context.progress)
        after = evaluate_preference(model, train_options.validation_data, options, LoadOptions(lora=adapter), progress=context.progress)
        figures["preference_accuracy"] = {"before": round(before.accuracy, 4), "after": round(after.accuracy, 4)}
        figures["preference_accuracy_summed"] = {"before": round(before.accuracy_unnormalized, 4), "after": round(after.accuracy_unnormalized, 4)}
    return figures


def _train_inputs(recipe: Recipe, train_options) -> list[Path]:
    return [*train_options.data, *train_options.validation_data]


# --- merge -----------------------------------------------------------------------------------------


def _parse_merge(adapter_key: str):
    def parse(recipe: Recipe, name: str, options: dict):
        from cnllm.core.merge import MergeOptions

        _needs(recipe, name, adapter_key)
        return build_options(MergeOptions, options, where=f"recipe step {name}", exclude=MERGE_KEYS_NOT_IN_RECIPE)

    return parse


def _merge(adapter_key: str):
    def run(context: StepContext, merge_options) -> dict:
        from cnllm.core.merge import merge_lora

        adapter = context.artifacts.adapters.get(adapter_key)
        if adapter is None:
            raise UsageError(f"recipe step merge_{adapter_key} needs the {adapter_key} step before it")
        result = merge_lora(context.artifacts.model, [adapter], context.folder / "model", merge_options, progress=context.progress)
        merged = context.final_path(context.folder / "model")
        context.artifacts.model = context.artifacts.tokenizer = merged
        context.artifacts.models[adapter_key] = merged
        problems = result.problems()
        if problems:
            raise CheckFailed(problems[0])
        document = result.to_dict()
        figures = {key: document[key] for key in ("dtype", "tensors", "updated", "replaced")}
        figures["vocab_size"] = document["vocab"]["embedding"]
        if result.verify is not None:
            figures["max_logit_difference"] = document["verify"]["max_abs_diff"]
        return figures

    return run


# --- convert / quantize ----------------------------------------------------------------------------


def parse_convert(recipe: Recipe, name: str, options: dict):
    from cnllm.core.gguf.convert import ConvertOptions

    return build_options(ConvertOptions, options, where=f"recipe step {name}", exclude=CONVERT_KEYS_NOT_IN_RECIPE)


def run_convert(context: StepContext, convert_options) -> dict:
    from cnllm.core.gguf.convert import convert_to_gguf, resolve_outtype
    from cnllm.core.tensors import tensor_infos

    gguf_type = resolve_outtype(convert_options.outtype, tensor_infos(context.artifacts.model))
    output = context.folder / f"{context.recipe.name}-{gguf_type}.gguf"
    result = convert_to_gguf(context.artifacts.model, output, convert_options, progress=context.progress)
    context.artifacts.gguf[gguf_type] = context.final_path(result.output)
    document = result.to_dict()
    return {
        "outtype": document["outtype"],
        "size_bytes": document["bytes"],
        "tensors": document["tensors"],
        "tokenizer": f"{document['tokenizer']['model']}/{document['tokenizer']['pre']}",
    }


@dataclass
class QuantizeStep:
    types: list[str]
    options: list[Any]  # QuantizeOptions, one per type


def parse_quantize(recipe: Recipe, name: str, options: dict) -> QuantizeStep:
    from cnllm.core.config import coerce
    from cnllm.core.gguf.quantize import QuantizeOptions

    where = f"recipe step {name}"
    _needs(recipe, name, "convert")
    settings = dict(options)
    types = coerce(settings.pop("types", None), list[str], where=f"{where}: types") or ["q4_k_m"]
    return QuantizeStep(types, [build_options(QuantizeOptions, settings, where=where, type=t) for t in types])


def run_quantize(context: StepContext, step: QuantizeStep) -> dict:
    from cnllm.core.gguf.quantize import quantize_gguf

    if not context.artifacts.gguf:
        raise UsageError("recipe step quantize needs the convert step before it")
    source_type, source = next(iter(context.artifacts.gguf.items()))
    figures: dict = {"source": {"type": source_type, "size_bytes": source.stat().st_size}}
    for quant_type, quant_options in zip(step.types, step.options):
        result = quantize_gguf(source, context.folder / f"{context.recipe.name}-{quant_type.lower()}.gguf", quant_options, progress=context.progress)
        context.artifacts.gguf[quant_type.lower()] = context.final_path(result.output)
        document = result.to_dict()
        figures[quant_type.lower()] = {"size_bytes": document["output_bytes"], "bits_per_weight": round(document["bits_per_weight"], 3), "seconds": round(document["seconds"], 2)}
    return figures


# --- eval ----------------------------------------------------------------------------------------

EVAL_TARGET_DEFAULT = "all"


@dataclass
class EvalData:
    """What an eval part scores: text files (``ppl``) or an exam folder (``mc``)."""

    data: list[Path] = field(default_factory=list)

    def __post_init__(self) -> None:
        coerce_fields(self)

    def validate(self) -> None:
        _check_files(self.data, "data")


@dataclass
class EvalStep:
    models: Optional[list[str]]  # None: every model of the run
    ppl: Optional[tuple[EvalData, Any]] = None  # (files, PplOptions)
    mc: Optional[tuple[Path, Any]] = None  # (folder, McOptions)


def _model_names(recipe: Recipe) -> set[str] | None:
    """The names ``eval.models`` may use, from the recipe's steps (None when a GGUF type is only known at run time)."""
    from cnllm.core.gguf.convert import gguf_outtype

    names = {"base"} | {name for name in METHODS if f"merge_{name}" in recipe.steps}
    if "convert" in recipe.steps:
        outtype = gguf_outtype(str(recipe.steps["convert"].get("outtype", "auto")))
        if outtype == "auto":
            return None
        names.add(f"gguf-{outtype}")
    if "quantize" in recipe.steps:
        names |= {f"gguf-{str(t).lower()}" for t in recipe.steps["quantize"].get("types") or ["q4_k_m"]}
    return names


def parse_eval(recipe: Recipe, name: str, options: dict) -> EvalStep:
    from cnllm.core.config import coerce
    from cnllm.core.evaluation.mc import McOptions
    from cnllm.core.evaluation.ppl import PplOptions

    where = f"recipe step {name}"
    unknown = set(options) - {"ppl", "mc", "models"}
    if unknown or not ({"ppl", "mc"} & set(options)):
        raise UsageError(f"{where} takes 'ppl: {{data: [...], ctx: N}}', 'mc: {{data: DIR, format: ceval, ...}}' and optionally 'models: [...]'")
    models = options.get("models")
    models = None if models in (None, EVAL_TARGET_DEFAULT) else coerce(models, list[str], where=f"{where}: models")
    known = _model_names(recipe)
    if models is not None and known is not None and set(models) - known:
        missing = ", ".join(sorted(set(models) - known))
        raise UsageError(f"{where}: models: no model named {missing} in this recipe (available: {', '.join(sorted(known))})")
    step = EvalStep(models)
    for part in ("ppl", "mc"):
        if part in options and not isinstance(options[part], dict):
            raise UsageError(f"{where}: {part} must be a mapping of options")
    if "ppl" in options:
        step.ppl = tuple(split_options(options["ppl"], f"{where}: ppl", (EvalData, {}), (PplOptions, {})))
    if "mc" in options:
        settings = dict(options["mc"])
        folder = coerce(settings.pop("data", None), Path, where=f"{where}: mc: data")
        if folder is None:
            raise UsageError(f"{where}: mc: 'data' needs the exam folder (dev/, val/, test/)")
        step.mc = (folder, build_options(McOptions, settings, where=f"{where}: mc"))
    return step


def _eval_targets(artifacts: Artifacts, wanted: list[str] | None) -> dict[str, Path]:
    """Every model the run produced (base, pt, sft, align, each GGUF), or the names the recipe lists."""
    targets = {name: path for name, path in artifacts.models.items()}
    targets.update({f"gguf-{kind}": path for kind, path in artifacts.gguf.items()})
    if wanted is None:
        return targets
    missing = [name for name in wanted if name not in targets]
    if missing:
        raise UsageError(f"recipe step eval: no model named {', '.join(missing)} (available: {', '.join(targets)})")
    return {name: targets[name] for name in wanted}


def run_eval(context: StepContext, step: EvalStep) -> dict:
    """Perplexity (``ppl``) and multiple-choice accuracy (``mc``) of every model of the run, side by side."""
    import json

    from cnllm.core.evaluation.mc import evaluate_multiple_choice
    from cnllm.core.evaluation.ppl import evaluate_perplexity

    targets = _eval_targets(context.artifacts, step.models)
    figures: dict = {}
    if step.ppl is not None:
        files, ppl_options = step.ppl
        # bits per character first: the models differ in tokenizer, so perplexity per token does not compare them
        figures["bits_per_char"], figures["chars_per_token"], figures["bits_per_byte"], figures["perplexity"] = {}, {}, {}, {}
        for name, path in targets.items():
            result = evaluate_perplexity(Path(path), files.data, ppl_options, progress=context.progress)
            document = result.to_dict()
            figures["bits_per_char"][name] = round(document["total"]["bits_per_char"], 4)
            figures["chars_per_token"][name] = round(document["total"]["chars_per_token"], 3)
            figures["bits_per_byte"][name] = round(document["total"]["bits_per_byte"], 4)
            figures["perplexity"][name] = round(document["total"]["ppl"], 3)
            (context.folder / f"ppl-{name}.json").write_text(json.dumps(document, ensure_ascii=False, indent=2), encoding="utf-8")
    if step.mc is not None:
        data, mc_options = step.mc
        figures["mc_accuracy"] = {}
        for name, path in targets.items():
            mc_result = evaluate_multiple_choice(Path(path), data, mc_options, progress=context.progress)
            document = mc_result.to_dict()
            figures["mc_accuracy"][name] = round(document["average"], 4) if document["average"] is not None else None
            (context.folder / f"mc-{name}.json").write_text(json.dumps(document, ensure_ascii=False, indent=2), encoding="utf-8")
    return figures


def _eval_inputs(recipe: Recipe, step: EvalStep) -> list[Path]:
    paths: list[Path] = []
    if step.ppl is not None:
        paths += step.ppl[0].data
    if step.mc is not None:
        paths.append(step.mc[0])
    return paths


# --- checksum --------------------------------------------------------------------------------------


def parse_checksum(recipe: Recipe, name: str, options: dict) -> dict:
    if options:
        raise UsageError(f"recipe step {name}: unknown option {next(iter(options))!r}; the checksum step takes no options")
    return {}


def run_checksum(context: StepContext, options: dict) -> dict:
    """A SHA256SUMS over the final model directory and every GGUF file, relative to the working folder
    (``cnllm checksum verify WORK/11-checksum/SHA256SUMS --root WORK``: verify keeps to its root)."""
    from cnllm.core.hashing import create_manifest

    targets = [context.artifacts.model, *context.artifacts.gguf.values()]
    manifest = context.folder / "SHA256SUMS"
    result = create_manifest(targets, manifest=manifest, relative_to=context.recipe.workdir, progress=context.progress)
    return {"files": len(result.files), "total_bytes": result.total_bytes, "manifest": str((context.final / "SHA256SUMS").relative_to(context.recipe.workdir))}


def _no_inputs(recipe: Recipe, step: Any) -> list[Path]:
    return []


STEP_KINDS: dict[str, StepKind] = {
    "vocab": StepKind(parse_vocab, run_vocab, _vocab_inputs, tuple(path_fields(VocabInputs))),
    "pt": StepKind(_parse_train(PT), _run_train(PT), _train_inputs, tuple(path_fields(PtOptions))),
    "merge_pt": StepKind(_parse_merge("pt"), _merge("pt"), _no_inputs),
    "sft": StepKind(_parse_train(SFT), _run_train(SFT), _train_inputs, tuple(path_fields(SftOptions))),
    "merge_sft": StepKind(_parse_merge("sft"), _merge("sft"), _no_inputs),
    "align": StepKind(_parse_train(ALIGN), run_align, _train_inputs, tuple(path_fields(AlignOptions))),
    "merge_align": StepKind(_parse_merge("align"), _merge("align"), _no_inputs),
    "convert": StepKind(parse_convert, run_convert, _no_inputs),
    "quantize": StepKind(parse_quantize, run_quantize, _no_inputs),
    "eval": StepKind(parse_eval, run_eval, _eval_inputs),
    "checksum": StepKind(parse_checksum, run_checksum, _no_inputs),
}
