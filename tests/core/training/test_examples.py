"""The shipped training configs parse into valid options (a typo there would fail a user's 7B run at once)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from cnllm.core.config import build_options, merge
from cnllm.core.training.methods import METHODS

EXAMPLES = Path(__file__).resolve().parents[3] / "examples" / "training"


@pytest.mark.parametrize("name", sorted(p.name for p in EXAMPLES.glob("*.yaml")))
def test_example_config_resolves(name, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # paths in a config are relative to its folder, wherever the command runs
    options_type = METHODS[name.split("-")[0]].options_type
    values, from_file = merge(options_type, {}, set(), EXAMPLES / name)
    options = build_options(options_type, values)  # validated as the run validates it, before loading anything
    assert options.model is not None and options.data and options.output is not None and "model" in from_file
    assert options.lora_rank == 64 and options.lora_alpha == 128 and options.gradient_checkpointing
    if "8gpu" in name:
        assert options.deepspeed == EXAMPLES / "ds_zero2.json" and options.deepspeed.is_file()


def test_deepspeed_config_is_zero_stage_2_with_trainer_filled_values():
    config = json.loads((EXAMPLES / "ds_zero2.json").read_text())
    assert config["zero_optimization"]["stage"] == 2
    assert config["train_micro_batch_size_per_gpu"] == "auto" and config["gradient_accumulation_steps"] == "auto"
