"""PEFT adapters built in code for the merge-lora and diff-recover tests, and PEFT's own logits to compare with."""

from __future__ import annotations

import shutil
from pathlib import Path
from typing import Sequence

ALL_LINEAR = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
PROMPT_IDS = [1, 17, 42, 311, 7, 99, 512, 3, 250, 64]


def load_fp32(model_dir: Path):
    import torch
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(str(model_dir), dtype=torch.float32).eval()


def extend_tokenizer(tokenizer_dir: Path, out_dir: Path, extra: int) -> Path:
    """The base tokenizer plus ``extra`` Chinese characters as added tokens (an extended vocabulary)."""
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(str(tokenizer_dir))
    added = tokenizer.add_tokens([chr(0x4E00 + i) for i in range(extra)])
    assert added == extra
    out_dir.mkdir(parents=True, exist_ok=True)
    tokenizer.save_pretrained(str(out_dir))
    return out_dir


def build_adapter(
    base_dir: Path,
    out_dir: Path,
    *,
    r: int = 4,
    alpha: int = 8,
    targets: Sequence[str] = ALL_LINEAR,
    seed: int = 1,
    vocab: int | None = None,
    modules_to_save: Sequence[str] | None = None,
    tokenizer_dir: Path | None = None,
    safe: bool = True,
    **lora_options,
) -> Path:
    """A LoRA adapter for ``base_dir`` with random (non-zero) ``lora_B``, saved by PEFT's ``save_pretrained``.

    ``vocab`` resizes the model's embeddings first (an extended vocabulary); ``modules_to_save``
    copies get random offsets too, so replacing them is visible in the logits.
    """
    import torch
    from peft import LoraConfig, get_peft_model

    model = load_fp32(base_dir)
    if vocab is not None:
        model.resize_token_embeddings(vocab, mean_resizing=False)
    config = LoraConfig(
        r=r, lora_alpha=alpha, target_modules=list(targets), modules_to_save=list(modules_to_save or []) or None, **lora_options
    )
    peft_model = get_peft_model(model, config)
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, parameter in peft_model.named_parameters():
            if "lora_B" in name or "lora_embedding_A" in name:
                parameter.copy_(torch.randn(parameter.shape, generator=generator) * 0.05)
            elif "modules_to_save" in name:
                parameter.add_(torch.randn(parameter.shape, generator=generator) * 0.02)
    peft_model.save_pretrained(str(out_dir), safe_serialization=safe)
    if tokenizer_dir is not None:
        for item in Path(tokenizer_dir).iterdir():
            if item.is_file() and (item.name.startswith("tokenizer") or item.name in ("special_tokens_map.json", "added_tokens.json")):
                shutil.copy2(item, out_dir / item.name)
    return out_dir


def peft_logits(base_dir: Path, adapters: Sequence[Path], ids: Sequence[int] = PROMPT_IDS):
    """Logits of base + adapters as PEFT applies them: earlier adapters merged by PEFT, the last one unmerged."""
    import torch
    from peft import PeftModel
    from safetensors import safe_open

    model = load_fp32(base_dir)
    for number, adapter in enumerate(adapters):
        weights = Path(adapter) / "adapter_model.safetensors"
        if weights.exists():
            with safe_open(str(weights), framework="pt") as handle:
                rows = [handle.get_slice(k).get_shape()[0] for k in handle.keys() if k.endswith("embed_tokens.weight")]
        else:
            state = torch.load(Path(adapter) / "adapter_model.bin", weights_only=True)
            rows = [v.shape[0] for k, v in state.items() if k.endswith("embed_tokens.weight")]
        if rows and rows[0] != model.get_input_embeddings().weight.shape[0]:
            model.resize_token_embeddings(rows[0], mean_resizing=False)
        model = PeftModel.from_pretrained(model, str(adapter))
        if number < len(adapters) - 1:
            model = model.merge_and_unload()
    with torch.no_grad():
        return model.eval()(torch.tensor([list(ids)])).logits


def model_logits(model_dir: Path, ids: Sequence[int] = PROMPT_IDS):
    import torch

    with torch.no_grad():
        return load_fp32(model_dir)(torch.tensor([list(ids)])).logits
