"""Options from command-line flags, ``--config`` YAML files and pipeline recipes, built one way.

Every core entry point takes a typed options dataclass (``TrainOptions``, ``MergeOptions``, …);
:func:`build_options` makes one from any mapping: unknown keys are refused, values are coerced
to the field's type here (``"2e-4"`` to a float, a path string to ``Path``, ``fp16`` to a
:class:`~cnllm.core.dtypes.DType`, a ``Literal`` choice checked), and the dataclass's own
``validate()`` runs, so a typo or a wrong type is one clear line naming the key and the allowed values.

For ``--config`` files, flags given on the command line win over the file, and the file wins over
built-in defaults. Keys are option names with ``-`` or ``_`` (``lora-rank`` or ``lora_rank``).
"""

from __future__ import annotations

import dataclasses
import inspect
import types
import typing
from pathlib import Path
from typing import Any, Iterable, Mapping

from cnllm.core.dtypes import DType
from cnllm.core.errors import UsageError
from cnllm.core.tensors import ShardSize


def load_yaml(path: Path | str) -> dict[str, Any]:
    """The mapping in a YAML file, keys normalised to ``snake_case``."""
    import yaml

    path = Path(path)
    if not path.is_file():
        raise UsageError(f"config file {path} does not exist")
    try:
        data = yaml.safe_load(path.read_text(encoding="utf-8"))
    except UnicodeDecodeError:
        raise UsageError(f"config file {path} is not UTF-8 text") from None
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f":{mark.line + 1}" if mark is not None else ""
        raise UsageError(f"config file {path}{where} is not valid YAML: {getattr(exc, 'problem', exc)}") from None
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise UsageError(f"config file {path} must hold a mapping of option: value")
    return {str(key).replace("-", "_"): value for key, value in data.items()}


def _unwrap_optional(annotation: Any) -> Any:
    if typing.get_origin(annotation) in (typing.Union, types.UnionType):
        args = [a for a in typing.get_args(annotation) if a is not type(None)]
        if len(args) == 1:
            return args[0]
    return annotation


def coerce(value: Any, annotation: Any, *, where: str, root: Path | None = None) -> Any:
    """Convert a value to ``annotation`` (int, float, bool, str, Path, DType, ShardSize, Literal, list/tuple[...], Optional[...]).

    A relative path is taken relative to ``root`` (the folder of the file it came from) when given.
    """
    if value is None:
        return None
    target = _unwrap_optional(annotation)
    origin = typing.get_origin(target)
    if origin is typing.Literal:
        choices = typing.get_args(target)
        text = getattr(value, "value", value)
        if text not in choices:
            raise UsageError(f"{where} {text!r} is not one of {', '.join(map(str, choices))}")
        return text
    if isinstance(target, type) and issubclass(target, DType):
        if isinstance(value, target):
            return value
        if isinstance(value, str):
            return target(value, where=where)
        raise UsageError(f"{where}: expected a dtype word, got {value!r}")
    if target is ShardSize:
        if isinstance(value, ShardSize):
            return value
        if isinstance(value, (str, int)) and not isinstance(value, bool):
            return ShardSize(value, where=where)
        raise UsageError(f"{where}: expected a size such as 500MB or 2GB, got {value!r}")
    if origin in (list, tuple):
        (item_type,) = typing.get_args(target)[:1]
        items = [v.strip() for v in value.split(",") if v.strip()] if isinstance(value, str) else value
        if isinstance(items, (Path, tuple)):
            items = list(items) if isinstance(items, tuple) else [items]
        if not isinstance(items, list):
            raise UsageError(f"{where}: expected a list, got {value!r}")
        coerced = [coerce(item, item_type, where=where, root=root) for item in items]
        return tuple(coerced) if origin is tuple else coerced
    if target is bool:
        if isinstance(value, bool):
            return value
        raise UsageError(f"{where}: expected true or false, got {value!r}")
    if target is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        raise UsageError(f"{where}: expected an integer, got {value!r}")
    if target is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
        if isinstance(value, str):  # YAML 1.1 reads "2e-4" as a string
            try:
                return float(value)
            except ValueError:
                pass
        raise UsageError(f"{where}: expected a number, got {value!r}")
    if target is Path:
        if isinstance(value, Path):
            return value
        if isinstance(value, str):
            return root / value if root is not None and not Path(value).is_absolute() else Path(value)
        raise UsageError(f"{where}: expected a path, got {value!r}")
    if target is str:
        if isinstance(value, (str, int, float)) and not isinstance(value, bool):
            return str(value)
        raise UsageError(f"{where}: expected text, got {value!r}")
    return value


def coerce_fields(options: Any) -> None:
    """Coerce every field of a dataclass in place (idempotent): options built directly in Python
    (``MergeOptions(dtype="fp16")``) get the same types as those built by :func:`build_options`."""
    hints = typing.get_type_hints(type(options))
    for name in option_names(type(options)):
        object.__setattr__(options, name, coerce(getattr(options, name), hints[name], where=f"--{name.replace('_', '-')}"))


def option_names(options_type: type) -> list[str]:
    return [f.name for f in dataclasses.fields(options_type)]


def build_options(options_type: type, values: Mapping[str, Any], *, where: str | None = None, exclude: Iterable[str] = (), **fixed: Any):
    """An ``options_type`` from ``values`` (flags, a config file or a recipe step), coerced and validated.

    ``where`` names the source in messages (``recipe step merge_pt``); without it keys read as flags
    (``--dtype``). ``exclude`` lists fields the source may not set; ``fixed`` sets them (inputs and
    outputs a pipeline step decides itself). ``validate()`` runs when the dataclass has one without arguments.
    """
    hints = typing.get_type_hints(options_type)
    allowed = [n for n in option_names(options_type) if n not in set(exclude)]

    def label(key: str) -> str:
        name = key.replace("_", "-")
        return f"--{name}" if where is None else f"{where}: {name}"

    kwargs = dict(fixed)
    for key, value in values.items():
        key = str(key).replace("-", "_")
        if key not in allowed:
            known = ", ".join(n.replace("_", "-") for n in allowed)
            place = "" if where is None else f"{where}: "
            raise UsageError(f"{place}unknown option {key.replace('_', '-')!r}; known options: {known}")
        kwargs[key] = coerce(value, hints[key], where=label(key))
    options = options_type(**kwargs)
    validate = getattr(options, "validate", None)
    if validate is not None and not inspect.signature(validate).parameters:
        try:
            validate()
        except UsageError as exc:
            if where is None:
                raise
            raise UsageError(f"{where}: {exc.message}") from None
    return options


def merge(
    options_type: type,
    cli_values: Mapping[str, Any],
    explicit: set[str],
    config_path: Path | None,
) -> dict[str, Any]:
    """Values for ``options_type`` (a dataclass): explicit CLI flags, then the file, then CLI defaults.

    Relative paths in the file are relative to the file's folder (flags' paths arrive absolute).
    """
    values = dict(cli_values)
    if config_path is None:
        return values
    hints = typing.get_type_hints(options_type)
    names = {f.name for f in dataclasses.fields(options_type)}
    for key, raw in load_yaml(config_path).items():
        if key not in names:
            known = ", ".join(sorted(n.replace("_", "-") for n in names))
            raise UsageError(f"{config_path}: unknown option {key.replace('_', '-')!r}; known options: {known}")
        if key in explicit:
            continue
        values[key] = coerce(raw, hints[key], where=f"{config_path}: {key.replace('_', '-')}", root=config_path.absolute().parent)
    return values


def dump_yaml(values: Mapping[str, Any]) -> str:
    """A resolved configuration as YAML that :func:`merge` reads back (paths as strings)."""
    import yaml

    def plain(value: Any) -> Any:
        if isinstance(value, str):
            return str(value)
        if isinstance(value, Path):
            return str(value)
        if isinstance(value, (list, tuple)):
            return [plain(v) for v in value]
        if hasattr(value, "value") and not isinstance(value, (int, float, str)):
            return value.value
        return value

    return yaml.safe_dump({k.replace("_", "-"): plain(v) for k, v in values.items()}, allow_unicode=True, sort_keys=False)
