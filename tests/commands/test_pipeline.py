import json
from pathlib import Path

import pytest
import yaml

from cnllm.core.pipeline import load_recipe

REPO_EXAMPLES = Path(__file__).resolve().parents[2] / "examples" / "recipes"
EXAMPLE_RECIPES = sorted(p.name for p in REPO_EXAMPLES.glob("*.yaml"))


def tiny_example(name: str, tmp_path: Path, base: Path, assets: Path, **changes: dict) -> Path:
    """An example recipe as shipped, with the tiny model as base and the bundled samples as its data
    (its options, dtype words included, untouched unless ``changes`` updates a step)."""
    data = yaml.safe_load((REPO_EXAMPLES / name).read_text(encoding="utf-8"))
    data["base"] = {"model": str(base)}
    data["workdir"] = str(tmp_path / "work")
    samples = {"vocab": {"corpus": [str(assets / "zh.txt")], "measure_text": str(assets / "zh_heldout.txt")},
               "pt": {"data": [str(assets / "zh.txt")]}, "sft": {"data": [str(assets / "alpaca_zh.json")]}}
    for step, values in samples.items():
        if step in data:
            data[step].update(values)
    if "eval" in data:
        data["eval"]["ppl"]["data"] = [str(assets / "zh_heldout.txt")]
        data["eval"]["mc"]["data"] = str(assets / "ceval-mini")
    for step, values in changes.items():
        data[step].update(values)
    path = tmp_path / name
    path.write_text(yaml.safe_dump(data, allow_unicode=True, sort_keys=False), encoding="utf-8")
    return path


def test_pipeline_cli_dry_run_then_run_then_skip(cli, tmp_path, tiny_llama_dir, assets):
    recipe = tmp_path / "r.yaml"
    recipe.write_text(f"name: t\nbase: {{model: {tiny_llama_dir}}}\nchecksum: {{}}\n")
    plan = cli("pipeline", recipe, "--dry-run", "--json", "-o", tmp_path / "w")
    assert plan.exit_code == 0
    assert [s["status"] for s in json.loads(plan.stdout)["steps"]] == ["planned"]
    assert not (tmp_path / "w" / "report.md").exists()
    ran = cli("pipeline", recipe, "-o", tmp_path / "w")
    assert ran.exit_code == 0 and "report:" in ran.stdout
    again = json.loads(cli("pipeline", recipe, "-o", tmp_path / "w", "--json").stdout)
    assert [s["status"] for s in again["steps"]] == ["skipped"]
    manifest = tmp_path / "w" / "11-checksum" / "SHA256SUMS"
    # this recipe's final model is its base, outside the working folder
    assert cli("checksum", "verify", manifest, "--root", tmp_path / "w", "--allow-outside").exit_code == 0


def test_pipeline_cli_bad_recipe_is_usage_error(cli, tmp_path):
    recipe = tmp_path / "r.yaml"
    recipe.write_text("base: {model: nowhere}\nbogus: {}\n")
    result = cli("pipeline", recipe)
    assert result.exit_code == 2 and "unknown recipe key" in result.stderr
    recipe.write_text("base: {model: nowhere}\nchecksum: {}\n")
    result = cli("pipeline", recipe)
    assert result.exit_code == 2 and "does not exist" in result.stderr


def test_example_recipes_parse():
    for path in sorted(REPO_EXAMPLES.glob("*.yaml")):
        recipe = load_recipe(path)
        assert recipe.steps, path


@pytest.mark.parametrize("name", EXAMPLE_RECIPES)
def test_every_example_recipe_passes_dry_run(cli, tmp_path, tiny_llama_dir, assets, name):
    result = cli("pipeline", tiny_example(name, tmp_path, tiny_llama_dir, assets), "--dry-run", "--json")
    assert result.exit_code == 0, result.stderr
    document = json.loads(result.stdout)
    assert document["steps"] and {s["status"] for s in document["steps"]} == {"planned"}
    assert not (tmp_path / "work").exists()


def test_dry_run_names_the_step_key_and_allowed_values(cli, tmp_path, tiny_llama_dir, assets):
    recipe = tiny_example("llama-3-8b.yaml", tmp_path, tiny_llama_dir, assets, merge_sft={"dtype": "fp8"})
    result = cli("pipeline", recipe, "--dry-run")
    assert result.exit_code == 2
    assert "recipe step merge_sft: dtype 'fp8' is not a dtype; choose one of fp16, float16, half" in result.stderr
    recipe = tiny_example("llama-3-8b.yaml", tmp_path, tiny_llama_dir, assets, pt={"lora_rnak": 8})
    result = cli("pipeline", recipe, "--until", "pt")
    assert result.exit_code == 2 and "recipe step pt: unknown option 'lora-rnak'; known options:" in result.stderr
    assert not (tmp_path / "work").exists()


TINY_TRAINING = {"block_size": 64, "batch_size": 2, "gradient_accumulation_steps": 1, "max_steps": 2, "lora_rank": 4, "lora_alpha": 8,
                 "save_steps": 1000, "logging_steps": 1, "eval_before": False}


@pytest.mark.parametrize("name, dtype, canonical, first", [
    ("chinese-llama-2-7b.yaml", "fp16", "float16", ["vocab", "pt", "merge_pt"]),
    ("llama-3-8b.yaml", "bf16", "bfloat16", ["pt", "merge_pt"]),
])
def test_example_recipes_run_their_first_steps_with_their_own_dtype_words(cli, tmp_path, tiny_llama_dir, assets, name, dtype, canonical, first):
    changes = {"pt": {**TINY_TRAINING, "learning_rate": "2e-4"}}  # a YAML 1.1 string, as users write it
    if "vocab" in first:
        changes["vocab"] = {"vocab_size": 2500}
    recipe = tiny_example(name, tmp_path, tiny_llama_dir, assets, **changes)
    assert yaml.safe_load(recipe.read_text())["merge_pt"] == {"dtype": dtype}
    result = cli("pipeline", recipe, "--until", "merge_pt", "--json")
    assert result.exit_code == 0, result.stderr
    steps = {s["step"]: s for s in json.loads(result.stdout)["steps"]}
    assert [n for n, s in steps.items() if s["status"] == "ran"] == first
    assert steps["merge_pt"]["figures"]["dtype"] == dtype  # the recipe's word comes back
    merged = Path(steps["merge_pt"]["folder"]) / "model"
    assert json.loads((merged / "config.json").read_text())["dtype"] == canonical


def test_vocab_step_extend_model_is_measured_beside_the_base(cli, tmp_path, tiny_llama_dir, assets):
    """``extend_model: true`` writes step 0 (the base with the merged vocabulary, untrained) and the eval step reports
    bits per character of both, the figure that compares models whose tokenizers differ."""
    recipe = tmp_path / "r.yaml"
    recipe.write_text(yaml.safe_dump({
        "name": "step0", "base": {"model": str(tiny_llama_dir)},
        "vocab": {"corpus": [str(assets / "zh.txt")], "vocab_size": 2000, "extend_model": True},
        "eval": {"ppl": {"data": [str(assets / "zh_heldout.txt")], "ctx": 64}},
    }), encoding="utf-8")
    result = cli("pipeline", recipe, "-o", tmp_path / "w", "--json")
    assert result.exit_code == 0, result.stderr
    steps = {s["step"]: s for s in json.loads(result.stdout)["steps"]}
    assert steps["vocab"]["figures"]["extended_model"]["new_row_init"] == "subword-mean"
    figures = steps["eval"]["figures"]
    assert set(figures["bits_per_char"]) == {"base", "extended"}
    assert figures["chars_per_token"]["extended"] > figures["chars_per_token"]["base"]
    record = json.loads((tmp_path / "w" / "01-vocab" / "extended-model" / "cnllm-extend-model.json").read_text(encoding="utf-8"))
    assert record["options"]["new_row_init"] == "subword-mean"


def test_vocab_step_new_row_init_is_checked_before_anything_runs(cli, tmp_path, tiny_llama_dir, assets):
    recipe = tmp_path / "r.yaml"
    recipe.write_text(yaml.safe_dump({"base": {"model": str(tiny_llama_dir)},
                                      "vocab": {"corpus": [str(assets / "zh.txt")], "extend_model": True, "new_row_init": "zero"}}))
    result = cli("pipeline", recipe, "-o", tmp_path / "w", "--dry-run")
    assert result.exit_code == 2 and "new_row_init 'zero' is not one of subword-mean, mean" in result.stderr
