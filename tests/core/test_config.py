"""Run-configuration files: file values over defaults, command-line flags over the file."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional

import pytest

from cnllm.core.config import dump_yaml, merge
from cnllm.core.errors import UsageError


@dataclass
class Options:
    model: Optional[Path] = None
    data: list[Path] = field(default_factory=list)
    lora_rank: int = 64
    learning_rate: float = 2e-4
    streaming: bool = False
    targets: list[str] = field(default_factory=list)


def test_flags_given_on_the_command_line_win(tmp_path):
    config = tmp_path / "run.yaml"
    config.write_text("model: base\nlora-rank: 16\nlearning_rate: 1e-4\ndata: [a.txt, b.txt]\ntargets: q_proj,v_proj\n", encoding="utf-8")
    cli = {"model": None, "data": [], "lora_rank": 8, "learning_rate": 2e-4, "streaming": False, "targets": []}
    merged = merge(Options, cli, {"lora_rank"}, config)
    assert merged == {"model": tmp_path / "base", "data": [tmp_path / "a.txt", tmp_path / "b.txt"], "lora_rank": 8, "learning_rate": 1e-4,
                      "streaming": False, "targets": ["q_proj", "v_proj"]}
    assert merge(Options, cli, set(), None) == cli


def test_relative_paths_in_a_config_file_are_relative_to_its_folder(tmp_path, monkeypatch):
    (tmp_path / "configs").mkdir()
    config = tmp_path / "configs" / "run.yaml"
    config.write_text("model: ../models/base\ndata: [corpus.txt, /abs/x.txt]\n", encoding="utf-8")
    monkeypatch.chdir(tmp_path / "configs")
    merged = merge(Options, {"model": None, "data": []}, set(), Path("run.yaml"))
    assert merged["model"] == tmp_path / "configs" / ".." / "models" / "base"
    assert merged["data"] == [tmp_path / "configs" / "corpus.txt", Path("/abs/x.txt")]


def test_resolved_config_reads_back(tmp_path):
    values = {"model": tmp_path / "m", "data": [tmp_path / "x.txt"], "lora_rank": 4, "learning_rate": 0.5, "streaming": True, "targets": ["o_proj"]}
    path = tmp_path / "resolved.yaml"
    path.write_text(dump_yaml(values), encoding="utf-8")
    assert merge(Options, {k: None for k in values}, set(), path) == values


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("lora-rnak: 8\n", "unknown option 'lora-rnak'"),
        ("lora-rank: eight\n", "lora-rank: expected an integer"),
        ("streaming: maybe\n", "streaming: expected true or false"),
        ("- a\n- b\n", "must hold a mapping"),
        ("model: [unclosed\n", "is not valid YAML"),
    ],
)
def test_bad_config_is_one_clear_line(tmp_path, text, message):
    config = tmp_path / "run.yaml"
    config.write_text(text, encoding="utf-8")
    with pytest.raises(UsageError, match=message):
        merge(Options, {}, set(), config)


def test_missing_config_file(tmp_path):
    with pytest.raises(UsageError, match="does not exist"):
        merge(Options, {}, set(), tmp_path / "absent.yaml")
