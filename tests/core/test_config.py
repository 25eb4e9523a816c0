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
    merged, from_file = merge(Options, cli, {"lora_rank"}, config)
    assert merged == {"model": tmp_path / "base", "data": [tmp_path / "a.txt", tmp_path / "b.txt"], "lora_rank": 8, "learning_rate": 1e-4,
                      "streaming": False, "targets": ["q_proj", "v_proj"]}
    assert from_file == {"model", "learning_rate", "data", "targets"}  # messages name these as the file's keys
    assert merge(Options, cli, set(), None) == (cli, set())


def test_relative_paths_in_a_config_file_are_relative_to_its_folder(tmp_path, monkeypatch):
    (tmp_path / "configs").mkdir()
    config = tmp_path / "configs" / "run.yaml"
    config.write_text("model: ../models/base\ndata: [corpus.txt, /abs/x.txt]\n", encoding="utf-8")
    monkeypatch.chdir(tmp_path / "configs")
    merged, _ = merge(Options, {"model": None, "data": []}, set(), Path("run.yaml"))
    assert merged["model"] == tmp_path / "configs" / ".." / "models" / "base"
    assert merged["data"] == [tmp_path / "configs" / "corpus.txt", Path("/abs/x.txt")]


def test_resolved_config_reads_back(tmp_path):
    values = {"model": tmp_path / "m", "data": [tmp_path / "x.txt"], "lora_rank": 4, "learning_rate": 0.5, "streaming": True, "targets": ["o_proj"]}
    path = tmp_path / "resolved.yaml"
    path.write_text(dump_yaml(values), encoding="utf-8")
    assert merge(Options, {k: None for k in values}, set(), path)[0] == values


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


# --- one coercion for flags, --config files and recipes ---------------------------------------


def test_build_options_coerces_recipe_strings_and_names_the_key():
    from cnllm.core.config import build_options
    from cnllm.core.training.pt import PtOptions

    fixed = {"model": Path("m"), "output": Path("o")}
    options = build_options(PtOptions, {"learning_rate": "2e-4", "data": "a.txt", "precision": "half"}, where="recipe step pt", **fixed)
    assert options.learning_rate == 2e-4 and isinstance(options.learning_rate, float)
    assert options.data == [Path("a.txt")] and options.precision == "half" and options.precision_short == "fp16"
    with pytest.raises(UsageError, match=r"recipe step pt: learning_rate: expected a number, got 'fast'"):
        build_options(PtOptions, {"learning_rate": "fast"}, where="recipe step pt", **fixed)
    with pytest.raises(UsageError, match=r"recipe step pt: max-steps must be at least 1, or -1 to train for epochs; got 0"):
        build_options(PtOptions, {"data": "a.txt", "max-steps": 0}, where="recipe step pt", **fixed)  # named as the recipe spells it
    with pytest.raises(UsageError, match=r"recipe step pt: unknown option 'learning-rat'; known options: .*learning-rate"):
        build_options(PtOptions, {"learning-rat": 1}, where="recipe step pt", **fixed)


def test_build_options_checks_choices_and_dtypes_with_the_allowed_values():
    from cnllm.core.config import build_options
    from cnllm.core.merge import MergeOptions
    from cnllm.core.tokenizers.merge import MergeVocabOptions

    with pytest.raises(UsageError, match=r"recipe step merge_pt: dtype 'fp8' is not a dtype; choose one of fp16, float16, half"):
        build_options(MergeOptions, {"dtype": "fp8"}, where="recipe step merge_pt")
    with pytest.raises(UsageError, match=r"--scores 'high' is not one of ranked, zero"):
        build_options(MergeVocabOptions, {"scores": "high"})
    with pytest.raises(UsageError, match=r"recipe step merge_pt: --shards applies to --format pth only"):
        build_options(MergeOptions, {"shards": 2}, where="recipe step merge_pt")
    assert build_options(MergeOptions, {"dtype": "bfloat16"}).dtype.name == "bfloat16"


def test_options_built_in_python_get_the_same_types():
    from cnllm.core.evaluation.mc import McOptions
    from cnllm.core.merge import MergeOptions

    assert MergeOptions(dtype="fp16").dtype.name == "float16"
    assert McOptions(format="cmmlu").split == "test" and McOptions().split == "val"
    assert McOptions(subjects="a, b").subjects == ("a", "b")


@pytest.mark.parametrize("options_type", ["merge.MergeOptions", "meta.MetaOptions", "gguf.to_hf.GgufToHfOptions", "diff.RecoverOptions", "diff.MakeDiffOptions"])
def test_every_max_shard_size_is_one_checked_type(options_type):
    import importlib

    from cnllm.core.config import build_options
    from cnllm.core.tensors import DEFAULT_SHARD_SIZE, ShardSize

    module, name = options_type.rsplit(".", 1)
    options_class = getattr(importlib.import_module(f"cnllm.core.{module}"), name)
    assert options_class().max_shard_size == DEFAULT_SHARD_SIZE and isinstance(options_class().max_shard_size, ShardSize)
    assert build_options(options_class, {"max_shard_size": "4GiB"}).max_shard_size.bytes == 4 * 2**30
    assert build_options(options_class, {"max_shard_size": 1000}, where="recipe step s").max_shard_size.bytes == 1000  # a YAML number
    with pytest.raises(UsageError, match=r"recipe step s: max_shard_size: cannot read size 'huge'; write e.g. 500MB"):
        build_options(options_class, {"max_shard_size": "huge"}, where="recipe step s")
    with pytest.raises(UsageError, match=r"--max-shard-size must be at least 1 byte, got '0MB'"):
        options_class(max_shard_size="0MB")
