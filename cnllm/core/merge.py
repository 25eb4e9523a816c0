"""Streaming LoRA merge: the base one tensor at a time, ``W += scale·B·A`` in fp32, shards written as they go.

Peak memory is the adapters plus a block of rows (:data:`BLOCK_BYTES`, in fp32 while updated),
never the whole model: the output layout is planned from safetensors headers before any weight
is read, so every merged block goes straight to its place in its shard. PEFT key names are mapped back
to base tensor names here; scaling follows PEFT exactly (``alpha/r``, rsLoRA ``alpha/sqrt(r)``,
``rank_pattern``/``alpha_pattern``, ``fan_in_fan_out`` for ``Conv1D`` layers), adapters apply in
the order given, and full ``modules_to_save`` tensors (extended vocabularies) replace the base's.
A base with tied embeddings stays tied unless the adapters make its output embedding differ from its
input embedding (both trained as ``modules_to_save``): then ``lm_head.weight`` is written and
``tie_word_embeddings`` set to false, which is what PEFT's unmerged model computes.
"""

from __future__ import annotations

import dataclasses
import json
import math
import re
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterable, Literal, Optional, Sequence

from cnllm.core.architectures import find_architecture
from cnllm.core.atomic import atomic_dir, check_output
from cnllm.core.config import coerce_fields
from cnllm.core.dtypes import DType
from cnllm.core.errors import UsageError
from cnllm.core.modelio import (
    EMBEDDING_NAMES,
    LM_HEAD_NAMES,
    TIED_HEAD,
    TiedTensorReader,
    VocabSizes,
    adapter_config_overrides,
    has_tokenizer,
    load_config,
    read_adapter_config,
    tied_head_source,
    ties_embeddings,
    tokenizer_length,
    with_tied_head,
)
from cnllm.core.progress import NULL_PROGRESS, Progress
from cnllm.core.provenance import finish_output_folder
from cnllm.core.tensors import (
    DEFAULT_SHARD_SIZE,
    SAFETENSORS_TORCH_DTYPES,
    ShardSize,
    StreamingShardWriter,
    TensorInfo,
    TensorReader,
    human_bytes,
    stream_tensors,
    tensor_infos,
)

VERIFY_TOLERANCE = {"float32": 1e-3, "float16": 5e-2, "bfloat16": 2e-1}
BLOCK_BYTES = 16 << 20  # a merged tensor is produced this many fp32 bytes of rows at a time
VERIFY_PROMPT = "The quick brown fox jumps over the lazy dog. 中文大模型，你好！"

PEFT_PREFIX = "base_model.model."
LORA_PARTS = ("lora_A", "lora_B", "lora_embedding_A", "lora_embedding_B")
TOKENIZER_EXTRA_FILES = ("special_tokens_map.json", "added_tokens.json", "chat_template.jinja", "chat_template.json")
VOCAB_TENSORS = EMBEDDING_NAMES + LM_HEAD_NAMES
UNSUPPORTED_OPTIONS = {
    "use_dora": "DoRA (use_dora)",
    "lora_bias": "LoRA bias terms (lora_bias)",
    "trainable_token_indices": "trainable token indices",
    "layer_replication": "layer replication",
    "target_parameters": "LoRA on bare parameters (target_parameters)",
    "use_qalora": "QA-LoRA",
}


@dataclass
class LoraUpdate:
    """One ``W += scale · B·A`` of a base weight."""

    module: str
    a_key: str
    b_key: str
    rank: int
    scale: float
    transpose: bool


@dataclass
class Adapter:
    """A PEFT LoRA adapter directory, mapped onto the base tensor names it changes."""

    directory: Path
    weights_file: Path
    config: dict
    replacements: dict[str, str] = field(default_factory=dict)
    updates: dict[str, LoraUpdate] = field(default_factory=dict)

    def load(self) -> dict:
        """The adapter tensors the merge uses (PEFT's spare copies such as ``original_module`` are skipped)."""
        needed = set(self.replacements.values()) | {key for u in self.updates.values() for key in (u.a_key, u.b_key)}
        return {name: tensor for name, tensor in stream_tensors(self.weights_file) if name in needed}


@dataclass
class VerifyReport:
    max_abs_diff: float
    tolerance: float
    tokens: int

    @property
    def passed(self) -> bool:
        return self.max_abs_diff <= self.tolerance

    def to_dict(self) -> dict:
        return {"max_abs_diff": self.max_abs_diff, "tolerance": self.tolerance, "tokens": self.tokens, "passed": self.passed}


@dataclass
class MergeResult:
    output: Path
    format: str
    dtype: str
    adapters: list[Path]
    tensors: int
    updated: int
    replaced: int
    vocab: VocabSizes
    tokenizer_from: Path | None
    files: list[str]
    total_bytes: int
    seconds: float
    verify: VerifyReport | None = None
    notes: list[str] = field(default_factory=list)

    def to_dict(self) -> dict:
        """The one JSON shape of a merge: ``--json``, the provenance record and the pipeline report."""
        return {
            "output": str(self.output),
            "format": self.format,
            "dtype": self.dtype,
            "adapters": [str(a) for a in self.adapters],
            "tensors": self.tensors,
            "updated": self.updated,
            "replaced": self.replaced,
            "vocab": dataclasses.asdict(self.vocab),
            "tokenizer_from": str(self.tokenizer_from) if self.tokenizer_from else None,
            "files": self.files,
            "total_bytes": self.total_bytes,
            "seconds": round(self.seconds, 3),
            "verify": None if self.verify is None else self.verify.to_dict(),
            "notes": self.notes,
        }

    def problems(self) -> list[str]:
        """Failed checks (the output is complete and in place; the caller decides the exit code)."""
        if self.verify is None or self.verify.passed:
            return []
        return [
            f"merged output differs from base+adapters: max logit difference {self.verify.max_abs_diff:.3g} "
            f"> tolerance {self.verify.tolerance:g} (output kept at {self.output})"
        ]


@dataclass
class MergeOptions:
    """How :func:`merge_lora` writes its output: ``cnllm merge-lora`` flags and a recipe's merge steps."""

    dtype: Optional[DType] = None  # None: the base's
    max_shard_size: ShardSize = DEFAULT_SHARD_SIZE
    format: Literal["hf", "pth"] = "hf"
    shards: int = 1
    verify: bool = False
    tolerance: Optional[float] = None  # None: VERIFY_TOLERANCE of the output dtype

    def __post_init__(self) -> None:
        coerce_fields(self)

    def validate(self) -> None:
        if self.shards < 1 or (self.shards > 1 and self.format != "pth"):
            raise UsageError("--shards applies to --format pth only, and must be at least 1")
        if self.tolerance is not None and self.tolerance < 0:
            raise UsageError(f"--tolerance must be at least 0, got {self.tolerance}")


# --- reading adapters ---------------------------------------------------------------------------


def read_adapter(directory: Path | str) -> Adapter:
    """Check an adapter directory and read its config (the weights stay on disk until the merge)."""
    directory = Path(directory)
    if not directory.is_dir():
        raise UsageError(f"adapter {directory} is not a directory")
    config_path = directory / "adapter_config.json"
    if not config_path.exists():
        raise UsageError(f"{directory} is not a PEFT adapter directory (no adapter_config.json)")
    config = read_adapter_config(directory)
    peft_type = str(config.get("peft_type", "")).upper()
    if peft_type != "LORA":
        raise UsageError(f"{directory} is a {peft_type or 'unknown'} adapter; merge-lora merges LoRA adapters only")
    for key, what in UNSUPPORTED_OPTIONS.items():
        if config.get(key):
            raise UsageError(f"{directory} uses {what}, which merge-lora cannot merge; merge it with PEFT's merge_and_unload instead")
    check_scaling(config, config_path)
    for name in ("adapter_model.safetensors", "adapter_model.bin"):
        if (directory / name).exists():
            return Adapter(directory, directory / name, config)
    raise UsageError(f"{directory} has adapter_config.json but no adapter_model.safetensors or adapter_model.bin")


def _is_finite_number(value) -> bool:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return False
    try:
        return math.isfinite(value)
    except OverflowError:  # an integer beyond any float
        return False


def check_scaling(config: dict, config_path: Path) -> None:
    """``r`` and ``lora_alpha`` (and their per-module patterns) make the merge's scale alpha / r: each must be a
    positive number, r a whole one, or the merge writes NaN or infinite weights."""
    patterns = {}
    for key in ("rank_pattern", "alpha_pattern"):
        pattern = config.get(key) or {}
        if not isinstance(pattern, dict):
            raise UsageError(f"{config_path}: {key} must map module names to numbers, got {pattern!r}")
        patterns[key] = pattern
    ranks = [("r", config.get("r", 8)), *((f"rank_pattern[{name!r}]", v) for name, v in patterns["rank_pattern"].items())]
    alphas = [("lora_alpha", config.get("lora_alpha", 8)), *((f"alpha_pattern[{name!r}]", v) for name, v in patterns["alpha_pattern"].items())]
    for whole, key, value in [(True, *item) for item in ranks] + [(False, *item) for item in alphas]:
        if not _is_finite_number(value) or value <= 0 or (whole and value != int(value)):
            kind = "a positive integer" if whole else "a positive finite number"
            raise UsageError(f"{config_path}: {key} must be {kind}, got {value!r}")


def _classify(key: str) -> tuple[str, str, str | int]:
    """``("lora", module, part)``, ``("replace", base tensor name, priority)`` or ``("ignore", key, 0)``.

    PEFT saves ``base_model.model.<module>.lora_A.weight``; a ``modules_to_save`` copy as
    ``<module>.weight`` (or ``<module>.modules_to_save[.<name>].weight`` beside the base's
    ``original_module`` when embeddings were resized), and a resized LoRA-target embedding as
    ``<module>.base_layer.weight``.
    """
    name = key[len(PEFT_PREFIX):] if key.startswith(PEFT_PREFIX) else key
    parts = name.split(".")
    for i, part in enumerate(parts):
        if part in LORA_PARTS:
            return "lora", ".".join(parts[:i]), part
        if part == "modules_to_save":
            return "replace", ".".join(parts[:i] + parts[-1:]), 2
        if part == "original_module":
            return "ignore", name, 0
        if part == "base_layer":
            return "replace", ".".join(parts[:i] + parts[i + 1:]), 1
    return "replace", name, 1


def _scale(config: dict, module: str, rank: int) -> float:
    r, alpha = config.get("r", 8), config.get("lora_alpha", 8)
    if config.get("rank_pattern") or config.get("alpha_pattern"):
        from peft.utils.other import get_pattern_key

        rank_pattern, alpha_pattern = config.get("rank_pattern") or {}, config.get("alpha_pattern") or {}
        r = rank_pattern.get(get_pattern_key(list(rank_pattern), module), r)
        alpha = alpha_pattern.get(get_pattern_key(list(alpha_pattern), module), alpha)
    if r != rank:
        raise UsageError(f"adapter config says rank {r} for {module} but its weights have rank {rank}; the adapter is inconsistent")
    return alpha / math.sqrt(r) if config.get("use_rslora") else alpha / r


@dataclass
class ConfigTensors:
    """What the base's config.json describes, from a weightless meta-device model: every tensor name the
    model has (parameters and buffers), and the modules stored as ``Conv1D`` (weight is in×out)."""

    tensors: set[str]
    conv1d: set[str]


def describe_tensors(base: Path, *, required: bool) -> ConfigTensors | None:
    """The base's :class:`ConfigTensors`; ``None`` when transformers cannot build it (a usage error when ``required``)."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM
    from transformers.pytorch_utils import Conv1D

    from cnllm.core.runtime import quiet_libraries

    quiet_libraries()
    try:
        with torch.device("meta"):
            model = AutoModelForCausalLM.from_config(AutoConfig.from_pretrained(str(base)))
    except (OSError, ValueError, KeyError, TypeError) as exc:
        if required:
            raise UsageError(f"an adapter sets fan_in_fan_out, but transformers cannot describe the base architecture of {base}: {exc}") from exc
        return None
    names = set(model.state_dict()) | {name for name, _ in model.named_buffers()}
    return ConfigTensors(names, {name for name, module in model.named_modules() if isinstance(module, Conv1D)})


def drop_unknown_tensors(infos: dict[str, TensorInfo], described: ConfigTensors | None, base: Path) -> tuple[dict[str, TensorInfo], str | None]:
    """Leave out base tensors the config does not describe (transformers ignores them when loading; copying
    them would only cost disk), and a note naming them."""
    if described is None:
        return infos, None
    unknown = [name for name in infos if name not in described.tensors]
    if not unknown:
        return infos, None
    size = sum(math.prod(infos[n].shape) * _torch_dtype(info_dtype_name(infos[n])).itemsize for n in unknown)
    named = ", ".join(unknown[:3]) + (f" and {len(unknown) - 3} more" if len(unknown) > 3 else "")
    note = f"left out {len(unknown)} tensors of {base} that its config.json does not describe ({named}; {human_bytes(size)}); transformers ignores them too"
    return {n: i for n, i in infos.items() if n not in unknown}, note


def layer_count(names: Iterable[str]) -> int:
    """Transformer blocks named in a checkpoint (``….layers.N.…`` or GPT-2's ``….h.N.…``)."""
    return len({m.group(1) for n in names if (m := re.search(r"(?:^|\.)(?:layers|h)\.(\d+)\.", n))})


def _describe_layers(names: Sequence[str]) -> str:
    count = layer_count(names)
    return f"the base has {count} layers" if count else "the base has no such module"


def plan_adapter(
    adapter: Adapter, shapes: dict[str, tuple[int, ...]], infos: dict[str, TensorInfo], *, base: Path, conv1d: set[str]
) -> None:
    """Map the adapter's tensors onto base tensor names, checking every shape before any weight is read.

    ``shapes`` are the current base shapes (after earlier adapters) and are updated in place
    when this adapter replaces an embedding with a larger vocabulary.
    """
    where = f"adapter {adapter.directory} does not fit base {base}"
    pairs: dict[str, dict[str, str]] = {}
    priorities: dict[str, int] = {}
    for key in infos:
        kind, target, detail = _classify(key)
        if kind == "lora":
            pairs.setdefault(target, {})[str(detail)[-1]] = key
        elif kind == "replace":
            if target not in shapes:
                raise UsageError(f"{where}: it carries {key}, but the base has no tensor {target}")
            if priorities.get(target, 0) < int(detail):
                adapter.replacements[target], priorities[target] = key, int(detail)
    for target, key in adapter.replacements.items():
        new, old = tuple(infos[key].shape), shapes[target]
        resizable = target in VOCAB_TENSORS and len(new) == 2 and new[1:] == old[1:]
        if new != old and not resizable:
            raise UsageError(f"{where}: {target} is {format_shape(old)} in the base, the adapter's replacement {format_shape(new)}")
        shapes[target] = new
    for module, found in pairs.items():
        if set(found) != {"A", "B"}:
            missing = "lora_B" if "A" in found else "lora_A"
            raise UsageError(f"adapter {adapter.directory} is incomplete: {module} has no {missing} weight")
        target = f"{module}.weight"
        if target not in shapes:
            raise UsageError(f"{where}: it has LoRA weights for {module}, which the base lacks ({_describe_layers(list(shapes))})")
        a_shape, b_shape = tuple(infos[found["A"]].shape), tuple(infos[found["B"]].shape)
        embedding = "embedding" in found["A"]
        rank = a_shape[0]
        if len(a_shape) != 2 or len(b_shape) != 2 or b_shape[1] != rank:
            raise UsageError(f"adapter {adapter.directory} is corrupted: {module} has lora_A {format_shape(a_shape)} and lora_B {format_shape(b_shape)}")
        transpose = embedding or module in conv1d
        update_shape = (a_shape[1], b_shape[0]) if transpose else (b_shape[0], a_shape[1])
        if shapes[target] != update_shape:
            raise UsageError(
                f"{where}: {target} is {format_shape(shapes[target])} in the base, the adapter's update is {format_shape(update_shape)} "
                "(an adapter for a different model size?)"
            )
        adapter.updates[target] = LoraUpdate(module, found["A"], found["B"], rank, _scale(adapter.config, module, rank), transpose)


def format_shape(shape: Sequence[int]) -> str:
    return "×".join(str(s) for s in shape) if shape else "scalar"


def merge_rows(name: str, rows: tuple[int, int] | None, base: TensorReader, adapters: Sequence[Adapter], weights: Sequence[dict], out_dtype):
    """Rows ``[first, stop)`` (``None``: all of a scalar) of one merged tensor, in fp32 while updated.

    Starts from the last adapter that replaces the tensor (or the base) and applies the
    ``scale·B·A`` updates from there on, in order.
    """
    import torch

    start = max((i for i, a in enumerate(adapters) if name in a.replacements), default=None)
    if start is None:
        value = base.get(name) if rows is None else base.get_rows(name, *rows)
        start = 0
    else:
        value = weights[start][adapters[start].replacements[name]]
        value = value if rows is None else value[rows[0]:rows[1]]
    work = None
    for adapter, loaded in zip(adapters[start:], weights[start:]):
        update = adapter.updates.get(name)
        if update is None:
            continue
        if work is None:
            work = value.to(torch.float32, copy=True)
        a, b = loaded[update.a_key].to(torch.float32), loaded[update.b_key].to(torch.float32)
        if update.transpose:
            a = a if rows is None else a[:, rows[0]:rows[1]]
            work.addmm_(a.T, b.T, alpha=update.scale)
        else:
            b = b if rows is None else b[rows[0]:rows[1]]
            work.addmm_(b, a, alpha=update.scale)
    result = value if work is None else work
    return result.to(out_dtype) if result.is_floating_point() else result


def outputs_diverge(base: TensorReader, adapters: Sequence[Adapter], weights: Sequence[dict], shapes: dict) -> bool:
    """Whether the merged ``lm_head.weight`` differs from the merged input embedding (the adapters untie them)."""
    import torch

    embedding = EMBEDDING_NAMES[0]
    if embedding not in shapes or TIED_HEAD not in shapes:
        return False
    if not any(n in a.replacements or n in a.updates for a in adapters for n in (embedding, TIED_HEAD)):
        return False
    if shapes[embedding] != shapes[TIED_HEAD]:
        return True
    return any(
        not torch.equal(merge_rows(embedding, rows, base, adapters, weights, torch.float32), merge_rows(TIED_HEAD, rows, base, adapters, weights, torch.float32))
        for rows in row_blocks(shapes[embedding])
    )


def release(name: str, adapters: Sequence[Adapter], weights: Sequence[dict]) -> None:
    """Drop the adapter tensors a finished base tensor used (each is needed for one base tensor)."""
    for adapter, loaded in zip(adapters, weights):
        loaded.pop(adapter.replacements.get(name), None)
        update = adapter.updates.get(name)
        if update is not None:
            loaded.pop(update.a_key, None)
            loaded.pop(update.b_key, None)


def row_blocks(shape: tuple[int, ...], element_size: int = 4):
    """``(first, stop)`` row ranges of about :data:`BLOCK_BYTES` (``None`` once for a scalar)."""
    if not shape:
        yield None
        return
    row_bytes = element_size
    for size in shape[1:]:
        row_bytes *= size
    step = max(1, BLOCK_BYTES // max(1, row_bytes))
    for first in range(0, shape[0], step):
        yield first, min(shape[0], first + step)


# --- the merge ------------------------------------------------------------------------------------


def _torch_dtype(name: str):
    import torch

    return getattr(torch, name)


def info_dtype_name(info: TensorInfo) -> str:
    """The torch dtype name of a tensor described by a safetensors header (``F16``) or a pickle (``float16``)."""
    return SAFETENSORS_TORCH_DTYPES.get(info.dtype, info.dtype)


def output_layout(infos: dict[str, TensorInfo], shapes: dict[str, tuple[int, ...]], dtype: str | None) -> list[tuple]:
    """``(name, shape, torch dtype)`` of every output tensor: floating tensors in ``dtype`` (default: their own)."""
    import torch

    layout = []
    for name, info in infos.items():
        own = getattr(torch, info_dtype_name(info), None)
        if not isinstance(own, torch.dtype):
            raise UsageError(f"{info.file}: tensor {name} has an unsupported dtype {info.dtype}")
        out = _torch_dtype(dtype) if dtype and own.is_floating_point else own
        layout.append((name, shapes[name], out))
    return layout


def layout_bytes(layout: list[tuple]) -> int:
    """Bytes the tensors of an output layout take on disk (the free-space check before writing)."""
    return sum(math.prod(shape) * dtype.itemsize for _, shape, dtype in layout)


def copy_tokenizer(source: Path, target: Path) -> None:
    for item in sorted(source.iterdir()):
        if item.is_file() and (item.name.startswith("tokenizer") or item.name in TOKENIZER_EXTRA_FILES):
            shutil.copyfile(item, target / item.name)  # a new file: the umask decides its mode


def write_config(config: dict, target: Path, *, vocab_size: int | None, dtype: str | None) -> None:
    """``config.json`` with the vocabulary size and dtype of the weights beside it."""
    config = dict(config)
    if vocab_size is not None:
        if "text_config" in config and "vocab_size" not in config:
            config["text_config"] = {**config["text_config"], "vocab_size": vocab_size}
        else:
            config["vocab_size"] = vocab_size
    if dtype is not None:
        config.pop("torch_dtype", None)
        config["dtype"] = dtype
    (target / "config.json").write_text(json.dumps(config, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")


def _vocab_rows(shapes: dict[str, tuple[int, ...]], names: Sequence[str]) -> int | None:
    return next((shapes[n][0] for n in names if n in shapes), None)


VOCAB_PAD_MULTIPLE = 64


def check_merged_vocab(
    base_shapes: dict, shapes: dict, config: dict, tokenizer_dir: Path | None
) -> VocabSizes:
    """Refuse (naming tokenizer length, ``config.vocab_size`` and embedding rows) unless the merged vocabulary agrees."""
    sizes = VocabSizes(
        tokenizer_length(tokenizer_dir) if tokenizer_dir is not None else None,
        config.get("vocab_size") or config.get("text_config", {}).get("vocab_size"),
        _vocab_rows(shapes, EMBEDDING_NAMES),
        _vocab_rows(shapes, LM_HEAD_NAMES),
    )
    resized = _vocab_rows(base_shapes, EMBEDDING_NAMES) != sizes.embedding
    source = f"the tokenizer from {tokenizer_dir}" if tokenizer_dir is not None else "no tokenizer"
    if sizes.embedding is not None and sizes.lm_head is not None and sizes.embedding != sizes.lm_head:
        raise UsageError(
            f"the adapters leave {sizes.embedding} embedding rows but {sizes.lm_head} lm_head rows; "
            "an adapter that extends the vocabulary must carry both embed_tokens and lm_head (modules_to_save)"
        )
    if sizes.tokenizer is not None and sizes.embedding is not None:
        # A resized embedding may be padded past the tokenizer to the next multiple of 64 (as pt pads it).
        padded = -(-sizes.tokenizer // VOCAB_PAD_MULTIPLE) * VOCAB_PAD_MULTIPLE
        if sizes.tokenizer > sizes.embedding or (resized and sizes.embedding not in (sizes.tokenizer, padded)):
            raise UsageError(
                f"vocabulary sizes cannot agree: {source} has {sizes.tokenizer} tokens, config.vocab_size is "
                f"{sizes.config}, the merged embedding has {sizes.embedding} rows; use the tokenizer the adapter "
                "was trained with (put it in the adapter directory)"
            )
    return sizes


def merge_lora(
    base: Path | str,
    adapters: Sequence[Path | str],
    output: Path | str,
    options: MergeOptions | None = None,
    *,
    force: bool = False,
    progress: Progress = NULL_PROGRESS,
) -> MergeResult:
    """Merge LoRA adapters into ``base`` (in order) and write ``output``; see the module docstring.

    With ``options.verify`` the merged output is compared with PEFT's base+adapters before it is moved
    into place; a difference above tolerance is reported in :meth:`MergeResult.problems`.
    """
    started = time.perf_counter()
    options = options or MergeOptions()
    options.validate()
    output_format, max_shard_size, shards = options.format, options.max_shard_size, options.shards
    dtype = options.dtype.name if options.dtype is not None else None
    base, output = Path(base), Path(output)
    if not adapters:
        raise UsageError("name at least one adapter with --lora")
    check_output(output, force, inputs=[base, *adapters])
    config = load_config(base)
    for adapter_dir in adapters:  # long-context rope scaling an adapter was trained with becomes the merged model's
        config.update(adapter_config_overrides(adapter_dir))
    infos = tensor_infos(base)
    tied = ties_embeddings(config, infos)
    loaded_adapters = [read_adapter(a) for a in adapters]
    described = describe_tensors(base, required=any(a.config.get("fan_in_fan_out") for a in loaded_adapters))
    conv1d = described.conv1d if described is not None else set()
    infos, dropped = drop_unknown_tensors(infos, described, base)
    base_shapes = {name: tuple(info.shape) for name, info in with_tied_head(infos).items()}
    shapes = dict(base_shapes)
    for adapter in loaded_adapters:
        plan_adapter(adapter, shapes, tensor_infos(adapter.weights_file), base=base, conv1d=conv1d)
    tokenizer_dir = next((a.directory for a in reversed(loaded_adapters) if has_tokenizer(a.directory)), None)
    if tokenizer_dir is None and has_tokenizer(base):
        tokenizer_dir = base
    sizes = check_merged_vocab(base_shapes, shapes, config, tokenizer_dir)
    family = find_architecture(config)
    if output_format == "pth" and (family is None or not family.meta_layout):
        raise UsageError(f"--format pth writes Meta's LLaMA layout; {base} is a {config.get('model_type')} model, which has none")
    weights = [a.load() for a in loaded_adapters]
    with TiedTensorReader(base) as reader:
        untie = tied and outputs_diverge(reader, loaded_adapters, weights, shapes)
    if untie:
        config = {**config, "tie_word_embeddings": False}
        infos = with_tied_head(infos)
    shapes = {name: shape for name, shape in shapes.items() if name in infos}
    layout = output_layout(infos, shapes, dtype)
    out_dtypes = sorted({str(d).removeprefix("torch.") for _, _, d in layout if d.is_floating_point})
    notes = [dropped] if dropped else []
    ignored = [a.directory for a in loaded_adapters if a.config.get("fan_in_fan_out") and not any(u.module in conv1d for u in a.updates.values())]
    for directory in ignored:
        notes.append(f"{directory}: fan_in_fan_out ignored for Linear layers, as PEFT does")
    if untie:
        notes.append("the adapters trained the output embedding apart from the input one: lm_head.weight written, tie_word_embeddings false")
    report = None
    with atomic_dir(output, force=force, needed=layout_bytes(layout)) as tmp:
        hf_dir = tmp / ".merged-hf" if output_format == "pth" else tmp
        hf_dir.mkdir(exist_ok=True)
        writer = StreamingShardWriter(hf_dir, layout, max_shard_size=max_shard_size if output_format == "hf" else DEFAULT_SHARD_SIZE)
        progress.start(writer.total_size, "merging", unit="B")
        with TiedTensorReader(base) as reader:
            for name, shape, out_dtype in layout:
                for rows in row_blocks(shape):
                    block = merge_rows(name, rows, reader, loaded_adapters, weights, out_dtype)
                    if rows is None:
                        writer.add(name, block)
                    else:
                        writer.add_rows(name, rows[0], block)
                    progress.advance(block.numel() * block.element_size())
                release(name, loaded_adapters, weights)
        writer.close()
        progress.finish()
        del weights
        write_config(config, hf_dir, vocab_size=sizes.embedding, dtype=out_dtypes[0] if dtype and len(out_dtypes) == 1 else None)
        if (base / "generation_config.json").exists():
            shutil.copyfile(base / "generation_config.json", hf_dir / "generation_config.json")
        if tokenizer_dir is not None:
            copy_tokenizer(tokenizer_dir, hf_dir)
        if options.verify:
            limit = options.tolerance if options.tolerance is not None else max(VERIFY_TOLERANCE[d] for d in out_dtypes)
            report = verify_merge(base, [a.directory for a in loaded_adapters], hf_dir, tolerance=limit, progress=progress)
        if output_format == "pth":
            write_meta_checkpoint(hf_dir, tmp, shards=shards, progress=progress)
            if tokenizer_dir is not None:
                copy_tokenizer(tokenizer_dir, tmp)
            shutil.rmtree(hf_dir)
        result = MergeResult(
            output=output,
            format=output_format,
            dtype=str(options.dtype) if options.dtype is not None else ",".join(out_dtypes),
            adapters=[a.directory for a in loaded_adapters],
            tensors=len(layout),
            updated=len({n for a in loaded_adapters for n in a.updates}),
            replaced=len({n for a in loaded_adapters for n in a.replacements}),
            vocab=sizes,
            tokenizer_from=tokenizer_dir,
            files=[],
            total_bytes=0,
            seconds=0.0,
            verify=report,
            notes=notes,
        )
        result.files, result.total_bytes = finish_output_folder(
            tmp,
            "merge",
            inputs=[base, *result.adapters],
            options={"adapter_order": [str(a) for a in result.adapters], **dataclasses.asdict(options)},
            results=result.to_dict(),
        )
    result.seconds = time.perf_counter() - started
    return result


# --- verification -----------------------------------------------------------------------------------


def _prompt_ids(tokenizer_dir: Path, vocab: int) -> list[int]:
    if has_tokenizer(tokenizer_dir):
        from transformers import AutoTokenizer

        ids = AutoTokenizer.from_pretrained(str(tokenizer_dir))(VERIFY_PROMPT)["input_ids"]
        if ids and max(ids) < vocab:
            return ids
    return [(7 * i + 3) % vocab for i in range(16)]


def verify_merge(base: Path, adapters: Sequence[Path], merged: Path, *, tolerance: float, progress: Progress = NULL_PROGRESS) -> VerifyReport:
    """Max absolute logit difference between PEFT's base+adapters and the merged checkpoint, on a short prompt."""
    import gc

    import torch

    from cnllm.core.modelio import load_causal_lm

    progress.log("verifying: base + adapters (PEFT, unmerged) against the merged output")
    vocab = load_config(merged).get("vocab_size") or 0
    ids = torch.tensor([_prompt_ids(merged, vocab)])
    with torch.no_grad():
        # PEFT applies the adapters in order: earlier ones merged by PEFT itself, the last one left unmerged.
        model = load_causal_lm(base, lora=adapters, device="cpu", dtype=torch.float32)
        expected = model(ids).logits.float()
        del model
        gc.collect()
        model = load_causal_lm(merged, device="cpu", dtype=torch.float32)
        actual = model(ids).logits.float()
        del model
        gc.collect()
    return VerifyReport(float((expected - actual).abs().max()), tolerance, ids.shape[1])


# --- Meta consolidated.NN.pth -----------------------------------------------------------------------

META_TOP_NAMES = {"model.embed_tokens.weight": "tok_embeddings.weight", "model.norm.weight": "norm.weight", "lm_head.weight": "output.weight"}
META_LAYER_NAMES = {
    "self_attn.q_proj.weight": "attention.wq.weight",
    "self_attn.k_proj.weight": "attention.wk.weight",
    "self_attn.v_proj.weight": "attention.wv.weight",
    "self_attn.o_proj.weight": "attention.wo.weight",
    "mlp.gate_proj.weight": "feed_forward.w1.weight",
    "mlp.down_proj.weight": "feed_forward.w2.weight",
    "mlp.up_proj.weight": "feed_forward.w3.weight",
    "input_layernorm.weight": "attention_norm.weight",
    "post_attention_layernorm.weight": "ffn_norm.weight",
}
# Meta's model-parallel split: column-parallel layers by output rows, row-parallel ones (and the
# parallel embedding) by input columns; norms are replicated in every shard.
META_SPLIT_DIM = {"tok_embeddings": 1, "output": 0, "wq": 0, "wk": 0, "wv": 0, "w1": 0, "w3": 0, "wo": 1, "w2": 1}


def meta_name(name: str) -> str | None:
    """Meta's name for a Hugging Face LLaMA tensor (``None`` for buffers Meta does not store)."""
    if name in META_TOP_NAMES:
        return META_TOP_NAMES[name]
    match = re.fullmatch(r"model\.layers\.(\d+)\.(.+)", name)
    if match and match.group(2) in META_LAYER_NAMES:
        return f"layers.{match.group(1)}.{META_LAYER_NAMES[match.group(2)]}"
    if name.endswith("rotary_emb.inv_freq"):
        return None
    raise UsageError(f"tensor {name} has no place in Meta's LLaMA layout; write --format hf instead")


def unpermute(weight, heads: int):
    """Undo the q/k row permutation Hugging Face's LLaMA conversion applies (rotary halves → interleaved pairs).

    ``heads`` is the number of heads the matrix holds: attention heads for q, key/value heads for k.
    """
    rows, columns = weight.shape
    return weight.view(heads, 2, rows // heads // 2, columns).transpose(1, 2).reshape(rows, columns)


def permute(weight, heads: int):
    """The q/k row permutation of Hugging Face's LLaMA conversion (interleaved pairs → rotary halves); undone by :func:`unpermute`."""
    rows, columns = weight.shape
    return weight.view(heads, rows // heads // 2, 2, columns).transpose(1, 2).reshape(rows, columns)


def meta_ffn_params(dim: int, intermediate: int) -> dict:
    """``multiple_of`` (and ``ffn_dim_multiplier`` when needed) that reproduce ``intermediate`` with Meta's formula."""
    base = int(2 * 4 * dim / 3)
    for multiple_of in (256, 128, 64, 32, 16, 8):
        if multiple_of * ((base + multiple_of - 1) // multiple_of) == intermediate:
            return {"multiple_of": multiple_of}
    return {"multiple_of": 1, "ffn_dim_multiplier": (intermediate + 0.5) / base}


def meta_params(config: dict) -> dict:
    heads = config["num_attention_heads"]
    params = {
        "dim": config["hidden_size"],
        "n_layers": config["num_hidden_layers"],
        "n_heads": heads,
        "vocab_size": config["vocab_size"],
        "norm_eps": config.get("rms_norm_eps", 1e-6),
        **meta_ffn_params(config["hidden_size"], config["intermediate_size"]),
    }
    if config.get("num_key_value_heads", heads) != heads:
        params["n_kv_heads"] = config["num_key_value_heads"]
    theta = config.get("rope_theta") or (config.get("rope_parameters") or {}).get("rope_theta")
    if theta:
        params["rope_theta"] = theta
    return params


def _with_output_copy(tensors, tied: bool):
    for name, tensor in tensors:
        yield name, tensor
        if tied and name == EMBEDDING_NAMES[0]:
            yield TIED_HEAD, tensor


def write_meta_checkpoint(hf_dir: Path, target: Path, *, shards: int = 1, progress: Progress = NULL_PROGRESS) -> list[Path]:
    """Write ``consolidated.NN.pth`` (``shards`` model-parallel parts) and ``params.json`` from a merged HF LLaMA.

    One shard is held in memory at a time; the merged safetensors are re-read once per shard.
    """
    import torch

    config = load_config(hf_dir)
    heads = config["num_attention_heads"]
    kv_heads = config.get("num_key_value_heads", heads)
    files = []
    # Meta's layout always has output.weight: a tied model's is a copy of its input embedding.
    tied = tied_head_source(tensor_infos(hf_dir)) is not None
    progress.start(shards, "writing consolidated.*.pth", unit="shard")
    for number in range(shards):
        state = {}
        for name, tensor in _with_output_copy(stream_tensors(hf_dir), tied):
            meta = meta_name(name)
            if meta is None:
                continue
            kind = meta.split(".")[-2]
            if kind == "wq":
                tensor = unpermute(tensor, heads)
            elif kind == "wk":
                tensor = unpermute(tensor, kv_heads)
            dim = META_SPLIT_DIM.get(kind)
            if shards > 1 and dim is not None:
                if tensor.shape[dim] % shards:
                    raise UsageError(f"{name} ({format_shape(tensor.shape)}) cannot be split into {shards} equal shards along dimension {dim}")
                tensor = tensor.chunk(shards, dim)[number].clone()
            state[meta] = tensor
        path = target / f"consolidated.{number:02d}.pth"
        torch.save(state, path)
        files.append(path)
        del state
        progress.advance(1)
    progress.finish()
    (target / "params.json").write_text(json.dumps(meta_params(config), indent=2) + "\n", encoding="utf-8")
    return files
