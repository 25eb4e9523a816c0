"""Shared helpers for training tests: independent perplexity measurement and small-run arguments."""

from __future__ import annotations

import math
from pathlib import Path

from cnllm.core.tiny import asset

FAST_LORA = ["--lora-rank", "8", "--lora-alpha", "16", "--lora-dropout", "0"]


def heldout_perplexity(model_dir: Path, tokenizer_dir: Path, adapter: Path | None = None, block_size: int = 128) -> float:
    """Perplexity of zh_heldout.txt computed here, not by the code under test: base model, or base + adapter."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(str(tokenizer_dir))
    model = AutoModelForCausalLM.from_pretrained(str(model_dir), dtype=torch.float32)
    if len(tokenizer) > model.get_input_embeddings().weight.shape[0]:
        model.resize_token_embeddings(len(tokenizer), pad_to_multiple_of=64)
    if adapter is not None:
        from peft import PeftModel

        model = PeftModel.from_pretrained(model, str(adapter))
    model.eval()
    ids: list[int] = []
    for line in asset("zh_heldout.txt").read_text(encoding="utf-8").splitlines():
        ids += tokenizer(line, add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id]
    blocks = torch.tensor([ids[i : i + block_size] for i in range(0, len(ids) - block_size + 1, block_size)])
    with torch.no_grad():
        loss = model(input_ids=blocks, labels=blocks).loss.item()
    return math.exp(loss)
