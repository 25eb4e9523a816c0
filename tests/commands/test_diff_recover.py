"""``cnllm diff-recover`` (and --make-diff) end to end: round trip, --verify, option errors, exit codes."""

from __future__ import annotations

import json

import pytest
import torch

from cnllm.core.merge import merge_lora
from cnllm.core.tensors import iter_tensors
from tests.lora_fixtures import build_adapter

pytestmark = pytest.mark.filterwarnings("ignore::UserWarning", "ignore::FutureWarning")


@pytest.fixture(scope="module")
def tuned(tmp_path_factory, tiny_llama_dir):
    root = tmp_path_factory.mktemp("tuned")
    return merge_lora(tiny_llama_dir, [build_adapter(tiny_llama_dir, root / "adapter")], root / "tuned").output


def test_make_then_recover(cli, tmp_path, tiny_llama_dir, tuned):
    made = cli("diff-recover", "--make-diff", "--base", tiny_llama_dir, "--tuned", tuned, "-o", tmp_path / "diff")
    assert made.exit_code == 0, made.stderr
    assert "bit for bit" in made.stdout
    result = cli("diff-recover", "--base", tiny_llama_dir, "--diff", tmp_path / "diff", "-o", tmp_path / "out", "--reference", tuned, "--json")
    assert result.exit_code == 0, result.stderr
    document = json.loads(result.stdout)
    assert document["mode"] == "recover" and document["reference"]["passed"] and document["reference"]["max_abs_diff"] == 0.0
    assert document["throughput_bytes_per_s"] > 0
    expected, actual = dict(iter_tensors(tuned)), dict(iter_tensors(tmp_path / "out"))
    assert all(torch.equal(expected[name], actual[name]) for name in expected)
    assert cli("checksum", "verify", tmp_path / "out" / "SHA256SUMS").exit_code == 0


def test_verify_manifest_mismatch_exits_1(cli, tmp_path, tiny_llama_dir, tuned):
    cli("diff-recover", "--make-diff", "-b", tiny_llama_dir, "--tuned", tuned, "-o", tmp_path / "diff")
    manifest = tmp_path / "published.sha256"
    manifest.write_text("0" * 64 + "  model.safetensors\n")
    result = cli("diff-recover", "-b", tiny_llama_dir, "--diff", tmp_path / "diff", "-o", tmp_path / "out", "--verify", manifest)
    assert result.exit_code == 1
    assert "FAILED" in result.stdout and "model.safetensors" in result.stdout
    assert "do not match" in result.stderr and (tmp_path / "out" / "model.safetensors").exists()


@pytest.mark.parametrize(
    "args, message",
    [
        (["--make-diff"], "--make-diff needs --tuned"),
        ([], "name the diff to recover from with --diff"),
        (["--make-diff", "--tuned", "{tuned}", "--diff", "{tuned}"], "apply when recovering"),
        (["--diff", "{tuned}", "--tuned", "{tuned}"], "--tuned applies to --make-diff only"),
    ],
)
def test_option_errors(cli, tmp_path, tiny_llama_dir, tuned, args, message):
    args = [a.format(tuned=tuned) for a in args]
    result = cli("diff-recover", "--base", tiny_llama_dir, "-o", tmp_path / "out", *args)
    assert result.exit_code == 2 and message in result.stderr
    assert not (tmp_path / "out").exists()


def test_layer_mismatch_exits_2(cli, tmp_path, spm_tokenizer_dir, tiny_llama_dir, tuned):
    from cnllm.core.tiny import build_tiny_llama

    cli("diff-recover", "--make-diff", "-b", tiny_llama_dir, "--tuned", tuned, "-o", tmp_path / "diff")
    deeper = build_tiny_llama(tmp_path / "deeper", spm_tokenizer_dir, layers=3)
    result = cli("diff-recover", "-b", deeper, "--diff", tmp_path / "diff", "-o", tmp_path / "out")
    assert result.exit_code == 2 and "do not hold the same tensors" in result.stderr
    assert not (tmp_path / "out").exists()
