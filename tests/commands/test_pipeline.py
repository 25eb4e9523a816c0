import json

from cnllm.core.pipeline import load_recipe

REPO_EXAMPLES = __import__("pathlib").Path(__file__).resolve().parents[2] / "examples" / "recipes"


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
    manifest = tmp_path / "w" / "09-checksum" / "SHA256SUMS"
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
