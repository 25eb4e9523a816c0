"""``cnllm checksum verify`` against published SHA256.md tables keyed by model name (copies of Chinese-LLaMA-Alpaca's)."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import pytest

from cnllm.core import hashing

PUBLISHED = Path(__file__).resolve().parent.parent / "assets" / "published"
EARLY = PUBLISHED / "Chinese-LLaMA-Alpaca-SHA256-01d6a8e.md"  # LoRA .zip and merged .pth tables
CURRENT = PUBLISHED / "Chinese-LLaMA-Alpaca-SHA256-ee21f26.md"  # Parts column, <br/> cells, TBA / - placeholders


def sha(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def test_real_layouts_parse_every_published_digest():
    early = hashing.parse_published_tables(EARLY.read_text(encoding="utf-8"))
    assert [(e.label, e.kind, e.heading) for e in early.entries] == [
        ("Chinese-LLaMA-7B", ".zip", "LoRA Zip files"),
        ("Chinese-Alpaca-7B", ".zip", "LoRA Zip files"),
        ("Chinese-Alpaca-7B", ".pth", "Merged files (consolidate.pth)"),
    ]
    assert early.entries[2].digest == "fbfccc91183169842aac8d093379f0a449b5a26c5ee7a298baf0d556f1499b90"
    assert [p.label for p in early.placeholders] == ["Chinese-LLaMA-7B"] and early.name_keyed

    current = hashing.parse_published_tables(CURRENT.read_text(encoding="utf-8"))
    assert len(current.entries) == 60  # 7 parts + 2+3+7 .bin shards + 2 tokenizers + 15 LoRA + 24 merged shards
    by_digest = {e.digest: e for e in current.entries}
    part = by_digest["d5ccbcc465c71c0de439a5aeffebe8344c68a519bce70bc7f9f92654ee567085"]
    assert (part.label, part.part, part.kind) == ("13B", "01", "consolidated.*.pth")
    shard = by_digest["2efc56cddb7877c830bc5b402ee72996aedb5694c9e8007bf1d52d72c0d97d26"]
    assert (shard.label, shard.kind, shard.index, shard.count) == ("13B", "pytorch_model-*.bin", 3, 3)
    tokenizer = by_digest["2d967e855b1213a439df6c8ce2791f869c84b4f3b6cfacf22b86440b8192a2f8"]
    assert (tokenizer.label, tokenizer.kind) == ("Alpaca (7B, 13B, 33B)", "Tokenizer.model")
    merged = by_digest["99c81a7a310802dcc579fe96288fbc18d4486f92020eaf925e1c33db8311378a"]
    assert merged.describe() == "Chinese-Alpaca-33B, consolidated.*.pth, file 4 of 4 [Merged files (consolidated.*.pth)]"
    assert [p.label for p in current.placeholders] == ["Chinese-Alpaca-Pro-7B", "Chinese-Alpaca-Pro-13B", "Chinese-Alpaca-Plus-33B", "Chinese-Alpaca-Pro-33B"]


def test_file_keyed_tables_stay_with_the_name_matching_verify():
    text = f"| Model file | SHA256 |\n| --- | --- |\n| model-a.safetensors | {sha(b'a')} |\n"
    assert not hashing.parse_published_tables(text).name_keyed


def planted(tmp_path: Path, source: Path, replacements: dict[str, bytes]) -> Path:
    """A copy of a real table with some published digests replaced by the digests of the given contents."""
    text = source.read_text(encoding="utf-8")
    for digest, content in replacements.items():
        assert digest in text
        text = text.replace(digest, sha(content))
    target = tmp_path / "SHA256.md"
    target.write_text(text, encoding="utf-8")
    return target


def test_files_are_identified_by_digest(cli, tmp_path):
    alpaca = b"merged alpaca 7B"
    shard2 = b"second shard of the 13B merge"
    manifest = planted(
        tmp_path,
        CURRENT,
        {"fbfccc91183169842aac8d093379f0a449b5a26c5ee7a298baf0d556f1499b90": alpaca, "3954f3e7f7264994f23800a04423e6563cc1959ac699d9eaaa6801b4f9392ebd": shard2},
    )
    downloads = tmp_path / "downloads"
    downloads.mkdir()
    (downloads / "consolidated.00.pth").write_bytes(alpaca)
    (downloads / "consolidated.01.pth").write_bytes(shard2)
    result = cli("checksum", "verify", manifest, downloads / "consolidated.00.pth", downloads / "consolidated.01.pth")
    assert result.exit_code == 0, result.stdout + result.stderr
    assert "2 of 2 files match a published digest" in result.stdout and "4 entries not published yet (TBA/-)" in result.stdout
    document = json.loads(cli("checksum", "verify", manifest, downloads / "consolidated.00.pth", downloads / "consolidated.01.pth", "--json").stdout)
    assert [f["matches"][0]["description"] for f in document["files"]] == [
        "Chinese-Alpaca-7B, consolidated.*.pth [Merged files (consolidated.*.pth)]",
        "Chinese-LLaMA-13B, consolidated.*.pth, file 2 of 2 [Merged files (consolidated.*.pth)]",
    ]

    # --root: every file under the folder, before this change reported as MISSING rows
    (downloads / "tokenizer.model").write_bytes(b"a tokenizer nobody published")
    result = cli("checksum", "verify", manifest, "--root", downloads, "--json")
    assert result.exit_code == 1
    document = json.loads(result.stdout)
    assert document["mode"] == "match-by-digest" and document["matched"] == 2 and document["unmatched"] == 1
    unmatched = next(f for f in document["files"] if f["status"] == "NO MATCH")
    assert unmatched["path"] == "tokenizer.model" and unmatched["reason"] == "no published digest matches"
    matched = {f["path"]: f["matches"][0] for f in document["files"] if f["matches"]}
    assert matched["consolidated.00.pth"]["label"] == "Chinese-Alpaca-7B" and matched["consolidated.01.pth"]["index"] == 2


def test_early_layout_without_root_uses_the_manifest_folder(cli, tmp_path):
    zipped = b"chinese-alpaca-lora-7b.zip bytes"
    manifest = planted(tmp_path, EARLY, {"9bb5b639dc2ea9ad593268b5f6abf85514c7637bf10f2344eb7031fe0fce2d87": zipped})
    (tmp_path / "chinese_alpaca_lora_7b.zip").write_bytes(zipped)
    result = cli("checksum", "verify", manifest)
    assert result.exit_code == 0, result.stdout
    assert "1 of 1 files match" in result.stdout and "Chinese-LLaMA-7B" in result.stdout  # its merged .pth is "-"
    document = json.loads(cli("checksum", "verify", manifest, "--json").stdout)
    assert document["files"][0]["matches"][0]["description"] == "Chinese-Alpaca-7B, .zip [LoRA Zip files]"


def test_unplanted_file_matches_nothing_and_exits_1(cli, tmp_path):
    (tmp_path / "model.bin").write_bytes(b"not released")
    result = cli("checksum", "verify", CURRENT, tmp_path / "model.bin")
    assert result.exit_code == 1 and "NO MATCH" in result.stdout and "0 of 1 files match" in result.stdout


def test_file_arguments_also_work_with_plain_manifests_and_refuse_root(cli, tmp_path):
    (tmp_path / "a.bin").write_bytes(b"a")
    manifest = tmp_path / "SHA256SUMS"
    manifest.write_text(f"{sha(b'a')}  renamed-on-the-server.bin\n")
    result = cli("checksum", "verify", manifest, tmp_path / "a.bin", "--json")
    assert result.exit_code == 0 and json.loads(result.stdout)["files"][0]["matches"][0]["label"] == "renamed-on-the-server.bin"
    both = cli("checksum", "verify", manifest, tmp_path / "a.bin", "--root", tmp_path)
    assert both.exit_code == 2 and "not both" in both.stderr


@pytest.mark.parametrize("text", ["| Model | SHA256 |\n| --- | --- |\n| Chinese-Alpaca-Pro-7B | TBA |\n"])
def test_only_placeholders_is_a_usage_error(cli, tmp_path, text):
    manifest = tmp_path / "SHA256.md"
    manifest.write_text(text)
    (tmp_path / "x.bin").write_bytes(b"x")
    result = cli("checksum", "verify", manifest, tmp_path / "x.bin")
    assert result.exit_code == 2 and "only placeholders" in result.stderr
