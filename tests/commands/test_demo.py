"""The README's main job, end to end: every step runs and the report shows the adaptation working."""

import json


def test_demo_runs_every_step_and_reports_before_after(cli, tmp_path):
    result = cli("demo", "-o", tmp_path / "demo", "--json")
    assert result.exit_code == 0, result.stderr
    document = json.loads(result.stdout)
    steps = {s["step"]: s for s in document["steps"]}
    assert all(s["status"] == "ran" for s in steps.values()), steps
    vocab = steps["vocab"]["figures"]
    assert vocab["chinese_chars_per_token"]["after"] > 1.8 * vocab["chinese_chars_per_token"]["before"]
    pt = steps["pt"]["figures"]
    assert pt["perplexity"]["after"] < pt["perplexity"]["before"]
    bits = steps["eval"]["figures"]["bits_per_byte"]
    assert bits["pt"] < bits["base"] and {"gguf-q8_0", "gguf-q4_k_m"} <= set(bits)
    assert document["notes"]["chat"]["answer"] is not None
    report = tmp_path / "demo" / "report.md"
    assert report.exists() and (tmp_path / "demo" / "report.json").exists()
    assert cli("checksum", "verify", tmp_path / "demo" / "09-checksum" / "SHA256SUMS", "--root", tmp_path / "demo").exit_code == 0
    again = json.loads(cli("demo", "-o", tmp_path / "demo", "--json").stdout)
    assert {s["status"] for s in again["steps"]} == {"skipped"}
