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
