"""Options from command-line flags, ``--config`` YAML files and pipeline recipes, built one way.

Every core entry point takes a typed options dataclass (``TrainOptions``, ``MergeOptions``, …);
:func:`build_options` makes one from any mapping: unknown keys are refused, values are coerced
to the field's type here (``"2e-4"`` to a float, a path string to ``Path``, ``fp16`` to a
:class:`~cnllm.core.dtypes.DType`, a ``Literal`` choice checked), and the dataclass's own
``validate()`` runs, so a typo or a wrong type is one clear line naming the key and the allowed values.

For ``--config`` files, flags given on the command line win over the file, and the file wins over
built-in defaults. Keys are option names with ``-`` or ``_`` (``lora-rank`` or ``lora_rank``).

An options dataclass may declare each field with :func:`option` (help, panel, extra flags, whether a
recipe may set it): the command-line parameters, ``--config`` keys and recipe keys are then derived
from that one declaration, and path-ness from the field's type (``Path``, ``list[Path]``). Core raises
:class:`OptionError` naming fields; the layer that knows how the user spelled them (a flag, a key in a
recipe or a ``--config`` file) renders the message with :meth:`OptionError.render`.
"""

from __future__ import annotations

import contextlib
import dataclasses
import inspect
import math
import string
import types
import typing
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterable, Iterator, Mapping

from cnllm.core.dtypes import DType
from cnllm.core.errors import UsageError
from cnllm.core.tensors import ShardSize

DECLARATION = "cnllm"  # the field metadata key of an :func:`option` declaration


@dataclass(frozen=True)
class Declared:
    """How an option meets the user, besides its name, type and default (the dataclass field's own)."""

    help: str
    panel: str | None = None  # the help section on the command line
    aliases: tuple[str, ...] = ()  # more command-line names: "-m", "--lr"
    toggle: bool = False  # --name/--no-name instead of a plain flag
    choices: tuple[str, ...] = ()  # allowed values, checked on every route (click.Choice on the command line)
    maximum: int | float | None = None  # the largest value, checked on every route (click's max on the command line)
    model: bool = False  # names a model, adapter or tokenizer: a Hugging Face id resolves to its cached snapshot
    recipe: bool = True  # False: a pipeline step sets it itself (the model, the output)
    file_okay: bool = True
    dir_okay: bool = True


def option(default: Any = dataclasses.MISSING, *, help: str, factory: Callable[[], Any] | None = None, **declared: Any) -> Any:
    """A dataclass field declared once for every route: its :class:`Declared` rides in the field metadata."""
    metadata = {DECLARATION: Declared(help=help, **declared)}
    if factory is not None:
        return dataclasses.field(default_factory=factory, metadata=metadata)
    return dataclasses.field(default=default, metadata=metadata)


def declared_fields(options_type: type) -> list[tuple[dataclasses.Field, Declared]]:
    """The fields of ``options_type`` declared with :func:`option`, in field order."""
    return [(f, f.metadata[DECLARATION]) for f in dataclasses.fields(options_type) if DECLARATION in f.metadata]


def is_path_type(annotation: Any) -> bool:
    """``Path``, ``Optional[Path]`` or a list of paths: the values the path rule anchors."""
    target = unwrap_optional(annotation)
    if typing.get_origin(target) in (list, tuple):
        target = typing.get_args(target)[0]
    return target is Path


def path_fields(options_type: type) -> list[str]:
    """The fields holding paths, from their types: relative ones are anchored where the value was written."""
    hints = typing.get_type_hints(options_type)
    return [name for name in option_names(options_type) if is_path_type(hints[name])]


def recipe_fields(options_type: type) -> list[str]:
    """The fields a recipe step may set (those a step sets itself are declared ``recipe=False``)."""
    excluded = {f.name for f, d in declared_fields(options_type) if not d.recipe}
    return [name for name in option_names(options_type) if name not in excluded]


def flag(name: str) -> str:
    """A field's command-line flag: ``max_steps`` → ``--max-steps``."""
    return "--" + name.replace("_", "-")


class OptionError(UsageError):
    """A bad option value, its message naming options by field: ``OptionError("{max_steps} must be ≥ 1, got {value}", value=0)``.

    Placeholders that are not among the keyword values are option fields; :meth:`render` spells them the
    way the user gave them (``--max-steps`` on the command line, ``max_steps`` in a recipe). The plain
    message uses the field names, as core knows them.
    """

    def __init__(self, template: str, **values: Any):
        self.template, self.values = template, values
        self.options = [name for _, name, _, _ in string.Formatter().parse(template) if name and name not in values]
        super().__init__(self.render(str))

    def render(self, spell: Callable[[str], str]) -> str:
        return self.template.format(**{name: spell(name) for name in self.options}, **self.values)


@contextlib.contextmanager
def options_spelled(spell: Callable[[str], str], prefix: str = "") -> Iterator[None]:
    """Re-raise an :class:`OptionError` from the block as a :class:`UsageError` with the options spelled by ``spell``."""
    try:
        yield
    except OptionError as exc:
        raise UsageError(prefix + exc.render(spell)) from None


def check_declared(options: Any) -> None:
    """Every declared ``choices`` and ``maximum`` holds on every route (the command line checks them first, with click)."""
    for f, declaration in declared_fields(type(options)):
        value = getattr(options, f.name)
        if declaration.choices and value is not None and value not in declaration.choices:
            raise OptionError("{%s} {value!r} is not one of {allowed}" % f.name, value=value, allowed=", ".join(declaration.choices))
        if declaration.maximum is not None and isinstance(value, (int, float)) and value > declaration.maximum:
            raise OptionError("{%s} must be at most {maximum}, got {value}" % f.name, maximum=declaration.maximum, value=value)


# A recipe or config holds dozens of values; aliases expanding past this many nodes are an alias bomb.
MAX_YAML_NODES = 100_000
MAX_YAML_BYTES = 1 << 20


def expanded_yaml_nodes(root: Any, limit: int) -> int:
    """How many nodes the YAML node graph ``root`` becomes once every alias is expanded, counting no
    further than just past ``limit`` (a graph that refers to itself counts as past it)."""
    sizes: dict[int, int] = {}
    ancestors: set[int] = set()
    stack: list[tuple[Any, bool]] = [(root, False)]
    while stack:
        node, children_done = stack.pop()
        key = id(node)
        children = [] if isinstance(node.value, str) else [c for item in node.value for c in (item if isinstance(item, tuple) else (item,))]
        if children_done:
            ancestors.discard(key)
            sizes[key] = 1 + sum(sizes[id(child)] for child in children)
            if sizes[key] > limit:
                return sizes[key]
        elif key in ancestors:
            return limit + 1
        elif key not in sizes:
            ancestors.add(key)
            stack.append((node, True))
            stack.extend((child, False) for child in children if id(child) not in sizes)
    return sizes.get(id(root), 0)


def load_yaml(path: Path | str) -> dict[str, Any]:
    """The mapping in a YAML file, keys normalised to ``snake_case``; a file over 1 MiB, nested too deeply
    or whose aliases expand past :data:`MAX_YAML_NODES` values is refused before it is built."""
    import yaml

    path = Path(path)
    if not path.is_file():
        raise UsageError(f"config file {path} does not exist")
    if path.stat().st_size > MAX_YAML_BYTES:
        raise UsageError(f"config file {path} is larger than {MAX_YAML_BYTES >> 20} MiB; a recipe or config is a few lines")
    try:
        loader = yaml.SafeLoader(path.read_text(encoding="utf-8"))
        try:
            node = loader.get_single_node()
            if node is not None and expanded_yaml_nodes(node, MAX_YAML_NODES) > MAX_YAML_NODES:
                raise UsageError(f"config file {path}: its aliases expand to more than {MAX_YAML_NODES:,} values (or refer to themselves); refusing it")
            data = loader.construct_document(node) if node is not None else None
        finally:
            loader.dispose()
    except RecursionError:
        raise UsageError(f"config file {path} is nested too deeply") from None
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


def unwrap_optional(annotation: Any) -> Any:
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
    target = unwrap_optional(annotation)
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
        number = None
        if isinstance(value, (int, float, str)) and not isinstance(value, bool):  # YAML 1.1 reads "2e-4" as a string
            try:
                number = float(value)
            except ValueError:
                pass
            except OverflowError:  # an integer beyond any float
                number = math.inf
        if number is None:
            raise UsageError(f"{where}: expected a number, got {value!r}")
        if not math.isfinite(number):  # no option means anything by NaN or infinity
            raise UsageError(f"{where} must be a finite number, got {number}")
        return number
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


def build_options(
    options_type: type,
    values: Mapping[str, Any],
    *,
    where: str | None = None,
    exclude: Iterable[str] = (),
    spell: Callable[[str], str] | None = None,
    **fixed: Any,
):
    """An ``options_type`` from ``values`` (flags, a config file or a recipe step), coerced and validated.

    ``where`` names the source in messages (``recipe step merge_pt``); without it keys read as flags
    (``--dtype``). ``exclude`` lists fields the source may not set; ``fixed`` sets them (inputs and
    outputs a pipeline step decides itself). ``validate()`` runs when the dataclass has one without
    arguments; its :class:`OptionError` names options by ``spell`` (default: as flags without ``where``,
    else as the keys were written in ``values``, field names for the others).
    """
    hints = typing.get_type_hints(options_type)
    allowed = [n for n in option_names(options_type) if n not in set(exclude)]
    written = {str(key).replace("-", "_"): str(key) for key in values}
    if spell is None:
        spell = flag if where is None else (lambda name: written.get(name, name))

    kwargs = dict(fixed)
    for key, value in values.items():
        key = str(key).replace("-", "_")
        if key not in allowed:
            known = ", ".join(n.replace("_", "-") for n in allowed)
            place = "" if where is None else f"{where}: "
            raise UsageError(f"{place}unknown option {key.replace('_', '-')!r}; known options: {known}")
        kwargs[key] = coerce(value, hints[key], where=flag(key) if where is None else f"{where}: {written[key]}")
    options = options_type(**kwargs)
    validate = getattr(options, "validate", None)
    if validate is not None and not inspect.signature(validate).parameters:
        try:
            with options_spelled(spell):
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
) -> tuple[dict[str, Any], set[str]]:
    """Values for ``options_type`` (a dataclass): explicit CLI flags, then the file, then CLI defaults;
    and the fields whose value came from the file (messages name those as its keys).

    Relative paths in the file are relative to the file's folder (flags' paths arrive absolute).
    """
    values = dict(cli_values)
    if config_path is None:
        return values, set()
    hints = typing.get_type_hints(options_type)
    names = {f.name for f in dataclasses.fields(options_type)}
    from_file = set()
    for key, raw in load_yaml(config_path).items():
        if key not in names:
            known = ", ".join(sorted(n.replace("_", "-") for n in names))
            raise UsageError(f"{config_path}: unknown option {key.replace('_', '-')!r}; known options: {known}")
        if key in explicit:
            continue
        values[key] = coerce(raw, hints[key], where=f"{config_path}: {key.replace('_', '-')}", root=config_path.absolute().parent)
        from_file.add(key)
    return values, from_file


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
