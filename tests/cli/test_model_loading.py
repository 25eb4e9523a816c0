"""One model-loading group (cnllm.cli.options.MODEL_LOADING) for chat, serve and every eval subcommand, and the
flags reach the core as one LoadOptions."""

from __future__ import annotations

from dataclasses import replace

import pytest
import typer

from cnllm.cli.app import app
from cnllm.cli.options import LOADING_PANEL, MODEL_LOADING
from cnllm.core.errors import UsageError
from cnllm.core.generation.base import LoadOptions
from cnllm.core.rope import RopeOptions

FLAGS = [
    "--lora", "ADAPTER", "--device", "cpu", "--dtype", "half", "--threads", "2", "--gpu-layers", "3", "--no-repack",
    "--trust-remote-code", "--rope-scaling", "linear", "--rope-factor", "2",
]  # fmt: skip


def loading_commands():
    """(name, click command) of every command that loads a model: chat, serve and each eval subcommand."""
    root = typer.main.get_command(app)
    ctx = root.make_context("cnllm", [], resilient_parsing=True)
    evaluate = root.get_command(ctx, "eval")
    yield from ((name, root.get_command(ctx, name)) for name in ("chat", "serve"))
    yield from ((f"eval {name}", evaluate.get_command(ctx, name)) for name in evaluate.list_commands(ctx))


def test_chat_serve_and_every_eval_subcommand_take_the_same_group():
    group = {p.name for p in MODEL_LOADING}
    commands = dict(loading_commands())
    assert {"eval ppl", "eval mc", "eval pref", "eval passkey", "eval longbench"} <= set(commands)
    for name, command in commands.items():
        in_panel = {param.name for param in command.params if getattr(param, "rich_help_panel", None) == LOADING_PANEL}
        assert in_panel == group, name


def test_the_flags_arrive_as_one_load_options(cli, monkeypatch, tmp_path):
    seen = []

    def refuse(model, options=None):
        seen.append(options)
        raise UsageError("stop before loading")

    import cnllm.core.backends as backends
    import cnllm.core.evaluation.ppl as ppl

    monkeypatch.setattr(backends, "load_model", refuse)
    monkeypatch.setattr(ppl, "load_model", refuse)
    model, text, adapter = tmp_path / "m.gguf", tmp_path / "t.txt", tmp_path / "ADAPTER"
    model.write_bytes(b"GGUF")
    text.write_text("some text to score", encoding="utf-8")
    adapter.mkdir()
    flags = [str(adapter) if flag == "ADAPTER" else flag for flag in FLAGS]
    assert cli("chat", model, "-p", "hi", "--n-ctx", "64", *flags).exit_code == 2
    assert cli("eval", "ppl", model, "-d", text, "--ctx", "32", *flags).exit_code == 2
    expected = LoadOptions(
        lora=adapter, device="cpu", dtype="half", threads=2, gpu_layers=3, repack=False, trust_remote_code=True,
        rope=RopeOptions(scaling="linear", factor=2.0),
    )  # fmt: skip
    chat_options, ppl_options = seen
    assert chat_options == replace(expected, n_ctx=64)
    assert ppl_options == replace(expected, n_ctx=32)


@pytest.mark.parametrize("argv", [["chat", "MODEL", "-p", "hi"], ["eval", "pref", "MODEL", "-d", "pairs.jsonl"]])
def test_an_unknown_dtype_is_a_usage_error_before_loading(cli, tmp_path, argv):
    model = tmp_path / "m.gguf"
    model.write_bytes(b"GGUF")
    result = cli(*(model if arg == "MODEL" else arg for arg in argv), "--dtype", "int3")
    assert result.exit_code == 2 and "--dtype" in result.stderr
