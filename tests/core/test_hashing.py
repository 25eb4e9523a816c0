import hashlib
from pathlib import Path

import pytest

from cnllm.core import hashing
from cnllm.core.errors import OutputExistsError, UsageError


@pytest.fixture
def model_dir(tmp_path: Path) -> Path:
    root = tmp_path / "model"
    (root / "sub").mkdir(parents=True)
    (root / "config.json").write_text('{"a": 1}\n')
    (root / "weights.bin").write_bytes(bytes(range(256)) * 4000)
    (root / "sub" / "tokenizer.model").write_bytes(b"\x00tokenizer" * 100)
    return root


@pytest.mark.parametrize("algorithm", hashing.ALGORITHMS)
def test_hash_file_matches_hashlib(tmp_path, algorithm):
    data = bytes(range(256)) * 50_000  # larger than one chunk at a small chunk size
    path = tmp_path / "x.bin"
    path.write_bytes(data)
    seen = []
    digest = hashing.hash_file(path, algorithm, chunk_size=1 << 16, on_bytes=seen.append)
    assert digest == hashlib.new(algorithm, data).hexdigest()
    assert sum(seen) == len(data)


def test_hash_files_reports_unreadable_file_as_error(tmp_path):
    present = tmp_path / "a"
    present.write_bytes(b"a")
    results = hashing.hash_files([(present, "sha256"), (tmp_path / "gone", "sha256")], jobs=2)
    assert results[(present, "sha256")] == hashlib.sha256(b"a").hexdigest()
    assert isinstance(results[(tmp_path / "gone", "sha256")], OSError)


def test_create_manifest_relative_sorted_and_excludes_itself(model_dir):
    manifest = model_dir / "SHA256SUMS"
    manifest.write_text(f"{'0' * 64}  weights.bin\n")  # an earlier manifest, replaced with --force
    result = hashing.create_manifest([model_dir], manifest=manifest, force=True, jobs=2)
    assert [f.path for f in result.files] == ["config.json", "sub/tokenizer.model", "weights.bin"]
    lines = manifest.read_text().splitlines()
    config_digest = hashlib.sha256((model_dir / "config.json").read_bytes()).hexdigest()
    assert lines[0] == f"{config_digest}  config.json"
    assert len(lines) == 3


def test_create_never_replaces_a_file_it_would_list(model_dir):
    """With --force an earlier manifest in the folder is replaced; any other file there is an input, kept."""
    before = (model_dir / "weights.bin").read_bytes()
    with pytest.raises(UsageError, match="is one of the files to hash"):
        hashing.create_manifest([model_dir], manifest=model_dir / "weights.bin", force=True)
    with pytest.raises(UsageError, match="is the input"):
        hashing.create_manifest([model_dir / "weights.bin"], manifest=model_dir / "weights.bin", force=True)
    assert (model_dir / "weights.bin").read_bytes() == before


def test_create_refuses_existing_manifest_without_force(model_dir):
    manifest = model_dir / "SUMS"
    manifest.write_text("keep\n")
    with pytest.raises(OutputExistsError):
        hashing.create_manifest([model_dir / "config.json"], manifest=manifest)
    assert manifest.read_text() == "keep\n"


def test_create_rejects_missing_input(tmp_path):
    with pytest.raises(UsageError, match="no such file"):
        hashing.create_manifest([tmp_path / "nope"])


def test_gnu_escaping_round_trip(tmp_path):
    odd = tmp_path / "back\\slash\nname.txt"
    odd.write_bytes(b"odd")
    result = hashing.create_manifest([odd], manifest=tmp_path / "SUMS")
    text = (tmp_path / "SUMS").read_text()
    assert text.startswith("\\") and "\\\\" in text and "\\n" in text
    parsed = hashing.parse_manifest(text)
    assert parsed.entries[0].path == odd.name
    assert hashing.verify_manifest(tmp_path / "SUMS").passed
    assert result.files[0].digest == hashlib.sha256(b"odd").hexdigest()


def _sha(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def test_parse_all_formats():
    a, b = _sha(b"a"), hashlib.md5(b"b").hexdigest()
    text = "\n".join(
        [
            f"{a}  gnu.txt",
            f"{a} *binary.txt",
            f"SHA256 (bsd.txt) = {a}",
            f"MD5 (bsd-md5.txt) = {b}",
            f"{b}  weights/consolidated.00.pth",
            "",
            "# a comment",
        ]
    )
    parsed = hashing.parse_manifest(text)
    assert [(e.path, e.algorithm) for e in parsed.entries] == [
        ("gnu.txt", "sha256"),
        ("binary.txt", "sha256"),
        ("bsd.txt", "sha256"),
        ("bsd-md5.txt", "md5"),
        ("weights/consolidated.00.pth", "md5"),
    ]
    assert not parsed.malformed
    assert parsed.formats == {"gnu", "bsd", "md5-list"}


def test_parse_markdown_table_ignores_prose_and_dash_rows():
    a = _sha(b"a")
    text = f"""# SHA256

Please check the following values before use.

| Model file | SHA256 |
| ---------- | ------ |
| `model-a.safetensors` | {a} |
| model-b.safetensors | - |

In Linux, run `sha256sum your-model-file`.
"""
    parsed = hashing.parse_manifest(text)
    assert [(e.path, e.digest, e.line) for e in parsed.entries] == [("model-a.safetensors", a, 7)]
    assert parsed.malformed == []


def test_parse_markdown_table_with_file_columns():
    a, b = _sha(b"a"), _sha(b"b")
    text = f"| | tokenizer.model | adapter_model.bin |\n|---|---|---|\n| 7B | {a} | {b} |\n"
    parsed = hashing.parse_manifest(text)
    assert [(e.path, e.digest) for e in parsed.entries] == [("tokenizer.model", a), ("adapter_model.bin", b)]


def test_malformed_lines_are_reported_with_line_numbers():
    a = _sha(b"a")
    parsed = hashing.parse_manifest(f"{a}  ok.txt\nthis is not a checksum\n{a[:-1]}  short.txt\n")
    assert len(parsed.entries) == 1
    assert [m.line for m in parsed.malformed] == [2, 3]
    assert "63 hex digits" in parsed.malformed[1].reason


def test_algo_override_checks_digest_length():
    md5 = hashlib.md5(b"x").hexdigest()
    parsed = hashing.parse_manifest(f"{md5}  x\n", algorithm="sha256")
    assert not parsed.entries and "64 hex digits" in parsed.malformed[0].reason


def test_verify_ok_failed_missing(model_dir):
    manifest = model_dir / "SHA256SUMS"
    hashing.create_manifest([model_dir], manifest=manifest)
    with open(model_dir / "weights.bin", "r+b") as handle:  # flip one byte
        handle.seek(1234)
        byte = handle.read(1)
        handle.seek(1234)
        handle.write(bytes([byte[0] ^ 0xFF]))
    (model_dir / "config.json").unlink()
    result = hashing.verify_manifest(manifest, jobs=2)
    status = {c.path: c.status for c in result.checks}
    assert status == {"config.json": "MISSING", "sub/tokenizer.model": "OK", "weights.bin": "FAILED"}
    assert not result.passed


def test_verify_unreadable_file_is_failed_with_reason(model_dir, monkeypatch):
    manifest = model_dir / "SUMS"
    hashing.create_manifest([model_dir / "config.json"], manifest=manifest)
    real = hashing.hash_file

    def deny(path, *args, **kwargs):
        if Path(path).name == "config.json":
            raise PermissionError(13, "Permission denied")
        return real(path, *args, **kwargs)

    monkeypatch.setattr(hashing, "hash_file", deny)
    check = hashing.verify_manifest(manifest).checks[0]
    assert check.status == "FAILED" and "Permission denied" in check.reason


def test_verify_with_root_and_md5_list(tmp_path):
    data_dir = tmp_path / "downloads"
    data_dir.mkdir()
    (data_dir / "diff.bin").write_bytes(b"diff")
    manifest = tmp_path / "md5.txt"
    manifest.write_text(f"{hashlib.md5(b'diff').hexdigest()}  diff.bin\n")
    assert hashing.verify_manifest(manifest, root=data_dir).passed


def test_verify_empty_and_unusable_manifests(tmp_path):
    empty = tmp_path / "empty"
    empty.write_text("\n# nothing\n")
    with pytest.raises(UsageError, match="empty"):
        hashing.verify_manifest(empty)
    junk = tmp_path / "junk"
    junk.write_text("hello\nworld\n")
    with pytest.raises(UsageError, match="malformed lines: 1, 2"):
        hashing.verify_manifest(junk)
    with pytest.raises(UsageError, match="does not exist"):
        hashing.verify_manifest(tmp_path / "absent")
    binary = tmp_path / "binary"
    binary.write_bytes(b"\xff\xfe\x00garbage")
    with pytest.raises(UsageError, match="not UTF-8"):
        hashing.verify_manifest(binary)
