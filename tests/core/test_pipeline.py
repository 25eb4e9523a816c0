"""The pipeline engine: order, fingerprints and skipping, slices, dry runs, failures, the report."""

import json

import pytest

from cnllm.core.errors import UsageError
from cnllm.core.pipeline import load_recipe, recipe_from_dict, run_pipeline


def write_recipe(tmp_path, tiny_llama_dir, assets, vocab_size=2500, extra=""):
    path = tmp_path / "recipe.yaml"
    path.write_text(
        f"""name: tiny
workdir: work
base:
  model: {tiny_llama_dir}
vocab:
  corpus: [{assets / 'zh.txt'}]
  vocab_size: {vocab_size}
  measure_text: {assets / 'zh_heldout.txt'}
checksum: {{}}
{extra}""",
        encoding="utf-8",
    )
    return path


def test_run_skip_and_rerun_on_change(tmp_path, tiny_llama_dir, assets):
    recipe = load_recipe(write_recipe(tmp_path, tiny_llama_dir, assets))
    assert recipe.workdir == tmp_path / "work"
    first = run_pipeline(recipe)
    assert [(o.name, o.status) for o in first.outcomes] == [("vocab", "ran"), ("checksum", "ran")]
    vocab = first.outcomes[0].figures
    assert vocab["merged_vocab"] > vocab["base_vocab"] and vocab["chinese_chars_per_token"]["after"] > vocab["chinese_chars_per_token"]["before"]
    assert (tmp_path / "work" / "01-vocab" / "tokenizer" / "tokenizer.json").exists()
    assert (tmp_path / "work" / "09-checksum" / "SHA256SUMS").exists()
    report = json.loads((tmp_path / "work" / "report.json").read_text())
    assert [s["status"] for s in report["steps"]] == ["ran", "ran"]
    assert "chinese_chars_per_token" in (tmp_path / "work" / "report.md").read_text()

    again = run_pipeline(recipe)
    assert [o.status for o in again.outcomes] == ["skipped", "skipped"]

    changed = load_recipe(write_recipe(tmp_path, tiny_llama_dir, assets, vocab_size=2600))
    plan = run_pipeline(changed, dry_run=True)
    assert [o.status for o in plan.outcomes] == ["planned", "planned"]
    rerun = run_pipeline(changed)
    assert [o.status for o in rerun.outcomes] == ["ran", "ran"]


def test_slices(tmp_path, tiny_llama_dir, assets):
    recipe = load_recipe(write_recipe(tmp_path, tiny_llama_dir, assets))
    with pytest.raises(UsageError, match="earlier step vocab"):
        run_pipeline(recipe, start="checksum")
    only_vocab = run_pipeline(recipe, until="vocab")
    assert [o.status for o in only_vocab.outcomes] == ["ran", "not-run"]
    rest = run_pipeline(recipe, start="checksum")
    assert [o.status for o in rest.outcomes] == ["skipped", "ran"]
    with pytest.raises(UsageError, match="recipe's steps are vocab, checksum"):
        run_pipeline(recipe, until="sft")


def test_failed_step_stops_and_keeps_earlier_outputs(tmp_path, tiny_llama_dir, assets):
    recipe = load_recipe(write_recipe(tmp_path, tiny_llama_dir, assets, extra="merge_pt: {}\n"))
    result = run_pipeline(recipe)
    assert [o.status for o in result.outcomes] == ["ran", "failed", "not-run"]
    assert "needs the pt step" in result.failed.error
    assert (tmp_path / "work" / "01-vocab" / "cnllm-step.json").exists()
    assert not (tmp_path / "work" / "03-merge_pt").exists()


def test_recipe_validation(tmp_path):
    with pytest.raises(UsageError, match="unknown recipe key"):
        recipe_from_dict({"base": {"model": "m"}, "vocabulary": {}}, root=tmp_path)
    with pytest.raises(UsageError, match="needs 'base"):
        recipe_from_dict({"vocab": {}}, root=tmp_path)
    with pytest.raises(UsageError, match="no steps"):
        recipe_from_dict({"base": {"model": "m"}}, root=tmp_path)
    recipe = recipe_from_dict({"base": {"model": "m"}, "pt": {"data": ["d.txt"]}}, root=tmp_path)
    assert recipe.steps["pt"]["data"] == [str(tmp_path / "d.txt")]
