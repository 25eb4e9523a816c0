"""The model families cnllm converts and merges, as data: one row each, read by every converter and merger.

A row says what llama.cpp's reference converter (``convert_hf_to_gguf.py``, whose constants live in
gguf-py) and transformers' config class know about a family: the Hugging Face class names, the GGUF
architecture llama.cpp loads it as, the hyper-parameters transformers fills in when ``config.json``
leaves them out (the reference converter reads the config through ``AutoConfig``), the GGUF keys the
reference writes beyond the common ones (and whether it copies the tokenizer's ``add_prefix_space``),
whether q/k rows are permuted for llama.cpp's rotary layout, the tied-embedding default, whether Meta's
``consolidated.NN.pth`` layout exists for it, and the chat template its chat models use. Adding a
family is adding a row (docs/gguf.md, "Adding an architecture"); no module branches on a family's name.
"""

from __future__ import annotations

from dataclasses import dataclass

from cnllm.core.errors import UsageError


@dataclass(frozen=True)
class Architecture:
    """One model family (see the module docstring)."""

    model_type: str  # config.json's model_type
    hf_classes: tuple[str, ...]  # config.json "architectures" entries that name the family
    gguf_arch: str  # general.architecture of its GGUFs (a gguf.MODEL_ARCH_NAMES value)
    permute_qk: bool  # q/k rows go from Hugging Face's rotary halves to llama.cpp's interleaved pairs
    config_defaults: tuple[tuple[str, object], ...]  # transformers' config defaults for keys config.json may omit
    derives_head_dim: bool  # the config class sets head_dim (hidden_size / heads) when config.json omits it
    gguf_extra_keys: tuple[str, ...]  # GGUF keys the reference writes after general.file_type (see convert.py)
    space_prefix_from_tokenizer_config: bool  # the reference copies tokenizer_config's add_prefix_space into the GGUF
    tie_word_embeddings: bool  # transformers' default when config.json does not say
    meta_layout: bool  # Meta's consolidated.NN.pth + params.json layout (merge-lora --format pth, convert-meta)
    chat_template: str | None  # the built-in template (cnllm.core.templates) the family's chat models use


LLAMA = Architecture(
    model_type="llama",
    hf_classes=("LlamaForCausalLM", "LLaMAForCausalLM"),
    gguf_arch="llama",
    permute_qk=True,
    config_defaults=(("max_position_embeddings", 2048), ("rms_norm_eps", 1e-6)),
    derives_head_dim=True,
    gguf_extra_keys=("vocab_size", "rope_dimension_count"),
    space_prefix_from_tokenizer_config=True,
    tie_word_embeddings=False,
    meta_layout=True,
    chat_template=None,  # LLaMA-2 chat, Llama-3 instruct and Chinese-Alpaca differ: the tokenizer says which
)
# Mistral is LLaMA with a sliding attention window; llama.cpp loads it as llama and the reference converter
# writes no window (llama.cpp attends to the whole context).
MISTRAL = Architecture(
    model_type="mistral",
    hf_classes=("MistralForCausalLM",),
    gguf_arch="llama",
    permute_qk=True,
    config_defaults=(("num_key_value_heads", 8), ("max_position_embeddings", 4096 * 32), ("rms_norm_eps", 1e-6)),
    derives_head_dim=True,
    gguf_extra_keys=("vocab_size", "rope_dimension_count"),
    space_prefix_from_tokenizer_config=True,
    tie_word_embeddings=False,
    meta_layout=False,
    chat_template=None,  # [INST] … [/INST] without LLaMA-2's <<SYS>> block: no built-in renders it
)
# Qwen2 has q/k/v biases, NEOX-style rotary in llama.cpp (so no permutation) and, at 0.5B/1.5B, tied embeddings.
QWEN2 = Architecture(
    model_type="qwen2",
    hf_classes=("Qwen2ForCausalLM",),
    gguf_arch="qwen2",
    permute_qk=False,
    config_defaults=(("num_key_value_heads", 32), ("max_position_embeddings", 32768), ("rms_norm_eps", 1e-6)),
    derives_head_dim=False,
    gguf_extra_keys=(),
    space_prefix_from_tokenizer_config=False,  # Qwen2's tokenizer_config says add_prefix_space false; the GGUF does not
    tie_word_embeddings=False,
    meta_layout=False,
    chat_template="chatml",
)

ARCHITECTURES = (LLAMA, MISTRAL, QWEN2)
GGUF_ARCHITECTURES = tuple(dict.fromkeys(a.gguf_arch for a in ARCHITECTURES))


def find_architecture(config: dict) -> Architecture | None:
    """The row a ``config.json`` names (by ``architectures``, else ``model_type``), or ``None``."""
    classes = config.get("architectures") or []
    for row in ARCHITECTURES:
        if any(name in row.hf_classes for name in classes) or (not classes and config.get("model_type") == row.model_type):
            return row
    return None


def require_architecture(config: dict, where: str, command: str) -> Architecture:
    """The row of ``config``, or a usage error naming what it is and every class ``command`` supports."""
    row = find_architecture(config)
    if row is None:
        found = ", ".join(config.get("architectures") or []) or f"model_type {config.get('model_type')!r}"
        supported = ", ".join(name for a in ARCHITECTURES for name in a.hf_classes)
        raise UsageError(f"{where}: architecture {found} is not supported by {command}; supported: {supported}")
    return row


def ties_by_default(config: dict) -> bool:
    """``tie_word_embeddings`` as transformers reads it: the config's value, else the family's default."""
    row = find_architecture(config)
    return bool(config.get("tie_word_embeddings", row.tie_word_embeddings if row is not None else False))
