"""Hugging Face model ids where a model path is taken: the local cache only, one clear line otherwise."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

from cnllm.cli.paths import MODEL_PARAMETERS

pytestmark = pytest.mark.filterwarnings("ignore::UserWarning", "ignore::FutureWarning")

REVISION = "0123456789abcdef0123456789abcdef01234567"


def fake_cache(root: Path, repo: str, model_dir: Path) -> Path:
    """A hub cache laid out as huggingface_hub writes it: blobs, snapshots/<commit>/ links, refs/main."""
    folder = root / f"models--{repo.replace('/', '--')}"
    snapshot = folder / "snapshots" / REVISION
    (folder / "blobs").mkdir(parents=True)
    snapshot.mkdir(parents=True)
    for number, item in enumerate(sorted(p for p in model_dir.iterdir() if p.is_file())):
        blob = folder / "blobs" / f"blob{number:04d}"
        shutil.copy2(item, blob)
        (snapshot / item.name).symlink_to(Path("..") / ".." / "blobs" / blob.name)
    (folder / "refs").mkdir()
    (folder / "refs" / "main").write_text(REVISION)
    return snapshot


@pytest.fixture
def hub(tmp_path, monkeypatch, tiny_llama_dir):
    cache = tmp_path / "hf-home" / "hub"
    snapshot = fake_cache(cache, "hfl/tiny-llama", tiny_llama_dir)
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf-home"))
    monkeypatch.delenv("HF_HUB_CACHE", raising=False)
    monkeypatch.chdir(tmp_path)
    return snapshot


def test_cached_id_resolves_to_its_snapshot(cli, tmp_path, hub):
    result = cli("convert-gguf", "hfl/tiny-llama", "-o", tmp_path / "tiny.gguf", "--outtype", "f16", "--json")
    assert result.exit_code == 0, result.stderr
    from cnllm.core.provenance import read_file_record

    record = read_file_record(tmp_path / "tiny.gguf")
    assert record["inputs"][0]["path"] == str(hub)
    revision = cli("convert-gguf", f"hfl/tiny-llama@{REVISION}", "-o", tmp_path / "rev.gguf", "--outtype", "f16")
    assert revision.exit_code == 0, revision.stderr


def test_ids_work_in_list_options_too(cli, tmp_path, hub, tiny_llama_dir):
    from tests.lora_fixtures import build_adapter

    adapter = build_adapter(tiny_llama_dir, tmp_path / "adapter-src")
    fake_cache(tmp_path / "hf-home" / "hub", "someone/tiny-lora", adapter)
    result = cli("merge-lora", "--base", "hfl/tiny-llama", "--lora", "someone/tiny-lora", "-o", tmp_path / "merged", "--json")
    assert result.exit_code == 0, result.stderr
    assert json.loads(result.stdout)["adapters"] == [str(tmp_path / "hf-home" / "hub" / "models--someone--tiny-lora" / "snapshots" / REVISION)]


def test_uncached_id_is_one_line_and_no_download(cli, tmp_path, hub, monkeypatch):
    def no_network(*args, **kwargs):
        raise AssertionError("a download was attempted")

    monkeypatch.setattr("cnllm.core.hub._download", no_network)
    result = cli("convert-gguf", "hfl/chinese-alpaca-2-7b", "-o", tmp_path / "x.gguf")
    assert result.exit_code == 2
    assert result.stderr.count("\n") == 1 and "hfl/chinese-alpaca-2-7b" in result.stderr
    assert str(tmp_path / "hf-home" / "hub") in result.stderr and "--allow-download" in result.stderr


def test_allow_download_goes_through_huggingface_hub(cli, tmp_path, hub, monkeypatch, tiny_llama_dir):
    calls = []

    def download(repo, revision, cache):
        calls.append((repo, revision, cache))
        return str(fake_cache(cache, repo, tiny_llama_dir))

    monkeypatch.setattr("cnllm.core.hub._download", download)
    result = cli("--allow-download", "convert-gguf", "hfl/other-llama", "-o", tmp_path / "x.gguf", "--outtype", "f16")
    assert result.exit_code == 0, result.stderr
    assert calls == [("hfl/other-llama", None, tmp_path / "hf-home" / "hub")]


def test_a_local_folder_wins_over_an_id(cli, tmp_path, hub, tiny_llama_dir):
    shutil.copytree(tiny_llama_dir, tmp_path / "hfl" / "tiny-llama")
    (tmp_path / "hfl" / "tiny-llama" / "marker.txt").write_text("local")
    result = cli("convert-gguf", "hfl/tiny-llama", "-o", tmp_path / "local.gguf", "--outtype", "f16")
    assert result.exit_code == 0, result.stderr
    from cnllm.core.provenance import read_file_record

    assert read_file_record(tmp_path / "local.gguf")["inputs"][0]["path"] == str(tmp_path / "hfl" / "tiny-llama")


def test_model_parameters_cover_every_model_option():
    """Every command option that takes a model, adapter or tokenizer is in MODEL_PARAMETERS, or declared one
    (the training commands' ``model=True`` options, listed in their function's ``model_parameters``)."""
    import click

    from cnllm.cli.app import COMMANDS, load_command

    missing = set()
    for name in COMMANDS:
        command = load_command(name)
        for sub in [command, *getattr(command, "commands", {}).values()]:
            models = MODEL_PARAMETERS | getattr(sub.callback, "model_parameters", frozenset())
            for param in sub.params:
                if isinstance(param.type, click.Path) and any(word in (param.name or "") for word in ("model", "lora", "base", "tokenizer", "peft")):
                    if param.name not in models:
                        missing.add(f"{name} {param.name}")
    assert not missing, missing
    assert {"model", "tokenizer", "peft_path"} <= load_command("pt").callback.model_parameters


def test_relative_paths_reach_the_command_absolute(cli, tmp_path, monkeypatch):
    """The path rule sees the strings click passes (typer converts them to Path afterwards)."""
    seen = {}
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr("cnllm.core.hashing.match_published", lambda manifest, files, **kw: seen.update(manifest=manifest, files=files) or exit(0))
    (tmp_path / "SHA256SUMS").write_text("")
    (tmp_path / "a.bin").write_text("")
    cli("checksum", "verify", "SHA256SUMS", "a.bin")
    assert seen == {"manifest": tmp_path / "SHA256SUMS", "files": [tmp_path / "a.bin"]}
