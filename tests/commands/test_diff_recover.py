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


# KnowLM's published md5 list of the recovered ZhiXi-13b-base (fp32 diff), as its README prints it.
ZHIXI_BASE_MD5 = """\
b19e56ec888b44bfe5c1db49eb4a3195  pytorch_model-00001-of-00006.bin
39e23c61754719cfab9c0199d9abaccb  pytorch_model-00002-of-00006.bin
e164b3a17698d7b842274aadd74567eb  pytorch_model-00003-of-00006.bin
a535e330204f68bce6245914a6d460e5  pytorch_model-00004-of-00006.bin
009a4913710db64ae94ac62dffd784c6  pytorch_model-00005-of-00006.bin
c7c5750106a5724de3f0cb7a7151723a  pytorch_model-00006-of-00006.bin
"""


def test_md5_list_of_pytorch_bin_files_is_explained_before_the_work(cli, tmp_path, tiny_llama_dir, tuned):
    cli("diff-recover", "--make-diff", "-b", tiny_llama_dir, "--tuned", tuned, "-o", tmp_path / "diff")
    manifest = tmp_path / "md5sum.txt"
    manifest.write_text(ZHIXI_BASE_MD5)
    result = cli("diff-recover", "-b", tiny_llama_dir, "--diff", tmp_path / "diff", "-o", tmp_path / "out", "--verify", manifest)
    assert result.exit_code == 1
    first = result.stderr.splitlines()[0]  # said before anything else
    assert "lists 6 file(s) the recovered output will not contain: pytorch_model-00001-of-00006.bin" in first and "--reference DIR" in first
    assert "6 of them are pickled weight files a recovery never writes" in result.stderr

    # with --reference passing, the weights are checked tensor by tensor and the unreproducible list is not a failure
    result = cli(
        "diff-recover", "-b", tiny_llama_dir, "--diff", tmp_path / "diff", "-o", tmp_path / "out2", "--verify", manifest, "--reference", tuned, "--json"
    )
    assert result.exit_code == 0, result.stderr
    document = json.loads(result.stdout)
    assert len(document["verify"]["not_written"]) == 6 and document["reference"]["passed"] and "will not contain" in document["notes"][0]
    assert {f["reason"] for f in document["verify"]["files"]} == {"not written: a recovery writes safetensors"}


def test_md5_list_mixing_reproducible_names_still_fails_on_a_mismatch(cli, tmp_path, tiny_llama_dir, tuned):
    cli("diff-recover", "--make-diff", "-b", tiny_llama_dir, "--tuned", tuned, "-o", tmp_path / "diff")
    manifest = tmp_path / "md5sum.txt"
    manifest.write_text(ZHIXI_BASE_MD5 + "00000000000000000000000000000000  config.json\n")
    result = cli("diff-recover", "-b", tiny_llama_dir, "--diff", tmp_path / "diff", "-o", tmp_path / "out", "--verify", manifest, "--reference", tuned)
    assert result.exit_code == 1 and "7 file(s) do not match" in result.stderr
