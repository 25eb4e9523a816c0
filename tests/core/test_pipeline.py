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
    assert (tmp_path / "work" / "11-checksum" / "SHA256SUMS").exists()
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
    exams = tmp_path / "exams"
    exams.mkdir()
    recipe = load_recipe(write_recipe(tmp_path, tiny_llama_dir, assets, extra=f"eval:\n  mc: {{data: {exams}}}\n"))
    result = run_pipeline(recipe)
    assert [o.status for o in result.outcomes] == ["ran", "failed", "not-run"]
    assert "no 'val' split" in result.failed.error
    assert (tmp_path / "work" / "01-vocab" / "cnllm-step.json").exists()
    assert not (tmp_path / "work" / "10-eval").exists()


@pytest.mark.parametrize(
    "extra, message",
    [
        ("merge_pt: {}\n", "recipe step merge_pt needs the pt step before it"),
        ("quantize: {types: [q4_k_m]}\n", "recipe step quantize needs the convert step before it"),
        ("merge_pt: {dtype: fp8}\npt: {data: [DATA]}\n", "recipe step merge_pt: dtype 'fp8' is not a dtype; choose one of fp16, float16, half"),
        ("pt: {data: [DATA], learning_rate: fast}\n", "recipe step pt: learning_rate: expected a number, got 'fast'"),
        ("pt: {data: [DATA], precision: fp8}\n", "recipe step pt: precision 'fp8' is not one of auto, fp16"),
        ("pt: {data: [MISSING]}\n", "recipe step pt: input .*missing.txt does not exist"),
        ("convert: {outtype: q2}\n", "--outtype 'q2' is not one of f32, f16, bf16, q8_0, auto"),
        ("eval: {models: [sft], ppl: {data: [DATA]}}\n", r"recipe step eval: models: no model named sft in this recipe \(available: base\)"),
        ("eval: {mc: {data: DIR, format: cmmlu, split: val}}\n", "recipe step eval: mc: cmmlu has no 'val' split; choose one of dev, test"),
        ("checksum: {algo: md5}\n", "recipe step checksum: unknown option 'algo'"),
        ("align: {data: [DATA], method: kto}\n", "recipe step align: method 'kto' is not one of dpo, ipo"),
        ("merge_align: {}\n", "recipe step merge_align needs the align step before it"),
    ],
)
def test_every_step_is_checked_before_anything_runs(tmp_path, tiny_llama_dir, assets, extra, message):
    extra = extra.replace("DATA", str(assets / "zh.txt")).replace("MISSING", str(tmp_path / "missing.txt")).replace("DIR", str(tmp_path))
    recipe = load_recipe(write_recipe(tmp_path, tiny_llama_dir, assets, extra=extra))
    for dry_run in (True, False):
        with pytest.raises(UsageError, match=message):
            run_pipeline(recipe, dry_run=dry_run)
    assert not (tmp_path / "work" / "01-vocab").exists()  # the vocab step before it never ran


def test_step_defaults_come_from_core(tmp_path, tiny_llama_dir, assets):
    from cnllm.core.pipeline import check_recipe

    extra = f"merge_pt: {{dtype: fp16}}\npt: {{data: [{assets / 'zh.txt'}], learning_rate: '2e-4'}}\neval: {{mc: {{data: {tmp_path}, format: cmmlu}}}}\n"
    plans = check_recipe(load_recipe(write_recipe(tmp_path, tiny_llama_dir, assets, extra=extra)))
    assert plans["merge_pt"][0].dtype.name == "float16" and plans["merge_pt"][0].dtype == "fp16"
    assert plans["pt"][0].learning_rate == 2e-4
    assert plans["eval"][0].mc[1].split == "test"  # cmmlu has no val split


def test_recipe_validation(tmp_path):
    with pytest.raises(UsageError, match="unknown recipe key"):
        recipe_from_dict({"base": {"model": "m"}, "vocabulary": {}}, root=tmp_path)
    with pytest.raises(UsageError, match="needs 'base"):
        recipe_from_dict({"vocab": {}}, root=tmp_path)
    with pytest.raises(UsageError, match="no steps"):
        recipe_from_dict({"base": {"model": "m"}}, root=tmp_path)
    recipe = recipe_from_dict({"base": {"model": "m"}, "pt": {"data": ["d.txt"]}}, root=tmp_path)
    assert recipe.steps["pt"]["data"] == [str(tmp_path / "d.txt")]
