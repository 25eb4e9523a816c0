"""Meta LLaMA checkpoints (``params.json`` + ``consolidated.NN.pth``) → a Hugging Face model, one layer at a time.

The model-parallel shards are memory-mapped (``weights_only`` pickles) and re-opened for each
layer, so the pages of a finished layer are unmapped: peak memory is about one layer of every
shard plus the joined tensor being written, never the model. Column-parallel tensors (wq, wk, wv,
w1, w3, output) are joined along their rows, row-parallel ones (wo, w2) along their columns; the
embedding along columns (LLaMA-1/2) or rows (Llama-3), whichever its shard shapes show. q and k
get the rotary permutation Hugging Face's LLaMA uses (the inverse of merge-lora's ``--format pth``
export, :func:`cnllm.core.merge.permute`). The tokenizer becomes Hugging Face files: a SentencePiece
``tokenizer.model`` exactly (:mod:`cnllm.core.tokenizers.hf_export`), a Llama-3 tiktoken file as a
byte-level BPE ``tokenizer.json`` (:mod:`cnllm.core.tokenizers.tiktoken`), Hugging Face tokenizer files
beside the checkpoint as they are.
"""

from __future__ import annotations

import dataclasses
import json
import re
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Optional

from cnllm.core.architectures import LLAMA
from cnllm.core.atomic import atomic_dir, check_output
from cnllm.core.config import coerce_fields
from cnllm.core.dtypes import DType
from cnllm.core.errors import UsageError
from cnllm.core.files import read_json_object
from cnllm.core.merge import META_LAYER_NAMES, META_SPLIT_DIM, META_TOP_NAMES, copy_tokenizer, format_shape, permute
from cnllm.core.progress import NULL_PROGRESS, Progress
from cnllm.core.provenance import finish_output_folder
from cnllm.core.tensors import DEFAULT_SHARD_SIZE, ShardSize, StreamingShardWriter, load_pickled_tensors

if TYPE_CHECKING:
    import torch

HF_NAMES = {meta: hf for hf, meta in META_TOP_NAMES.items()}
HF_LAYER_NAMES = {meta: hf for hf, meta in META_LAYER_NAMES.items()}
SKIPPED = ("rope.freqs",)  # LLaMA-1 stores the rotary frequencies; Hugging Face recomputes them
LLAMA3_VOCAB = 128000  # Llama-3's tiktoken ranks; its special tokens follow
LLAMA31_ROPE_SCALING = {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0, "original_max_position_embeddings": 8192}


@dataclass
class MetaOptions:
    """How :func:`convert_meta` writes its output: ``cnllm convert-meta`` flags."""

    dtype: Optional[DType] = None  # None: the checkpoint's
    max_shard_size: ShardSize = DEFAULT_SHARD_SIZE
    tokenizer: Optional[Path] = None  # None: tokenizer files beside the checkpoint, or tokenizer.model in its parent
    max_position_embeddings: Optional[int] = None  # None: params.json's max_seq_len, else the LLaMA generation's

    def __post_init__(self) -> None:
        coerce_fields(self)

    def validate(self) -> None:
        if self.max_position_embeddings is not None and self.max_position_embeddings < 1:
            raise UsageError(f"--max-position-embeddings must be at least 1, got {self.max_position_embeddings}")


@dataclass
class MetaResult:
    output: Path
    source: Path
    shards: int
    generation: str
    config: dict
    tokenizer: dict | None
    dtype: str
    tensors: int
    files: list[str] = field(default_factory=list)
    total_bytes: int = 0
    seconds: float = 0.0
    notes: list[str] = field(default_factory=list)

    def to_dict(self) -> dict:
        """The one JSON shape of a conversion: ``--json`` and the provenance record."""
        return {
            "output": str(self.output),
            "source": str(self.source),
            "shards": self.shards,
            "generation": self.generation,
            "config": self.config,
            "tokenizer": self.tokenizer,
            "dtype": self.dtype,
            "tensors": self.tensors,
            "files": self.files,
            "total_bytes": self.total_bytes,
            "seconds": round(self.seconds, 3),
            "notes": self.notes,
        }


# --- reading the checkpoint ------------------------------------------------------------------------


def shard_files(source: Path) -> list[Path]:
    """``consolidated.00.pth`` … in order; refuses gaps (a missing model-parallel part)."""
    if not source.exists():
        raise UsageError(f"checkpoint folder {source} does not exist")
    if not source.is_dir():
        raise UsageError(f"{source} is not a directory (expected params.json and consolidated.NN.pth)")
    if not any(source.iterdir()):
        raise UsageError(f"{source} is empty (a Meta LLaMA checkpoint folder has params.json and consolidated.00.pth …)")
    found = {}
    for path in source.glob("consolidated.*.pth"):
        match = re.fullmatch(r"consolidated\.(\d+)\.pth", path.name)
        if match:
            found[int(match.group(1))] = path
    if not found:
        raise UsageError(f"{source} holds no consolidated.NN.pth (a Meta LLaMA checkpoint folder has params.json and consolidated.00.pth …)")
    missing = [f"consolidated.{n:02d}.pth" for n in range(max(found) + 1) if n not in found]
    if missing:
        raise UsageError(f"{source} is incomplete: {', '.join(missing)} missing (model-parallel parts are numbered from 00)")
    return [found[n] for n in sorted(found)]


def read_params(source: Path) -> dict:
    path = source / "params.json"
    if not path.exists():
        raise UsageError(f"{source} has consolidated.NN.pth but no params.json")
    params = read_json_object(path)
    missing = [key for key in ("dim", "n_layers", "n_heads") if not isinstance(params.get(key), int)]
    if missing:
        raise UsageError(f"{path} lacks {', '.join(missing)}; is it a LLaMA params.json?")
    return params


def hf_name(meta: str) -> str | None:
    """Hugging Face's name for a Meta tensor (``None`` for the rotary frequencies Hugging Face recomputes)."""
    if meta in SKIPPED:
        return None
    if meta in HF_NAMES:
        return HF_NAMES[meta]
    match = re.fullmatch(r"layers\.(\d+)\.(.+)", meta)
    if match and match.group(2) in HF_LAYER_NAMES:
        return f"model.layers.{match.group(1)}.{HF_LAYER_NAMES[match.group(2)]}"
    raise UsageError(f"tensor {meta} is not part of Meta's LLaMA layout")


def kept_hf_name(meta: str) -> str:
    """:func:`hf_name` of a tensor the plan keeps (the skipped ones never reach a layout)."""
    name = hf_name(meta)
    assert name is not None, meta
    return name


def _kind(meta: str) -> str:
    return meta.split(".")[-2]


def join_dim(meta: str, part_shape: tuple[int, ...], params: dict, shards: int) -> int | None:
    """The dimension model-parallel parts of ``meta`` are joined along (``None``: replicated in every shard)."""
    if shards == 1:
        return None
    kind = _kind(meta)
    if kind == "tok_embeddings":  # LLaMA-1/2 split the embedding by columns, Llama-3 by rows
        return 0 if part_shape[1] == params["dim"] else 1
    return META_SPLIT_DIM.get(kind)


def ffn_size(params: dict) -> int | None:
    """The feed-forward width Meta's code derives from ``dim``, ``multiple_of`` and ``ffn_dim_multiplier``."""
    multiple_of = params.get("multiple_of")
    if not multiple_of:
        return None
    hidden = int(2 * 4 * params["dim"] / 3)
    if params.get("ffn_dim_multiplier") is not None:
        hidden = int(params["ffn_dim_multiplier"] * hidden)
    return multiple_of * ((hidden + multiple_of - 1) // multiple_of)


@dataclass
class Plan:
    params: dict
    shards: list[Path]
    groups: list[list[str]]  # Meta names, loaded together: the embedding, each layer, norm + output
    shapes: dict[str, tuple[int, ...]]  # joined, Meta names
    dims: dict[str, int | None]
    dtypes: dict[str, torch.dtype]


def plan_checkpoint(source: Path) -> Plan:
    """Names, joined shapes and dtypes of every tensor, checked against ``params.json`` before any weight is read."""
    shards = shard_files(source)  # first: read_params's message presumes the shards are there
    params = read_params(source)
    parts: list[dict[str, tuple[tuple[int, ...], torch.dtype]]] = []
    for path in shards:
        state = load_pickled_tensors(path)
        parts.append({name: (tuple(t.shape), t.dtype) for name, t in state.items()})
        del state
    names = [n for n in parts[0] if n not in SKIPPED]
    for number, part in enumerate(parts[1:], start=1):
        if [n for n in part if n not in SKIPPED] != names:
            raise UsageError(f"{shards[number].name} holds different tensors than {shards[0].name}; the parts are not of one checkpoint")
    shapes, dims = {}, {}
    for name in names:
        hf_name(name)
        part_shape = parts[0][name][0]
        dim = join_dim(name, part_shape, params, len(shards))
        if any(p[name][0] != part_shape for p in parts):
            raise UsageError(f"{name} has different shapes in the model-parallel parts: {', '.join(format_shape(p[name][0]) for p in parts)}")
        shape = list(part_shape)
        if dim is not None:
            shape[dim] *= len(shards)
        shapes[name], dims[name] = tuple(shape), dim
    layers = params["n_layers"]
    found_layers = {int(m.group(1)) for n in names if (m := re.match(r"layers\.(\d+)\.", n))}
    if found_layers != set(range(layers)):
        raise UsageError(f"params.json says {layers} layers, the checkpoint holds {len(found_layers)}")
    for required in ("tok_embeddings.weight", "norm.weight", "output.weight"):
        if required not in shapes:
            raise UsageError(f"the checkpoint has no {required}")
    dim, heads = params["dim"], params["n_heads"]
    kv_heads = params.get("n_kv_heads") or heads
    head_dim = dim // heads
    expected = {
        "tok_embeddings.weight": (None, dim),
        "layers.0.attention.wq.weight": (heads * head_dim, dim),
        "layers.0.attention.wk.weight": (kv_heads * head_dim, dim),
        "layers.0.feed_forward.w1.weight": (ffn_size(params), dim),
    }
    vocab = params.get("vocab_size")
    if isinstance(vocab, int) and vocab > 0:
        expected["tok_embeddings.weight"] = (vocab, dim)
    for name, want in expected.items():
        got = shapes.get(name)
        if got is None or len(got) != 2 or any(w is not None and w != g for w, g in zip(want, got)):
            wanted = "×".join("?" if w is None else str(w) for w in want)
            raise UsageError(
                f"{name} is {format_shape(got or ())}, params.json implies {wanted} "
                f"(dim {dim}, {heads} heads, {kv_heads} key/value heads, multiple_of {params.get('multiple_of')}, "
                f"ffn_dim_multiplier {params.get('ffn_dim_multiplier')}); params.json and weights do not belong together"
            )
    groups = [["tok_embeddings.weight"]]
    groups += [[n for n in names if n.startswith(f"layers.{i}.")] for i in range(layers)]
    groups.append([n for n in names if not n.startswith("layers.") and n != "tok_embeddings.weight"])
    return Plan(params, shards, groups, shapes, dims, {n: parts[0][n][1] for n in names})


def joined(name: str, plan: Plan, states: list[dict]):
    """One tensor, its model-parallel parts joined, in Hugging Face's q/k row order."""
    import torch

    dim = plan.dims[name]
    tensor = states[0][name] if dim is None else torch.cat([state[name] for state in states], dim=dim)
    kind = _kind(name)
    if kind == "wq":
        tensor = permute(tensor, plan.params["n_heads"])
    elif kind == "wk":
        tensor = permute(tensor, plan.params.get("n_kv_heads") or plan.params["n_heads"])
    return tensor


# --- config and tokenizer ----------------------------------------------------------------------------


def generation(params: dict, vocab: int) -> str:
    if vocab >= LLAMA3_VOCAB:
        return "Llama-3.1" if params.get("use_scaled_rope") else "Llama-3"
    return "LLaMA-1" if params.get("norm_eps", 1e-6) <= 1e-6 else "LLaMA-2"  # LLaMA-2 ships norm_eps 1e-5


def max_positions(params: dict, family: str) -> int:
    """The context length transformers' own conversion gives each LLaMA generation (params.json rarely says)."""
    if params.get("max_seq_len"):
        return int(params["max_seq_len"])
    return {"LLaMA-1": 2048, "LLaMA-2": 4096, "Llama-3": 8192, "Llama-3.1": 131072}[family]


def build_config(plan: Plan, *, max_position_embeddings: int, special_ids: dict, dtype: str) -> dict:
    """``config.json`` of the equivalent model of the LLaMA row (the family Meta's layout belongs to).

    Written as plain JSON with the long-standing ``rope_theta`` / ``rope_scaling`` keys, which every
    transformers version reads (5.x folds them into ``rope_parameters``); importing transformers for
    ``LlamaConfig`` alone would add about 85 MB to the conversion's peak memory.
    """
    params = plan.params
    heads = params["n_heads"]
    config = {
        "architectures": [LLAMA.hf_classes[0]],
        "model_type": LLAMA.model_type,
        "vocab_size": plan.shapes["tok_embeddings.weight"][0],
        "hidden_size": params["dim"],
        "intermediate_size": plan.shapes["layers.0.feed_forward.w1.weight"][0],
        "num_hidden_layers": params["n_layers"],
        "num_attention_heads": heads,
        "num_key_value_heads": params.get("n_kv_heads") or heads,
        "head_dim": params["dim"] // heads,
        "hidden_act": "silu",
        "max_position_embeddings": max_position_embeddings,
        "rms_norm_eps": params.get("norm_eps", 1e-6),
        "rope_theta": float(params.get("rope_theta", 10000.0)),
        "rope_scaling": dict(LLAMA31_ROPE_SCALING) if params.get("use_scaled_rope") else None,
        "attention_bias": False,
        "attention_dropout": 0.0,
        "mlp_bias": False,
        "initializer_range": 0.02,
        "pretraining_tp": 1,
        "use_cache": True,
        "tie_word_embeddings": False,
        **special_ids,
        "dtype": dtype,
    }
    return config


def find_tokenizer(source: Path, given: Path | None) -> Path | None:
    """The tokenizer to convert: ``given`` (a file or folder), else the checkpoint folder's, else ``tokenizer.model`` in its parent (LLaMA-1's layout)."""
    if given is not None:
        if not given.exists():
            raise UsageError(f"tokenizer {given} does not exist")
        return given
    for folder in (source, source.parent):
        if (folder / "tokenizer.json").exists() or (folder / "tokenizer.model").exists():
            return folder
    return None


def tokenizer_inputs(found: Path | None, source: Path) -> list[Path]:
    """What the tokenizer is read from, for the output-overlap check: the checkpoint's parent (LLaMA-1's layout)
    holds other models' folders too, so there only its tokenizer files count, not the whole folder."""
    if found is None:
        return []
    if found.is_dir() and found == source.parent:
        return [found / "tokenizer.json", found / "tokenizer.model"]
    return [found]


def write_tokenizer(found: Path, target: Path, *, family: str, max_length: int, vocab: int) -> dict:
    """Hugging Face tokenizer files in ``target``; returns what was converted."""
    from cnllm.core.tokenizers import tiktoken
    from cnllm.core.tokenizers.hf_export import write_spm_tokenizer_dir
    from cnllm.core.tokenizers.spm import load_proto

    folder = found if found.is_dir() else None
    if folder is not None and (folder / "tokenizer.json").exists():
        copy_tokenizer(folder, target)
        return {"kind": "huggingface", "from": str(folder)}
    model = folder / "tokenizer.model" if folder is not None else found
    if not model.exists():
        raise UsageError(f"{found} has no tokenizer.model or tokenizer.json")
    if tiktoken.is_tiktoken_file(model):
        ranks = tiktoken.read_ranks(model)
        specials = vocab - len(ranks)  # Meta's special tokens fill the embedding rows after the ranks (256 in Llama-3)
        if specials < 2:
            raise UsageError(f"{model} has {len(ranks)} tiktoken ranks, the checkpoint's embedding {vocab} rows: no room for <|begin_of_text|>/<|end_of_text|>")
        tiktoken.write_tokenizer_dir(ranks, target, specials=specials, scaled_rope=family == "Llama-3.1", model_max_length=max_length)
        return {"kind": "tiktoken", "from": str(model)}
    write_spm_tokenizer_dir(load_proto(model), target, model_max_length=max_length)
    return {"kind": "sentencepiece", "from": str(model)}


def special_token_ids(target: Path) -> dict:
    """``bos_token_id`` / ``eos_token_id`` of the tokenizer written into ``target``."""
    from tokenizers import Tokenizer

    if not (target / "tokenizer.json").exists():
        return {}
    tokenizer = Tokenizer.from_file(str(target / "tokenizer.json"))
    ids = {}
    for source in ("special_tokens_map.json", "tokenizer_config.json"):
        path = target / source
        if not path.exists():
            continue
        document = read_json_object(path)
        for key in ("bos_token", "eos_token"):
            token = document.get(key)
            token = token.get("content") if isinstance(token, dict) else token
            if isinstance(token, str) and f"{key}_id" not in ids and tokenizer.token_to_id(token) is not None:
                ids[f"{key}_id"] = tokenizer.token_to_id(token)
    return ids


# --- the conversion ---------------------------------------------------------------------------------


def convert_meta(
    source: Path | str,
    output: Path | str,
    options: MetaOptions | None = None,
    *,
    force: bool = False,
    progress: Progress = NULL_PROGRESS,
) -> MetaResult:
    """Convert the Meta checkpoint folder ``source`` into the Hugging Face model folder ``output``; see the module docstring."""
    import torch

    started = time.perf_counter()
    options = options or MetaOptions()
    options.validate()
    source, output = Path(source), Path(output)
    tokenizer_source = find_tokenizer(source, options.tokenizer)
    check_output(output, force, inputs=[source, *tokenizer_inputs(tokenizer_source, source)])
    plan = plan_checkpoint(source)
    vocab = plan.shapes["tok_embeddings.weight"][0]
    family = generation(plan.params, vocab)
    positions = options.max_position_embeddings or max_positions(plan.params, family)
    out_dtype = options.dtype.torch if options.dtype is not None else None
    layout = []
    for group in plan.groups:
        for name in group:
            dtype = plan.dtypes[name]
            layout.append((kept_hf_name(name), plan.shapes[name], out_dtype if out_dtype is not None and dtype.is_floating_point else dtype))
    out_types = {name: dtype for name, _, dtype in layout}
    dtypes = sorted({str(d).removeprefix("torch.") for d in out_types.values() if d.is_floating_point})
    notes = []
    with atomic_dir(output, force=force) as tmp:
        tokenizer = None
        if tokenizer_source is not None:
            tokenizer = write_tokenizer(tokenizer_source, tmp, family=family, max_length=positions, vocab=vocab)
        else:
            notes.append(f"no tokenizer found beside {source} or in its parent; give one with --tokenizer")
        config = build_config(plan, max_position_embeddings=positions, special_ids=special_token_ids(tmp), dtype=dtypes[0])
        if tokenizer is not None:
            from cnllm.core.modelio import tokenizer_length

            tokens = tokenizer_length(tmp)
            tokenizer["tokens"] = tokens
            if tokens > vocab:
                raise UsageError(f"the tokenizer from {tokenizer['from']} has {tokens} tokens, the checkpoint's embedding only {vocab} rows")
        (tmp / "config.json").write_text(json.dumps(config, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")
        generation_config = {k: config[k] for k in ("bos_token_id", "eos_token_id") if config.get(k) is not None}
        (tmp / "generation_config.json").write_text(json.dumps(generation_config, indent=2) + "\n", encoding="utf-8")
        writer = StreamingShardWriter(tmp, layout, max_shard_size=options.max_shard_size)
        progress.start(writer.total_size, "converting", unit="B")
        with torch.no_grad():
            for group in plan.groups:
                states = [load_pickled_tensors(path) for path in plan.shards]  # mapped again per layer: finished pages are released
                for name in group:
                    tensor = joined(name, plan, states).to(out_types[kept_hf_name(name)])
                    writer.add(kept_hf_name(name), tensor)
                    progress.advance(tensor.numel() * tensor.element_size())
                    del tensor
                del states
        writer.close()
        progress.finish()
        result = MetaResult(
            output=output,
            source=source,
            shards=len(plan.shards),
            generation=family,
            config={
                key: config.get(key)
                for key in ("hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads", "num_key_value_heads", "vocab_size", "max_position_embeddings")
            }
            | {"rope_theta": config["rope_theta"]},
            tokenizer=tokenizer,
            dtype=str(options.dtype) if options.dtype is not None else ",".join(dtypes),
            tensors=len(layout),
            notes=notes,
        )
        result.files, result.total_bytes = finish_output_folder(
            tmp,
            "convert-meta",
            inputs=[source] + ([tokenizer_source] if tokenizer_source is not None and tokenizer_source != source else []),
            options=dataclasses.asdict(options),
            results=result.to_dict(),
        )
    result.seconds = time.perf_counter() - started
    return result
