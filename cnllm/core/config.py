"""Run-configuration files: any option of a command can come from YAML (``--config run.yaml``).

Flags given on the command line win over the file; the file wins over built-in defaults. Keys
are option names with ``-`` or ``_`` (``lora-rank`` or ``lora_rank``). Values are converted to
the option's type here, so a typo or a wrong type is one clear line naming the file and key.
"""

from __future__ import annotations

import dataclasses
import types
import typing
from pathlib import Path
from typing import Any, Mapping

from cnllm.core.errors import UsageError


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
    """Convert a YAML value to ``annotation`` (int, float, bool, str, Path, list[...], Optional[...]).

    A relative path is taken relative to ``root`` (the folder of the file it came from) when given.
    """
    if value is None:
        return None
    target = _unwrap_optional(annotation)
    origin = typing.get_origin(target)
    if origin in (list, tuple):
        (item_type,) = typing.get_args(target)[:1]
        items = [v.strip() for v in value.split(",") if v.strip()] if isinstance(value, str) else value
        if not isinstance(items, list):
            raise UsageError(f"{where}: expected a list, got {value!r}")
        return [coerce(item, item_type, where=where, root=root) for item in items]
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
        if isinstance(value, str):
            return root / value if root is not None and not Path(value).is_absolute() else Path(value)
        raise UsageError(f"{where}: expected a path, got {value!r}")
    if target is str:
        if isinstance(value, (str, int, float)) and not isinstance(value, bool):
            return str(value)
        raise UsageError(f"{where}: expected text, got {value!r}")
    return value


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
        if isinstance(value, Path):
            return str(value)
        if isinstance(value, (list, tuple)):
            return [plain(v) for v in value]
        if hasattr(value, "value") and not isinstance(value, (int, float, str)):
            return value.value
        return value

    return yaml.safe_dump({k.replace("_", "-"): plain(v) for k, v in values.items()}, allow_unicode=True, sort_keys=False)
