"""Long context through the CLI: rope flags on chat and eval, perplexity by context length with its plot."""

from __future__ import annotations

import json

import numpy as np
import pytest

from cnllm.core.tiny import asset
from tests.conftest import SHORT_CONTEXT
from tests.core.training.conftest import one_torch_thread  # noqa: F401  (fixture)

LONG = 2 * SHORT_CONTEXT


def _text(tmp_path):
    path = tmp_path / "t.txt"
    path.write_text("The quick brown fox jumps over the lazy dog. 北京是中国的首都。" * 60, encoding="utf-8")
    return path


def test_chat_warns_beyond_the_trained_context_and_takes_rope_flags(cli, short_context_dir, short_context_gguf):
    greedy = ["--temperature", "0", "--max-tokens", "4", "--quiet", "--template", "none", "-p", "Hello"]
    plain = cli("chat", short_context_gguf, "--n-ctx", str(LONG), *greedy)
    assert plain.exit_code == 0, plain.stderr
    assert f"trained context of {SHORT_CONTEXT}" in plain.stderr
    scaled = cli("chat", short_context_dir, "--n-ctx", str(LONG), "--rope-scaling", "yarn", *greedy)
    assert scaled.exit_code == 0, scaled.stderr
    assert "trained context" not in scaled.stderr
    bad = cli("chat", short_context_dir, "--rope-scaling", "ntk-auto", "--rope-factor", "2", *greedy)
    assert bad.exit_code == 2 and "--rope-factor needs" in bad.stderr


def test_a_rope_factor_alone_sets_the_gguf_context(short_context_gguf):
    """``--rope-factor 8`` without ``--n-ctx`` reaches 8 × the trained context (not the trained one, scaled for
    nothing); llama.cpp's smallest context is 256."""
    from cnllm.core.backends import load_model
    from cnllm.core.generation.base import LoadOptions
    from cnllm.core.rope import RopeOptions

    for rope, expected in ((RopeOptions("linear", 8.0), 8 * SHORT_CONTEXT), (RopeOptions("yarn"), 256), (None, 256)):
        with load_model(short_context_gguf, LoadOptions(rope=rope, threads=1)) as generator:
            assert generator.context_length == expected, rope


def test_eval_ppl_records_the_scaling(cli, short_context_gguf, tmp_path):
    result = cli("eval", "ppl", short_context_gguf, "-d", _text(tmp_path), "--ctx", str(LONG), "--rope-scaling", "linear", "--json")
    assert result.exit_code == 0, result.stderr
    document = json.loads(result.stdout)
    assert document["model"]["rope"]["scaling"] == "linear" and document["model"]["trained_context"] == SHORT_CONTEXT


def test_eval_ppl_by_context_writes_table_json_and_plot(cli, short_context_gguf, tmp_path):
    data, report, plot = _text(tmp_path), tmp_path / "sweep.json", tmp_path / "sweep.png"
    args = ["eval", "ppl", short_context_gguf, "-d", data, "--ctx", str(LONG), "--ctx", "32", "--ctx", str(SHORT_CONTEXT)]
    result = cli(*args, "--plot", plot, "-o", report, "--json")
    assert result.exit_code == 0, result.stderr
    assert f"trained context of {SHORT_CONTEXT}" in result.stderr  # 128 > 64 with no scaling
    document = json.loads(result.stdout)
    assert [c["ctx"] for c in document["contexts"]] == [32, SHORT_CONTEXT, LONG]
    assert all(c["total"]["ppl"] > 1 for c in document["contexts"])
    assert json.loads(report.read_text(encoding="utf-8")) == document
    assert plot.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    table = cli(*args, "--rope-scaling", "ntk-auto")
    assert table.exit_code == 0 and "perplexity by context" in table.stdout and "trained context" not in table.stderr
    alone = cli("eval", "ppl", short_context_gguf, "-d", data, "--ctx", "32", "--plot", tmp_path / "x.png")
    assert alone.exit_code == 2 and "two or more --ctx" in alone.stderr


@pytest.mark.parametrize("method", ["linear", "yarn"])
def test_long_context_training_travels_through_merge_and_gguf(cli, tmp_path, short_context_dir, method):
    """pt at twice the trained context (gradient checkpointing) writes the scaling; merge-lora carries it into
    config.json; convert-gguf writes llama.cpp's rope scaling keys, which llama.cpp reads back and applies exactly
    as transformers does (the logits agree with no rope flag given)."""
    from cnllm.core.llama_loader import open_llama
    from cnllm.core.modelio import CONFIG_OVERRIDES_NAME

    adapter, merged, gguf = tmp_path / "pt", tmp_path / "merged", tmp_path / "long.gguf"
    result = cli(
        "pt", "-m", short_context_dir, "-d", asset("en.txt"), "-o", adapter, "--block-size", str(LONG), "--batch-size", "1",
        "--lora-rank", "4", "--lora-alpha", "8", "--max-steps", "2", "--save-steps", "2", "--validation-split", "0",
        "--gradient-checkpointing", "--rope-scaling", method, "--rope-factor", "2", "--attn-implementation", "eager", "--json",
    )
    assert result.exit_code == 0, result.stderr
    expected = {"rope_type": method, "factor": 2.0, "rope_theta": 10000.0}
    if method == "yarn":
        expected["original_max_position_embeddings"] = SHORT_CONTEXT
    overrides = json.loads((adapter / CONFIG_OVERRIDES_NAME).read_text(encoding="utf-8"))
    assert overrides == {"rope_parameters": expected, "max_position_embeddings": LONG}

    assert cli("merge-lora", "-b", short_context_dir, "-l", adapter, "-o", merged).exit_code == 0
    config = json.loads((merged / "config.json").read_text(encoding="utf-8"))
    assert config["rope_parameters"] == expected and config["max_position_embeddings"] == LONG

    assert cli("convert-gguf", merged, "-o", gguf, "--outtype", "f32").exit_code == 0
    header = open_llama(gguf, vocab_only=True, verbose=False)
    try:
        meta = header.metadata
    finally:
        header.close()
    assert meta["llama.rope.scaling.type"] == method and float(meta["llama.rope.scaling.factor"]) == 2.0
    if method == "yarn":
        assert int(meta["llama.rope.scaling.original_context_length"]) == SHORT_CONTEXT

    from cnllm.core.backends import load_model
    from cnllm.core.generation.base import LoadOptions

    ids = [1] + [int(x) for x in np.random.default_rng(1).integers(3, 900, size=LONG - 1)]
    rows = []
    for path in (merged, gguf):
        with load_model(path, LoadOptions(n_ctx=LONG, threads=1)) as model:
            rows.append(model.target_logprobs([ids], 1)[0])
    assert np.abs(rows[0] - rows[1]).max() < 5e-3


def test_flash_attention_needs_cuda_and_flash_attn(cli, tmp_path, short_context_dir):
    result = cli("sft", "-m", short_context_dir, "-d", asset("alpaca_zh.json"), "-o", tmp_path / "x", "--attn-implementation", "flash_attention_2")
    assert result.exit_code == 2 and "flash_attention_2 needs" in result.stderr
    assert not (tmp_path / "x").exists()
    bad = cli("pt", "-m", short_context_dir, "-d", asset("en.txt"), "-o", tmp_path / "y", "--rope-scaling", "linear")
    assert bad.exit_code == 2 and "--rope-factor" in bad.stderr
