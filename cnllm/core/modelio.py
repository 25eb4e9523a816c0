"""Model directories: config, tokenizer and the vocabulary-size agreement every command checks.

The most common failure when adapting LLaMA to Chinese is a vocabulary mismatch (tokenizer
length, ``config.vocab_size`` and the embedding rows disagree). :func:`vocab_sizes` reads all
three cheaply (headers only) and :func:`check_vocab_agreement` names exactly which disagrees.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Sequence

from cnllm.core.architectures import ties_by_default
from cnllm.core.errors import UsageError
from cnllm.core.files import read_json, read_json_object
from cnllm.core.tensors import TensorInfo, TensorReader, tensor_infos

if TYPE_CHECKING:
    from cnllm.core.rope import RopeOptions

EMBEDDING_NAMES = ("model.embed_tokens.weight", "tok_embeddings.weight", "embed_tokens.weight")
LM_HEAD_NAMES = ("lm_head.weight", "output.weight")
TIED_HEAD = "lm_head.weight"


def tied_head_source(infos: dict[str, TensorInfo]) -> str | None:
    """The input embedding that doubles as the output embedding of a tied checkpoint (SmolLM2, Llama-3.2-1B:
    ``tie_word_embeddings``, no ``lm_head.weight`` stored), else ``None``."""
    if any(name in infos for name in LM_HEAD_NAMES):
        return None
    return next((name for name in EMBEDDING_NAMES[:1] if name in infos), None)


def with_tied_head(infos: dict[str, TensorInfo]) -> dict[str, TensorInfo]:
    """``infos`` plus ``lm_head.weight`` described by the input embedding when the checkpoint ties them."""
    source = tied_head_source(infos)
    return infos if source is None else {**infos, TIED_HEAD: infos[source]}


def ties_embeddings(config: dict, infos: dict[str, TensorInfo]) -> bool:
    """Whether a checkpoint's output embedding is its input embedding: none stored, or ``tie_word_embeddings``
    set (transformers then ignores a stored ``lm_head.weight``; unset, the family's default decides)."""
    return tied_head_source(infos) is not None or ties_by_default(config)


class TiedTensorReader(TensorReader):
    """A :class:`TensorReader` that also answers for ``lm_head.weight`` of a tied checkpoint (its input embedding)."""

    def __init__(self, model: Path | str):
        super().__init__(model)
        source = tied_head_source(self.infos)
        self.aliases = {} if source is None else {TIED_HEAD: source}
        self.infos = with_tied_head(self.infos)

    def get(self, name: str):
        return super().get(self.aliases.get(name, name))

    def get_rows(self, name: str, first: int, stop: int):
        return super().get_rows(self.aliases.get(name, name), first, stop)


# config.json fields every command relies on, with the type they must have when present (null allowed).
CONFIG_SIZES = (
    "vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
    "num_key_value_heads", "max_position_embeddings", "head_dim",
)
CONFIG_NUMBERS = ("rms_norm_eps", "rope_theta", "initializer_range")


def load_config(model_dir: Path | str) -> dict:
    """``config.json`` as a mapping whose size fields are positive integers (a usage error naming the field otherwise)."""
    path = Path(model_dir) / "config.json"
    if not Path(model_dir).is_dir():
        raise UsageError(f"{model_dir} is not a model directory")
    if not path.exists():
        raise UsageError(f"{model_dir} is not a Hugging Face model directory (no config.json)")
    return check_config(read_json(path), path)


def check_config(config: object, path: Path, *, prefix: str = "") -> dict[str, Any]:
    """``config`` as the mapping it must be; refused when it is not one or its known fields have the wrong type
    (``prefix``: ``text_config.``)."""
    if not isinstance(config, dict):
        raise UsageError(f"{path}: {prefix.rstrip('.') or 'the file'} is not a JSON object (a mapping of settings)")
    for key in CONFIG_SIZES:
        value = config.get(key)
        if value is not None and (not isinstance(value, int) or isinstance(value, bool) or value < 1):
            raise UsageError(f"{path}: {prefix}{key} must be a positive integer, not {value!r}")
    for key in CONFIG_NUMBERS:
        value = config.get(key)
        if value is not None and (not isinstance(value, (int, float)) or isinstance(value, bool) or not math.isfinite(value)):
            raise UsageError(f"{path}: {prefix}{key} must be a finite number, not {value!r}")
    for key, kind, what in (("model_type", str, "a string"), ("tie_word_embeddings", bool, "true or false")):
        if config.get(key) is not None and not isinstance(config[key], kind):
            raise UsageError(f"{path}: {prefix}{key} must be {what}, not {config[key]!r}")
    if "text_config" in config and not prefix:
        check_config(config["text_config"], path, prefix="text_config.")
    return config


def has_tokenizer(directory: Path | str) -> bool:
    directory = Path(directory)
    return (directory / "tokenizer.json").exists() or (directory / "tokenizer.model").exists()


def tokenizer_length(tokenizer_dir: Path | str) -> int:
    """Number of ids the tokenizer can produce (added tokens included), without importing transformers."""
    tokenizer_dir = Path(tokenizer_dir)
    if (tokenizer_dir / "tokenizer.json").exists():
        tokenizer = read_tokenizer_json(tokenizer_dir / "tokenizer.json")
        ids = [tokenizer.get_vocab_size(with_added_tokens=True) - 1]
        ids += [int(i) for i in _added_tokens_json(tokenizer_dir).values()]
        return max(ids) + 1
    if (tokenizer_dir / "tokenizer.model").exists():
        from cnllm.core.tokenizers.spm import load_processor

        size = load_processor(tokenizer_dir / "tokenizer.model").get_piece_size()
        ids = [size - 1] + [int(i) for i in _added_tokens_json(tokenizer_dir).values()]
        return max(ids) + 1
    raise UsageError(f"{tokenizer_dir} has no tokenizer (tokenizer.json or tokenizer.model)")


def read_tokenizer_json(path: Path):
    """A ``tokenizers.Tokenizer`` from ``path``, or a usage error naming the file (nested too deeply, not a tokenizer)."""
    from tokenizers import Tokenizer

    try:
        return Tokenizer.from_file(str(path))
    except Exception as exc:  # tokenizers raises a bare Exception on bad files
        raise UsageError(f"{path} is not a valid tokenizer file: {exc}") from None


def _added_tokens_json(directory: Path) -> dict[str, Any]:
    path = directory / "added_tokens.json"
    return read_json_object(path) if path.exists() else {}


@dataclass
class VocabSizes:
    tokenizer: int | None
    config: int | None
    embedding: int | None
    lm_head: int | None

    def describe(self) -> str:
        parts = [f"tokenizer {self.tokenizer}", f"config.vocab_size {self.config}", f"embedding rows {self.embedding}"]
        if self.lm_head is not None and self.lm_head != self.embedding:
            parts.append(f"lm_head rows {self.lm_head}")
        return ", ".join(parts)


def vocab_sizes(model_dir: Path | str, tokenizer_dir: Path | str | None = None) -> VocabSizes:
    model_dir = Path(model_dir)
    config = load_config(model_dir)
    infos = tensor_infos(model_dir)
    embedding = next((infos[n].shape[0] for n in EMBEDDING_NAMES if n in infos), None)
    lm_head = next((infos[n].shape[0] for n in LM_HEAD_NAMES if n in infos), None)
    tok_dir = Path(tokenizer_dir) if tokenizer_dir is not None else model_dir
    tokenizer = tokenizer_length(tok_dir) if has_tokenizer(tok_dir) else None
    vocab = config.get("vocab_size") or config.get("text_config", {}).get("vocab_size")
    return VocabSizes(tokenizer, vocab, embedding, lm_head)


def check_vocab_agreement(sizes: VocabSizes, *, where: str = "") -> None:
    """Raise a usage error naming the disagreement; a tokenizer shorter than the (padded) embedding is fine."""
    prefix = f"{where}: " if where else ""
    if sizes.config is not None and sizes.embedding is not None and sizes.config != sizes.embedding:
        raise UsageError(f"{prefix}config.vocab_size ({sizes.config}) differs from the embedding rows ({sizes.embedding}); {sizes.describe()}")
    if sizes.lm_head is not None and sizes.embedding is not None and sizes.lm_head != sizes.embedding:
        raise UsageError(f"{prefix}lm_head rows ({sizes.lm_head}) differ from the embedding rows ({sizes.embedding}); {sizes.describe()}")
    rows = sizes.embedding if sizes.embedding is not None else sizes.config
    if sizes.tokenizer is not None and rows is not None and sizes.tokenizer > rows:
        raise UsageError(
            f"{prefix}the tokenizer has {sizes.tokenizer} tokens but the model only {rows} embedding rows "
            f"({sizes.describe()}): wrong tokenizer, or the embeddings were not resized"
        )


def adapter_vocab_rows(adapter_dir: Path | str) -> int | None:
    """Rows of the full embedding/lm_head an adapter carries (``modules_to_save`` copies, or a resized
    LoRA-target embedding's ``base_layer``), if any: the size the base must have before PEFT applies it."""
    rows = [
        info.shape[0]
        for name, info in tensor_infos(adapter_dir).items()
        if ("embed_tokens" in name or "lm_head" in name) and name.endswith(".weight") and len(info.shape) == 2 and "lora_" not in name
    ]
    return max(rows) if rows else None


def default_device() -> str:
    import torch

    if torch.cuda.is_available():
        return "cuda"
    if getattr(torch.backends, "mps", None) is not None and torch.backends.mps.is_available():
        return "mps"
    return "cpu"


def default_dtype(device: str):
    """bf16 on GPUs that support it, fp16 on other accelerators, fp32 on CPU."""
    import torch

    if device.startswith("cuda"):
        return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    if device == "mps":
        return torch.float16
    return torch.float32


def check_tokenizer_files(directory: Path | str) -> None:
    """A usage error for a tokenizer directory transformers would fail on with a misleading message
    (no tokenizer at all; a garbage ``tokenizer.model``, which sends it looking for tiktoken; a ``tokenizer.json``
    that tokenizers refuses with a bare Exception)."""
    directory = Path(directory)
    if not has_tokenizer(directory):
        raise UsageError(f"{directory} has no tokenizer (tokenizer.json or tokenizer.model)")
    if (directory / "tokenizer.json").is_file():
        read_tokenizer_json(directory / "tokenizer.json")
    if (directory / "tokenizer.model").is_file():
        from cnllm.core.tokenizers.spm import load_processor

        load_processor(directory / "tokenizer.model")


def check_lora_adapter(lora: Path | str) -> None:
    """An adapter PEFT can load: ``adapter_config.json``, and weights that are plain tensors (a pickle holding
    anything else is refused here in one line, before PEFT would relay torch's advice to turn ``weights_only`` off)."""
    if not (Path(lora) / "adapter_config.json").is_file():
        raise UsageError(f"--lora {lora} is not a PEFT adapter directory (no adapter_config.json)")
    read_adapter_config(lora)
    tensor_infos(lora)


def read_adapter_config(adapter: Path | str) -> dict:
    """An adapter's ``adapter_config.json``, refused in one line unless it is a JSON object."""
    path = Path(adapter) / "adapter_config.json"
    return read_json_object(path, what="a PEFT adapter's settings")


def load_tokenizer(model_dir: Path | str, *, trust_remote_code: bool = False):
    """The Hugging Face tokenizer of a model directory, with a usage error when there is none."""
    from transformers import AutoTokenizer

    check_tokenizer_files(model_dir)
    return AutoTokenizer.from_pretrained(str(model_dir), trust_remote_code=trust_remote_code)


def tokenizer_adds_bos(tokenizer) -> bool:
    """Whether a Hugging Face tokenizer puts its BOS before a text (the model's own rule, which the one
    BOS rule of :func:`cnllm.core.templates.bos_needed` follows)."""
    if tokenizer.bos_token_id is None:
        return False
    probe = tokenizer("a")["input_ids"]
    return bool(probe) and probe[0] == tokenizer.bos_token_id


def load_causal_lm(
    model_dir: Path | str,
    *,
    lora: Path | str | Sequence[Path | str] | None = None,
    device: str | None = None,
    place: bool = True,
    dtype=None,
    load_in_4bit: bool = False,
    load_in_8bit: bool = False,
    trust_remote_code: bool = False,
    rope: "RopeOptions | None" = None,
    n_ctx: int | None = None,
    attn_implementation: str | None = None,
    config_overrides: dict | None = None,
):
    """The one Hugging Face causal-LM loader: training, generation, evaluation and merge verification.

    ``device``: a device name, default CUDA, else MPS, else CPU; ``place=False`` leaves the weights where
    transformers loads them (training: the Trainer places the model). ``dtype``: a torch dtype, default
    bf16/fp16 on accelerators and fp32 on CPU. ``load_in_4bit``/``load_in_8bit`` need CUDA (bitsandbytes;
    NF4 with double quantisation, ``dtype`` as compute dtype) and put the model on this rank's GPU.
    ``lora``: PEFT adapters applied in order, the base's embeddings first resized to each adapter's own
    rows (:func:`adapter_vocab_rows`); all but the last are merged in, the last stays unmerged.
    Weights load from safetensors, or from ``.bin`` with ``weights_only`` (transformers' default).
    ``rope``: context extension applied to the config before the weights load (``n_ctx``: the context it is
    for, :mod:`cnllm.core.rope`); ``attn_implementation``: eager, sdpa or flash_attention_2 (checked first).
    ``config_overrides``: config keys set before the weights load (a long-context training run's rope scaling);
    the last adapter's own overrides (:func:`adapter_config_overrides`) apply too.
    The model comes back in eval mode.
    """
    import os
    import warnings

    import torch
    from transformers import AutoModelForCausalLM

    from cnllm.core.runtime import quiet_libraries

    quiet_libraries()
    load_config(model_dir)
    tensor_infos(model_dir)  # a truncated or corrupted shard is a usage error naming the file
    adapters = [] if lora is None else [Path(lora)] if isinstance(lora, (str, Path)) else [Path(a) for a in lora]
    for adapter in adapters:
        if not (adapter / "adapter_config.json").exists():
            raise UsageError(f"{adapter} is not a PEFT adapter directory (no adapter_config.json)")
    quantized = load_in_4bit or load_in_8bit
    if quantized and not torch.cuda.is_available():
        raise UsageError("--load-in-4bit/--load-in-8bit need a CUDA GPU (bitsandbytes); none is available")
    device = device or default_device()
    dtype = dtype or default_dtype(device)
    kwargs: dict = {"dtype": dtype, "trust_remote_code": trust_remote_code}
    if attn_implementation is not None:
        check_attn_implementation(attn_implementation, device)
        kwargs["attn_implementation"] = attn_implementation
    overrides = {**(adapter_config_overrides(adapters[-1]) if adapters else {}), **(config_overrides or {})}
    if overrides or (rope is not None and rope.active):
        from transformers import AutoConfig

        config = AutoConfig.from_pretrained(str(model_dir), trust_remote_code=trust_remote_code)
        for key, value in overrides.items():
            setattr(config, key, value)
        if rope is not None and rope.active:
            from cnllm.core.rope import apply_to_hf_config

            apply_to_hf_config(config, rope, n_ctx)
        kwargs["config"] = config
    if quantized:
        from transformers import BitsAndBytesConfig

        kwargs["quantization_config"] = BitsAndBytesConfig(
            load_in_4bit=load_in_4bit,
            load_in_8bit=load_in_8bit,
            bnb_4bit_quant_type="nf4",
            bnb_4bit_use_double_quant=True,
            bnb_4bit_compute_dtype=dtype,
        )
        kwargs["device_map"] = {"": int(os.environ.get("LOCAL_RANK", "0"))}
    model: Any  # a transformers model, then PEFT's wrapper around it for each adapter
    try:
        model = AutoModelForCausalLM.from_pretrained(str(model_dir), **kwargs)
    except (OSError, ValueError, KeyError) as exc:
        raise UsageError(f"cannot load model {model_dir}: {str(exc).splitlines()[0] if str(exc) else type(exc).__name__}") from None
    if place and not quantized:
        model = model.to(device)
    warnings.filterwarnings("ignore", message=".*ensure_weight_tying.*")  # trained-apart tied embeddings are what we load
    for number, adapter in enumerate(adapters):
        from peft import PeftModel

        check_lora_adapter(adapter)
        rows = adapter_vocab_rows(adapter)
        if rows is not None and rows != model.get_input_embeddings().weight.shape[0]:
            model.resize_token_embeddings(rows, mean_resizing=False)
        try:
            model = PeftModel.from_pretrained(model, str(adapter), is_trainable=False)
        except (OSError, ValueError, RuntimeError) as exc:
            raise UsageError(f"could not apply the LoRA adapter {adapter}: {str(exc).splitlines()[0]}") from None
        if number < len(adapters) - 1:
            model = model.merge_and_unload()
    return model.eval()


CONFIG_OVERRIDES_NAME = "model_config_overrides.json"


def adapter_config_overrides(adapter_dir: Path | str) -> dict:
    """Base-config keys an adapter was trained with (long-context rope scaling), saved beside it by pt/sft;
    merge-lora writes them into the merged config and the loader applies them to an unmerged base."""
    path = Path(adapter_dir) / CONFIG_OVERRIDES_NAME
    if not path.is_file():
        return {}
    return read_json_object(path)


ATTN_IMPLEMENTATIONS = ("eager", "sdpa", "flash_attention_2")


def check_attn_implementation(name: str, device: str | None = None) -> None:
    """A usage error unless transformers can run attention ``name`` here (FlashAttention-2: CUDA and flash_attn)."""
    import importlib.util

    if name not in ATTN_IMPLEMENTATIONS:
        raise UsageError(f"--attn-implementation must be one of {', '.join(ATTN_IMPLEMENTATIONS)}; got {name!r}")
    if name != "flash_attention_2":
        return
    import torch

    if not torch.cuda.is_available() or (device is not None and not str(device).startswith("cuda")):
        raise UsageError("--attn-implementation flash_attention_2 needs a CUDA GPU; use sdpa (the default) or eager here")
    if importlib.util.find_spec("flash_attn") is None:
        raise UsageError("--attn-implementation flash_attention_2 needs the flash-attn package (pip install flash-attn); use sdpa otherwise")


SPM_TOKENIZER_FILES = ("tokenizer.model", "special_tokens_map.json", "added_tokens.json")


def copy_missing_tokenizer_files(source: Path | str, target: Path | str) -> None:
    """Copy the tokenizer files ``save_pretrained`` of a fast tokenizer leaves out (``tokenizer.model``
    above all, which llama.cpp's SentencePiece vocabulary needs), without replacing what is there."""
    import shutil

    for name in SPM_TOKENIZER_FILES:
        if (Path(source) / name).is_file() and not (Path(target) / name).exists():
            shutil.copyfile(Path(source) / name, Path(target) / name)
