"""``cnllm merge-lora`` end to end: JSON output, --verify, exit codes, nothing left behind on failure."""

from __future__ import annotations

import errno
import json

import pytest

from cnllm.core.hashing import verify_manifest
from tests.lora_fixtures import build_adapter

pytestmark = pytest.mark.filterwarnings("ignore::UserWarning", "ignore::FutureWarning")


@pytest.fixture(scope="module")
def adapter(tmp_path_factory, tiny_llama_dir):
    return build_adapter(tiny_llama_dir, tmp_path_factory.mktemp("adapter") / "lora")


def test_merge_json_and_verify(cli, tmp_path, tiny_llama_dir, adapter):
    out = tmp_path / "merged"
    result = cli("merge-lora", "--base", tiny_llama_dir, "--lora", adapter, "-o", out, "--verify", "--json")
    assert result.exit_code == 0, result.stderr
    document = json.loads(result.stdout)
    assert document["verify"]["passed"] and document["verify"]["max_abs_diff"] < 1e-3
    assert document["updated"] == 14 and document["vocab"]["embedding"] == 1000 and document["dtype"] == "float32"
    assert "SHA256SUMS" in document["files"]
    assert cli("checksum", "verify", out / "SHA256SUMS").exit_code == 0
    assert verify_manifest(out / "SHA256SUMS").passed


def test_human_output_and_pth_format(cli, tmp_path, tiny_llama_dir, adapter):
    out = tmp_path / "pth"
    result = cli("merge-lora", "-b", tiny_llama_dir, "-l", adapter, "-o", out, "--format", "pth", "--shards", "2", "--dtype", "fp16")
    assert result.exit_code == 0, result.stderr
    assert "merged 1 adapter(s)" in result.stdout and "(pth, fp16," in result.stdout  # the word given comes back
    assert (out / "consolidated.01.pth").exists() and (out / "params.json").exists()


@pytest.mark.parametrize("word, canonical", [("half", "float16"), ("bfloat16", "bfloat16"), ("float", "float32")])
def test_every_dtype_spelling_is_accepted_and_echoed(cli, tmp_path, tiny_llama_dir, adapter, word, canonical):
    out = tmp_path / "merged"
    result = cli("merge-lora", "-b", tiny_llama_dir, "-l", adapter, "-o", out, "--dtype", word, "--json")
    assert result.exit_code == 0, result.stderr
    assert json.loads(result.stdout)["dtype"] == word
    assert json.loads((out / "config.json").read_text())["dtype"] == canonical
    bad = cli("merge-lora", "-b", tiny_llama_dir, "-l", adapter, "-o", tmp_path / "bad", "--dtype", "fp8")
    assert bad.exit_code == 2 and "--dtype 'fp8' is not a dtype; choose one of fp16, float16, half" in bad.stderr


def test_verify_failure_exits_1_and_keeps_the_output(cli, tmp_path, tiny_llama_dir, adapter):
    out = tmp_path / "merged"
    result = cli("merge-lora", "--base", tiny_llama_dir, "--lora", adapter, "-o", out, "--dtype", "fp16", "--verify", "--tolerance", "0")
    assert result.exit_code == 1
    assert "max logit difference" in result.stderr and "> tolerance 0" in result.stderr
    assert "verify FAILED" in result.stdout and (out / "SHA256SUMS").exists()


def test_usage_errors(cli, tmp_path, tiny_llama_dir, adapter):
    (tmp_path / "empty").mkdir()
    result = cli("merge-lora", "--base", tiny_llama_dir, "--lora", tmp_path / "empty", "-o", tmp_path / "out")
    assert result.exit_code == 2 and "no adapter_config.json" in result.stderr
    (tmp_path / "exists").mkdir()
    result = cli("merge-lora", "--base", tiny_llama_dir, "--lora", adapter, "-o", tmp_path / "exists")
    assert result.exit_code == 2 and "already exists" in result.stderr and "--force" in result.stderr
    result = cli("merge-lora", "--base", tiny_llama_dir, "--lora", adapter, "-o", tmp_path / "out", "--shards", "2")
    assert result.exit_code == 2 and "--shards" in result.stderr
    assert "Traceback" not in result.stderr
    assert sorted(p.name for p in tmp_path.iterdir()) == ["empty", "exists"]


def test_disk_full_mid_write(cli, tmp_path, tiny_llama_dir, adapter, monkeypatch):
    from cnllm.core import tensors

    original = tensors.StreamingShardWriter.add_rows
    written = []

    def write_until_full(self, name, first, block):
        if len(written) == 3:
            raise OSError(errno.ENOSPC, "No space left on device")
        written.append(name)
        original(self, name, first, block)

    monkeypatch.setattr(tensors.StreamingShardWriter, "add_rows", write_until_full)
    result = cli("merge-lora", "--base", tiny_llama_dir, "--lora", adapter, "-o", tmp_path / "out")
    assert result.exit_code == 1 and "no space left on " in result.stderr and "(needed ~" in result.stderr
    assert list(tmp_path.iterdir()) == []
