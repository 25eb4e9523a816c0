import hashlib
import json

from cnllm.core.provenance import read_record, write_record


def test_record_holds_inputs_with_sha256_and_options(tmp_path):
    data = tmp_path / "data.txt"
    data.write_text("你好\n")
    folder = tmp_path / "in"
    folder.mkdir()
    (folder / "w.bin").write_bytes(b"\x01\x02")
    out = tmp_path / "out"
    out.mkdir()
    path = write_record(out, "test", inputs=[data, folder], options={"rank": 8, "path": tmp_path}, results={"loss": 1.5})
    assert path.name == "cnllm-test.json"
    record = read_record(out, "test")
    assert record["inputs"][0]["sha256"] == hashlib.sha256("你好\n".encode()).hexdigest()
    assert record["inputs"][1]["files"] == [{"path": "w.bin", "size": 2, "sha256": hashlib.sha256(b"\x01\x02").hexdigest()}]
    assert record["options"] == {"rank": 8, "path": str(tmp_path)}
    assert record["results"]["loss"] == 1.5
    assert "cnllm_version" in record and "torch" in record["packages"]
    json.dumps(record)


def test_finish_output_folder_records_then_sums_everything(tmp_path):
    from cnllm.core.hashing import verify_manifest
    from cnllm.core.provenance import finish_output_folder

    out = tmp_path / "out"
    out.mkdir()
    (out / "model.safetensors").write_bytes(b"\x00" * 10)
    results = {"output": str(out), "files": [], "total_bytes": 0, "seconds": 1.0, "tensors": 3}
    files, total = finish_output_folder(out, "merge", inputs=[], options={"dtype": "fp16"}, results=results)
    assert files == ["cnllm-merge.json", "model.safetensors", "SHA256SUMS"]
    assert total == sum((out / name).stat().st_size for name in files[:-1])
    assert read_record(out, "merge")["results"] == {"tensors": 3}  # what finishing measures is not known inside the record
    assert verify_manifest(out / "SHA256SUMS").passed
