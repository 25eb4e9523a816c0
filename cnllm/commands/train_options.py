"""``cnllm pt``, ``cnllm sft`` and ``cnllm align``: command-line parameters generated from the method's options.

Each option is declared once, in core (:mod:`cnllm.core.training.options` and the method's module);
:func:`training_command` builds the command's signature from that declaration (Typer reads it), so a
new option there is a new flag here, a ``--config`` key and a recipe key at once. Values then pass
through ``--config`` merging (flags given on the command line win) into the method's options, and
messages name each option as the user gave it: ``--max-steps`` for a flag, its key for a ``--config`` value.
"""

from __future__ import annotations

import dataclasses
import inspect
import typing
from pathlib import Path
from typing import Annotated, Any, Callable, List, Optional

import click
import typer
from click.core import ParameterSource

from cnllm.cli import output
from cnllm.core.config import Declared, build_options, declared_fields, flag, merge, options_spelled, unwrap_optional
from cnllm.core.training.method import TrainingMethod
from cnllm.core.training.options import MODEL, TrainOptions

# The parameters that are no training option: where options come from, and how the result is printed.
CONFIG = inspect.Parameter("config", inspect.Parameter.KEYWORD_ONLY, default=None, annotation=Annotated[Optional[Path], typer.Option(
    "--config", "-c", dir_okay=False, help="YAML file of options (keys as the option names); command-line flags override it.", rich_help_panel=MODEL)])
JSON = inspect.Parameter("json_", inspect.Parameter.KEYWORD_ONLY, default=False, annotation=Annotated[bool, typer.Option(
    "--json", help="Print exactly one JSON document on stdout (and nothing else there).")])


def parameter(field: dataclasses.Field, declared: Declared, annotation: Any) -> inspect.Parameter:
    """The command-line parameter of one declared option: ``max_steps`` → ``--max-steps``; lists of paths repeat
    the flag, lists of words are comma-separated; the default shown is the declaration's."""
    target = unwrap_optional(annotation)
    default = None if field.default is dataclasses.MISSING else field.default
    if typing.get_origin(target) is list:
        (item,) = typing.get_args(target)
        cli_type, default = (Optional[List[Path]], None) if item is Path else (Optional[str], None)
    elif default is None:
        cli_type = Optional[target]
    else:
        cli_type = target
    names = [f"{flag(field.name)}/--no-{field.name.replace('_', '-')}" if declared.toggle else flag(field.name), *declared.aliases]
    settings: dict[str, Any] = {"help": declared.help, "rich_help_panel": declared.panel}
    if declared.choices:
        settings["click_type"] = click.Choice(declared.choices)
    if declared.maximum is not None:
        settings["max"] = declared.maximum
    if not declared.file_okay:
        settings["file_okay"] = False
    if not declared.dir_okay:
        settings["dir_okay"] = False
    return inspect.Parameter(field.name, inspect.Parameter.KEYWORD_ONLY, annotation=Annotated[cli_type, typer.Option(*names, **settings)], default=default)


def training_command(method: TrainingMethod) -> Callable[[Callable], Callable]:
    """Give a command function ``ctx``, one parameter per option of ``method`` (its own first, as in its help)
    and ``--config``/``--json``.

    Options declared ``model=True`` take a Hugging Face id too (:func:`cnllm.cli.paths.apply_path_rule` reads
    ``model_parameters``)."""

    def decorate(function: Callable) -> Callable:
        hints = typing.get_type_hints(method.options_type)
        ctx = inspect.Parameter("ctx", inspect.Parameter.POSITIONAL_OR_KEYWORD, annotation=typer.Context)
        shared = {f.name for f in dataclasses.fields(TrainOptions)}
        own_first = sorted(declared_fields(method.options_type), key=lambda declared: declared[0].name in shared)
        options = [parameter(f, d, hints[f.name]) for f, d in own_first]
        after_tokenizer = [p.name for p in options].index("tokenizer") + 1  # --config beside the other inputs in the help
        # mypy has no function attributes: inspect.signature (so Typer) reads __signature__, the path rule model_parameters
        function.__signature__ = inspect.Signature([ctx, *options[:after_tokenizer], CONFIG, *options[after_tokenizer:], JSON])  # type: ignore[attr-defined]
        function.model_parameters = frozenset(f.name for f, d in declared_fields(method.options_type) if d.model)  # type: ignore[attr-defined]
        return function

    return decorate


def train(ctx: click.Context, method: TrainingMethod, values: dict[str, Any]) -> None:
    """Resolve the options (flags over ``--config`` over the declared defaults), train, print the figures."""
    from cnllm.core.training.trainer import run_training

    values = dict(values)
    config, json_ = values.pop("config"), values.pop("json_")
    explicit = {name for name in values if ctx.get_parameter_source(name) not in (ParameterSource.DEFAULT, ParameterSource.DEFAULT_MAP)}
    merged, from_file = merge(method.options_type, {name: values[name] for name in explicit}, explicit, config)

    def spell(name: str) -> str:
        return f"{name.replace('_', '-')} in {config}" if name in from_file else flag(name)

    options = build_options(method.options_type, merged, spell=spell)
    with options_spelled(spell):
        result = run_training(options, output.CliProgress())
    if result.main_process:
        render(result, json_)


def render(result, json_: bool) -> None:
    """The run's figures: one JSON document, or a short table."""
    document = result.to_dict()
    if json_:
        output.print_json(document)
        return
    rows = [("output", document["output"]), ("steps", document["steps"]), ("train loss (last)", _num(document["train_loss"]))]
    if document["eval_loss"] is not None:
        rows.append(("eval loss", f"{_num(document['eval_loss_before'])} → {_num(document['eval_loss'])}"))
        if document["reward_accuracy"] is not None:
            rows.append(("reward accuracy", f"{_num(document['reward_accuracy_before'])} → {_num(document['reward_accuracy'])}"))
            rows.append(("reward margin", f"{_num(document['reward_margin_before'])} → {_num(document['reward_margin'])}"))
        else:
            rows.append(("perplexity", f"{_num(document['perplexity_before'])} → {_num(document['perplexity'])}"))
    rows += [
        ("tokens/s", _num(document["tokens_per_second"])),
        ("trainable parameters", f"{document['trainable_parameters']:,} of {document['total_parameters']:,}"),
        ("peak memory", output.human_bytes(document["peak_memory_bytes"])),
        ("time", f"{document['seconds']:.1f}s"),
    ]
    if document["resumed_from"]:
        rows.append(("resumed from", document["resumed_from"]))
    output.print_table(None, ["", "value"], rows)


def _num(value: Any) -> str:
    if value is None:
        return "-"
    return f"{value:.4f}" if isinstance(value, float) else str(value)
