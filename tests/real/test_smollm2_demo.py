"""``cnllm demo --base smollm2``: the real-model demo tier end to end (about 10-15 minutes on 2 CPU cores)."""

from __future__ import annotations

import json

import pytest

from tests.real.conftest import CACHE, cnllm

pytestmark = [pytest.mark.real_model, pytest.mark.slow]


def test_real_model_demo_reports_every_figure(tmp_path, monkeypatch, smollm2_hf):
    monkeypatch.setenv("CNLLM_CACHE", str(CACHE))  # the checkpoint the fixtures fetched
    completed = cnllm("demo", "--base", "smollm2", "-o", tmp_path / "demo")
    assert "A (base model):" in completed.stdout
    report = json.loads((tmp_path / "demo" / "report.json").read_text(encoding="utf-8"))
    figures = {step["step"]: step["figures"] for step in report["steps"]}
    chars = figures["vocab"]["chinese_chars_per_token"]
    assert chars["after"] > chars["before"], chars
    assert figures["pt"]["eval_loss"]["after"] < figures["pt"]["eval_loss"]["before"], figures["pt"]
    bits = figures["eval"]["bits_per_char"]
    assert {"base", "extended", "pt", "sft", "gguf-f16", "gguf-q8_0", "gguf-q4_k_m"} <= set(bits), bits
    # subword-mean initialisation: step 0 keeps much of what the base knew (mean rows cost ~2× more); after pt the
    # adapted model reads held-out Chinese better than the base model did, per character
    assert bits["pt"] < bits["base"] and bits["extended"] < 1.5 * bits["base"], bits
    assert figures["quantize"]["q4_k_m"]["size_bytes"] < figures["quantize"]["q8_0"]["size_bytes"] < figures["quantize"]["source"]["size_bytes"]
    chat = report["notes"]["chat"]
    assert chat["answer"].strip() and chat["answer_before"].strip()
