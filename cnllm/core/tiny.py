"""Tiny, deterministic LLaMA-family checkpoints and tokenizers built in code, offline, in seconds.

Used by the test suite and by the embedded demo: a SentencePiece tokenizer trained with
LLaMA's settings, a Llama-3- or Qwen2-style byte-level BPE tokenizer, and a random model of any
family in :mod:`cnllm.core.architectures` (``LlamaForCausalLM`` by default) saved as sharded
safetensors beside its tokenizer.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable

from cnllm.core.gguf.vocab import QWEN2_SPLIT_PATTERN
from cnllm.core.tokenizers.hf_export import write_spm_tokenizer_dir
from cnllm.core.tokenizers.spm import load_proto, train_spm
from cnllm.core.tokenizers.tiktoken import LLAMA3_SPLIT_PATTERN

ASSETS = Path(__file__).resolve().parent.parent / "assets"

LLAMA3_SPECIAL_TOKENS = (
    "<|begin_of_text|>",
    "<|end_of_text|>",
    "<|start_header_id|>",
    "<|end_header_id|>",
    "<|eot_id|>",
)


@dataclass(frozen=True)
class BpeStyle:
    """How a family's byte-level BPE tokenizer splits text and which special tokens follow its vocabulary."""

    split_pattern: str
    special_tokens: tuple[str, ...]
    bos: str | None  # put before every text (Llama-3); Qwen2 puts none
    eos: str


BPE_STYLES = {
    "llama3": BpeStyle(LLAMA3_SPLIT_PATTERN, LLAMA3_SPECIAL_TOKENS, "<|begin_of_text|>", "<|eot_id|>"),
    "qwen2": BpeStyle(QWEN2_SPLIT_PATTERN, ("<|endoftext|>", "<|im_start|>", "<|im_end|>"), None, "<|im_end|>"),
}


def asset(name: str) -> Path:
    """A text sample shipped with cnllm (see ``cnllm/assets/README.md``)."""
    return ASSETS / name


def _lines(paths: Iterable[Path]) -> list[str]:
    lines: list[str] = []
    for path in paths:
        lines.extend(line for line in Path(path).read_text(encoding="utf-8").splitlines() if line.strip())
    return lines


def build_spm_tokenizer(out_dir: Path | str, *, texts: Iterable[Path] | None = None, vocab_size: int = 1000) -> Path:
    """Train a LLaMA-style SentencePiece tokenizer (BPE, byte fallback, split digits, <unk>/<s>/</s> = 0/1/2)
    and write it as ``tokenizer.model`` plus an exact Hugging Face tokenizer directory."""
    sentences = _lines(texts or [asset("en.txt")])
    model = train_spm(sentences, vocab_size=vocab_size, character_coverage=1.0, hard_vocab_limit=False)
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / "tokenizer.model").write_bytes(model)
    write_spm_tokenizer_dir(load_proto(out_dir / "tokenizer.model"), out_dir)
    return out_dir


def build_bpe_tokenizer(out_dir: Path | str, *, texts: Iterable[Path] | None = None, vocab_size: int = 1024, style: str = "llama3") -> Path:
    """Train a byte-level BPE tokenizer in a :data:`BPE_STYLES` style (``tokenizer.json``; special tokens after the vocabulary)."""
    from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers, processors, trainers

    bpe = BPE_STYLES[style]
    tokenizer = Tokenizer(models.BPE(ignore_merges=True))
    tokenizer.pre_tokenizer = pre_tokenizers.Sequence(
        [
            pre_tokenizers.Split(Regex(bpe.split_pattern), behavior="isolated", invert=False),
            pre_tokenizers.ByteLevel(add_prefix_space=False, trim_offsets=True, use_regex=False),
        ]
    )
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size, initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False, min_frequency=2
    )
    tokenizer.train_from_iterator(_lines(texts or [asset("en.txt")]), trainer=trainer)
    tokenizer.add_special_tokens(list(bpe.special_tokens))
    bos = bpe.bos
    if bos is not None:
        tokenizer.post_processor = processors.TemplateProcessing(
            single=f"{bos}:0 $A:0", pair=f"{bos}:0 $A:0 {bos}:1 $B:1", special_tokens=[(bos, tokenizer.token_to_id(bos))]
        )
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    tokenizer.save(str(out_dir / "tokenizer.json"))
    config = {
        "tokenizer_class": "PreTrainedTokenizerFast",
        "bos_token": bos,
        "eos_token": bpe.eos,
        "clean_up_tokenization_spaces": False,
        "model_max_length": 8192,
    }
    (out_dir / "tokenizer_config.json").write_text(json.dumps(config, indent=2) + "\n", encoding="utf-8")
    (out_dir / "special_tokens_map.json").write_text(
        json.dumps({"bos_token": bos, "eos_token": bpe.eos}, indent=2) + "\n", encoding="utf-8"
    )
    return out_dir


def build_tiny_llama(
    out_dir: Path | str,
    tokenizer_dir: Path | str,
    *,
    hidden_size: int = 64,
    layers: int = 2,
    heads: int = 4,
    kv_heads: int = 2,
    intermediate_size: int = 128,
    max_position_embeddings: int = 512,
    seed: int = 0,
    max_shard_size: str = "200KB",
    tie_word_embeddings: bool = False,
    architecture: str = "llama",
) -> Path:
    """A random model sized to the tokenizer, saved as sharded safetensors with the tokenizer beside it.

    ``architecture``: the ``model_type`` of a row of :mod:`cnllm.core.architectures` (``llama``, ``mistral``,
    ``qwen2``); attention biases, where the family has them, are random too, and the tokenizer gets the family's
    chat template when it has none. ``tie_word_embeddings``: one matrix for input and output embeddings, no
    ``lm_head.weight`` saved (SmolLM2, Llama-3.2-1B/3B, Qwen2-0.5B).
    """
    import shutil

    import torch
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer, GenerationConfig

    from cnllm.core.architectures import require_architecture
    from cnllm.core.runtime import quiet_libraries
    from cnllm.core.templates import get_template

    quiet_libraries()
    row = require_architecture({"model_type": architecture}, "build_tiny_llama", "cnllm")
    tokenizer = AutoTokenizer.from_pretrained(str(tokenizer_dir))
    config = AutoConfig.for_model(
        row.model_type,
        vocab_size=len(tokenizer),
        hidden_size=hidden_size,
        intermediate_size=intermediate_size,
        num_hidden_layers=layers,
        num_attention_heads=heads,
        num_key_value_heads=kv_heads,
        max_position_embeddings=max_position_embeddings,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
        tie_word_embeddings=tie_word_embeddings,
        rms_norm_eps=1e-5,
    )
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(config).to(torch.float32).eval()
    with torch.no_grad():
        for name, parameter in model.named_parameters():
            if name.endswith("_proj.bias"):  # transformers starts biases at zero, which would hide a lost bias
                parameter.normal_(std=0.02)
    out_dir = Path(out_dir)
    model.save_pretrained(out_dir, safe_serialization=True, max_shard_size=max_shard_size)
    GenerationConfig(bos_token_id=config.bos_token_id, eos_token_id=config.eos_token_id, pad_token_id=config.pad_token_id).save_pretrained(out_dir)
    for item in Path(tokenizer_dir).iterdir():
        if item.is_file() and (item.name.startswith("tokenizer") or item.name == "special_tokens_map.json"):
            shutil.copy2(item, out_dir / item.name)
    tokenizer_config = out_dir / "tokenizer_config.json"
    if row.chat_template is not None and tokenizer_config.is_file():
        settings = json.loads(tokenizer_config.read_text(encoding="utf-8"))
        settings.setdefault("chat_template", get_template(row.chat_template).jinja())
        tokenizer_config.write_text(json.dumps(settings, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")
    return out_dir
