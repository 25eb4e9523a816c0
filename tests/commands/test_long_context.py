"""Long context through the CLI: rope flags on chat and eval, perplexity by context length with its plot."""

from __future__ import annotations

import json

from tests.conftest import SHORT_CONTEXT

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
