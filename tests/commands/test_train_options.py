"""One declaration per training option: a recipe step, a ``--config`` file and the same options typed as
flags resolve to identical options, defaults included, for every shipped recipe and config; and every
declared option is a flag, a ``--config`` key and (unless a step sets it) a recipe key."""

from __future__ import annotations

import dataclasses
import shutil
import types
from pathlib import Path

import pytest
import yaml

from cnllm.core.config import declared_fields, flag, load_yaml, recipe_fields
from cnllm.core.errors import UsageError
from cnllm.core.pipeline import recipe_from_dict
from cnllm.core.pipeline_steps import STEP_KINDS
from cnllm.core.pipeline_types import step_folder
from cnllm.core.tiny import ASSETS
from cnllm.core.training.methods import METHODS

REPO = Path(__file__).resolve().parents[2]
RECIPES = sorted([*ASSETS.glob("*recipe*.yaml"), *(REPO / "examples" / "recipes").glob("*.yaml")])
CONFIGS = sorted((REPO / "examples" / "training").glob("*.yaml"))
DEFAULT_LEARNING_RATES = {"pt": 2e-4, "sft": 1e-4, "align": 5e-5}


@pytest.fixture
def resolve(cli, monkeypatch):
    """``cnllm MODE ARGS`` run up to training: the options it would train with."""
    from cnllm.core.training import trainer

    def run(cwd: Path, mode: str, *args: str | Path):
        seen = []
        monkeypatch.setattr(trainer, "run_training", lambda options, progress: seen.append(options) or types.SimpleNamespace(main_process=False))
        monkeypatch.chdir(cwd)
        result = cli(mode, *args)
        assert result.exit_code == 0 and len(seen) == 1, result.stderr
        return seen[0]

    return run


def typed(mode: str, values: dict) -> list[str]:
    """The flags a user types for ``values`` (keys as a recipe or a config file writes them)."""
    declared = {f.name: d for f, d in declared_fields(METHODS[mode].options_type)}
    args: list[str] = []
    for key, value in values.items():
        name = str(key).replace("-", "_")
        if isinstance(value, bool):
            if value or declared[name].toggle:
                args.append(flag(name) if value else f"--no-{name.replace('_', '-')}")
            else:
                assert METHODS[mode].options_type.__dataclass_fields__[name].default is False  # nothing to type for the default
        elif isinstance(value, list) and name == "lora_targets":
            args += [flag(name), ",".join(value)]
        elif isinstance(value, list):
            for item in value:
                args += [flag(name), str(item)]
        else:
            args += [flag(name), str(value)]
    return args


def recipe_step(source: Path, data: dict, base: Path, name: str):
    """The typed options of recipe step ``name`` (``data`` is the recipe; ``base`` stands in where it names none)."""
    data = dict(data)
    data.setdefault("base", {"model": str(base)})
    recipe = recipe_from_dict(data, root=source.parent.resolve(), source=source)
    return recipe, STEP_KINDS[name].parse(recipe, name, recipe.steps[name])


@pytest.mark.parametrize("source", RECIPES, ids=lambda p: p.name)
def test_a_recipe_step_and_the_same_command_line_resolve_to_identical_options(source, tmp_path, resolve):
    data = yaml.safe_load(source.read_text(encoding="utf-8"))
    steps = [name for name in METHODS if name in data]
    assert steps, f"{source.name} has no training step"
    for name in steps:
        recipe, from_recipe = recipe_step(source, data, tmp_path / "base", name)
        fixed = ["-m", recipe.base_model, "--tokenizer", recipe.base_tokenizer, "-o", step_folder(recipe, name) / "adapter"]
        from_flags = resolve(source.parent, name, *fixed, *typed(name, data[name] or {}))
        assert type(from_flags) is type(from_recipe) is METHODS[name].options_type
        assert dataclasses.asdict(from_flags) == dataclasses.asdict(from_recipe), name


@pytest.mark.parametrize("source", CONFIGS, ids=lambda p: p.name)
def test_a_config_file_its_flags_and_a_recipe_step_resolve_to_identical_options(source, tmp_path, resolve):
    mode = source.name.split("-")[0]
    shutil.copytree(source.parent, tmp_path / "training")
    source = tmp_path / "training" / source.name
    keys = load_yaml(source)
    for folder in {keys["model"], keys.get("tokenizer", keys["model"])}:  # on the command line an absent org/name folder is a Hugging Face id
        (source.parent / folder).mkdir(parents=True)
    (tmp_path / "elsewhere").mkdir()
    from_config = resolve(tmp_path / "elsewhere", mode, "--config", source)  # its paths are relative to its folder, not to where it runs
    values = {str(k): v for k, v in yaml.safe_load(source.read_text(encoding="utf-8")).items()}
    from_flags = resolve(source.parent, mode, *typed(mode, values))
    assert dataclasses.asdict(from_config) == dataclasses.asdict(from_flags)
    step = {k: v for k, v in values.items() if k.replace("-", "_") not in ("model", "tokenizer", "output")}
    recipe_data = {"base": {"model": keys["model"], "tokenizer": keys.get("tokenizer", keys["model"])}, mode: step}
    _, from_recipe = recipe_step(source, recipe_data, tmp_path, mode)
    # the step writes into its folder, and names the model's tokenizer where the command leaves it to default to the model's
    assert dataclasses.asdict(from_recipe) == {**dataclasses.asdict(from_config), "output": from_recipe.output,
                                               "tokenizer": from_config.tokenizer or from_config.model}


@pytest.mark.parametrize("mode", list(METHODS))
def test_defaults_are_the_methods_own_on_every_route(mode, tmp_path, resolve):
    """A recipe step that names only its data trains as the bare command does: the method's learning rate, not another's."""
    recipe = tmp_path / "r.yaml"
    recipe.write_text(yaml.safe_dump({"base": {"model": str(tmp_path / "base")}, mode: {"data": ["d.txt"]}}))
    built, from_recipe = recipe_step(recipe, yaml.safe_load(recipe.read_text()), tmp_path, mode)
    from_flags = resolve(tmp_path, mode, "-m", built.base_model, "--tokenizer", built.base_tokenizer, "-d", "d.txt",
                         "-o", step_folder(built, mode) / "adapter")
    assert dataclasses.asdict(from_flags) == dataclasses.asdict(from_recipe)
    assert from_recipe.learning_rate == DEFAULT_LEARNING_RATES[mode]
    declared = METHODS[mode].options_type(model=from_recipe.model, tokenizer=from_recipe.tokenizer, data=from_recipe.data, output=from_recipe.output)
    assert dataclasses.asdict(declared) == dataclasses.asdict(from_recipe)


@pytest.mark.parametrize("mode", list(METHODS))
def test_every_declared_option_is_a_flag_a_config_key_and_a_recipe_key(mode):
    from cnllm.cli.app import load_command

    options_type = METHODS[mode].options_type
    command = load_command(mode)
    flags = {name for parameter in command.params for name in parameter.opts}
    fields = declared_fields(options_type)
    assert len(fields) == len(dataclasses.fields(options_type))  # nothing undeclared
    assert {flag(f.name) for f, _ in fields} <= flags
    assert {p.name for p in command.params} - {"config", "json_", "install_completion", "show_completion", "help"} == {f.name for f, _ in fields}
    assert set(recipe_fields(options_type)) == {f.name for f, d in fields if d.recipe}
    assert {"model", "tokenizer", "output", "force", "resume"}.isdisjoint(recipe_fields(options_type))


def test_an_error_names_the_option_as_the_user_spelled_it(cli, tmp_path, tiny_llama_dir):
    data = ASSETS / "zh.txt"
    flagged = cli("pt", "-m", tiny_llama_dir, "-d", data, "-o", tmp_path / "out", "--max-steps", "0")
    assert flagged.exit_code == 2 and "error: --max-steps must be at least 1, or -1 to train for --epochs; got 0" in flagged.stderr
    config = tmp_path / "pt.yaml"
    config.write_text("max_steps: 0\n")
    from_file = cli("pt", "-m", tiny_llama_dir, "-d", data, "-o", tmp_path / "out", "--config", config)
    assert from_file.exit_code == 2 and f"error: max-steps in {config} must be at least 1" in from_file.stderr
    recipe = tmp_path / "r.yaml"
    recipe.write_text(yaml.safe_dump({"base": {"model": str(tiny_llama_dir)}, "pt": {"data": [str(data)], "max_steps": 0}}))
    in_recipe = cli("pipeline", recipe, "-o", tmp_path / "w", "--dry-run")
    assert in_recipe.exit_code == 2 and "recipe step pt: max_steps must be at least 1, or -1 to train for epochs; got 0" in in_recipe.stderr


def test_one_declaration_is_the_flag_the_config_key_and_the_recipe_key(tmp_path, resolve):
    """--lr-scheduler is declared once, in TrainOptions: the flag, the --config key and the recipe key follow."""
    config = tmp_path / "pt.yaml"
    config.write_text("lr-scheduler: linear\n")
    common = ["-m", tmp_path, "-d", "d.txt", "-o", tmp_path / "out"]
    assert resolve(tmp_path, "pt", *common, "--lr-scheduler", "linear").lr_scheduler == "linear"
    assert resolve(tmp_path, "pt", *common, "--config", config).lr_scheduler == "linear"
    recipe = tmp_path / "r.yaml"
    recipe.write_text(yaml.safe_dump({"base": {"model": str(tmp_path)}, "pt": {"data": ["d.txt"], "lr_scheduler": "linear"}}))
    assert recipe_step(recipe, yaml.safe_load(recipe.read_text()), tmp_path, "pt")[1].lr_scheduler == "linear"
    bad = tmp_path / "bad.yaml"
    bad.write_text(yaml.safe_dump({"base": {"model": str(tmp_path)}, "pt": {"data": ["d.txt"], "lr_scheduler": "step"}}))
    with pytest.raises(UsageError, match="recipe step pt: lr_scheduler 'step' is not one of cosine, linear, constant"):
        recipe_step(bad, yaml.safe_load(bad.read_text()), tmp_path, "pt")
