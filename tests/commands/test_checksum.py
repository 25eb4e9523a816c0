import hashlib
import json

import pytest


@pytest.fixture
def release(tmp_path):
    """A folder laid out like a downloaded model release."""
    root = tmp_path / "release"
    (root / "lora").mkdir(parents=True)
    (root / "lora" / "adapter_model.bin").write_bytes(b"\x01" * 5000)
    (root / "lora" / "adapter_config.json").write_text('{"r": 8}')
    (root / "tokenizer.model").write_bytes(b"spm" * 300)
    return root


def digest(path, algorithm="sha256"):
    return hashlib.new(algorithm, path.read_bytes()).hexdigest()


def test_create_prints_manifest_relative_to_cwd(cli, release, monkeypatch):
    monkeypatch.chdir(release)
    result = cli("checksum", "create", "lora", "tokenizer.model")
    assert result.exit_code == 0
    assert result.stdout.splitlines() == [
        f"{digest(release / 'lora/adapter_config.json')}  lora/adapter_config.json",
        f"{digest(release / 'lora/adapter_model.bin')}  lora/adapter_model.bin",
        f"{digest(release / 'tokenizer.model')}  tokenizer.model",
    ]


def test_create_then_verify_round_trip_with_json(cli, release):
    manifest = release / "SHA256SUMS"
    created = cli("checksum", "create", release, "-o", manifest, "--json", "--jobs", "2")
    assert created.exit_code == 0
    document = json.loads(created.stdout)
    assert document["algorithm"] == "sha256" and len(document["files"]) == 3
    verified = cli("checksum", "verify", manifest, "--json")
    assert verified.exit_code == 0
    report = json.loads(verified.stdout)
    assert (report["ok"], report["failed"], report["missing"], report["passed"]) == (3, 0, 0, True)


@pytest.mark.parametrize("algorithm", ["md5", "sha1", "blake2b"])
def test_other_algorithms_are_detected_from_digest_length(cli, release, algorithm):
    manifest = release / "SUMS"
    assert cli("checksum", "create", release, "-o", manifest, "--algo", algorithm).exit_code == 0
    result = cli("checksum", "verify", manifest, "--json")
    assert result.exit_code == 0
    assert {f["algorithm"] for f in json.loads(result.stdout)["files"]} == {algorithm}


def test_existing_manifest_needs_force(cli, release):
    manifest = release / "SUMS"
    manifest.write_text("keep")
    result = cli("checksum", "create", release / "tokenizer.model", "-o", manifest)
    assert result.exit_code == 2 and "--force" in result.stderr
    assert manifest.read_text() == "keep"
    assert cli("checksum", "create", release / "tokenizer.model", "-o", manifest, "--force").exit_code == 0
    assert manifest.read_text().endswith("  tokenizer.model\n")


def test_flipped_byte_missing_file_and_malformed_line(cli, release):
    weights = release / "lora" / "adapter_model.bin"
    manifest = release / "SHA256SUMS"
    manifest.write_text(
        f"{digest(weights)}  lora/adapter_model.bin\n"
        f"{digest(release / 'tokenizer.model')}  tokenizer.model\n"
        "this line is broken\n"
        f"{'0' * 64}  lora/missing.safetensors\n"
    )
    data = bytearray(weights.read_bytes())
    data[100] ^= 0x01
    weights.write_bytes(bytes(data))
    result = cli("checksum", "verify", manifest)
    assert result.exit_code == 1
    assert "1 OK, 1 FAILED, 1 MISSING, 1 malformed lines skipped" in result.stdout
    assert ":3: skipped malformed line" in result.stderr
    report = json.loads(cli("checksum", "verify", manifest, "--json").stdout)
    assert {f["path"]: f["status"] for f in report["files"]} == {
        "lora/adapter_model.bin": "FAILED",
        "tokenizer.model": "OK",
        "lora/missing.safetensors": "MISSING",
    }
    assert report["malformed"][0]["line"] == 3


def test_verify_bsd_format(cli, release):
    manifest = release / "CHECKSUMS"
    manifest.write_text(f"SHA256 (tokenizer.model) = {digest(release / 'tokenizer.model')}\nMD5 (lora/adapter_config.json) = {digest(release / 'lora/adapter_config.json', 'md5')}\n")
    result = cli("checksum", "verify", manifest, "--json")
    assert result.exit_code == 0 and json.loads(result.stdout)["formats"] == ["bsd"]


def test_verify_published_sha256_markdown_with_root(cli, release, tmp_path):
    manifest = tmp_path / "SHA256.md"
    manifest.write_text(
        "# SHA256\n\nPlease check the following values.\n\n"
        "| LoRA file | SHA256 |\n| --- | --- |\n"
        f"| lora/adapter_model.bin | {digest(release / 'lora/adapter_model.bin')} |\n"
        f"| tokenizer.model | {digest(release / 'tokenizer.model')} |\n"
        "| not-released.bin | - |\n\nIn Linux, run `sha256sum your-model-file`.\n"
    )
    result = cli("checksum", "verify", manifest, "--root", release, "--json")
    assert result.exit_code == 0
    report = json.loads(result.stdout)
    assert report["ok"] == 2 and report["formats"] == ["markdown"] and report["malformed"] == []


def test_verify_plain_md5_list(cli, release):
    manifest = release / "md5sum.txt"
    manifest.write_text(f"{digest(release / 'tokenizer.model', 'md5')}  tokenizer.model\n{digest(release / 'lora/adapter_model.bin', 'md5')} lora/adapter_model.bin\n")
    result = cli("checksum", "verify", manifest, "--json")
    assert result.exit_code == 0
    assert json.loads(result.stdout)["formats"] == ["md5-list"]


def test_verify_reads_stdin(cli, release, monkeypatch):
    import io

    monkeypatch.chdir(release)
    monkeypatch.setattr("sys.stdin", io.StringIO(f"{digest(release / 'tokenizer.model')}  tokenizer.model\n"))
    assert cli("checksum", "verify", "-").exit_code == 0


def test_bad_manifests_exit_2_with_one_line(cli, tmp_path):
    empty = tmp_path / "empty.txt"
    empty.write_text("")
    for target, expected in [(empty, "empty"), (tmp_path / "absent", "does not exist"), (tmp_path, "directory")]:
        result = cli("checksum", "verify", target)
        assert result.exit_code == 2, target
        assert expected in result.stderr and len(result.stderr.strip().splitlines()) == 1
    junk = tmp_path / "junk.txt"
    junk.write_text("not\na manifest\n")
    result = cli("checksum", "verify", junk)
    assert result.exit_code == 2 and "malformed lines: 1, 2" in result.stderr


def test_json_output_is_a_single_document_even_on_failure(cli, release):
    manifest = release / "SUMS"
    manifest.write_text(f"{'1' * 64}  tokenizer.model\n")
    result = cli("checksum", "verify", manifest, "--json")
    assert result.exit_code == 1
    assert json.loads(result.stdout)["failed"] == 1


def test_create_missing_input_is_usage_error(cli, tmp_path):
    result = cli("checksum", "create", tmp_path / "nope", "-o", tmp_path / "SUMS")
    assert result.exit_code == 2 and "no such file" in result.stderr
    assert not (tmp_path / "SUMS").exists()
