"""StreamingShardWriter (planned layout, tensors written in any order) and TensorReader (random access by name)."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file

from cnllm.core.tensors import StreamingShardWriter, TensorReader, iter_tensors


def _layout(tensors):
    return [(name, tuple(t.shape), t.dtype) for name, t in tensors.items()]


def test_writes_planned_shards_in_any_order(tmp_path):
    tensors = {
        "a": torch.randn(100, 10),
        "b": torch.randn(50).to(torch.bfloat16),
        "c": torch.arange(7),
        "d": torch.randn(3, 3).half(),
        "e": torch.zeros(0, 4),
        "f": torch.tensor(2.5),
    }
    writer = StreamingShardWriter(tmp_path, _layout(tensors), max_shard_size=1000)
    for name in reversed(list(tensors)):
        writer.add(name, tensors[name])
    files = writer.close()
    assert [f.name for f in files] == ["model-00001-of-00002.safetensors", "model-00002-of-00002.safetensors"]
    index = json.loads((tmp_path / "model.safetensors.index.json").read_text())
    assert index["weight_map"]["a"] == files[0].name and index["weight_map"]["f"] == files[1].name and index["metadata"]["total_size"] == 4000 + 100 + 56 + 18 + 0 + 4
    loaded = {}
    for path in files:
        loaded.update(load_file(str(path)))
    assert loaded.keys() == tensors.keys()
    assert all(torch.equal(loaded[n], tensors[n]) and loaded[n].dtype == tensors[n].dtype for n in tensors)
    assert {n for n, _ in iter_tensors(tmp_path)} == set(tensors)


def test_single_shard_and_layout_checks(tmp_path):
    tensors = {"x": torch.ones(4), "y": torch.ones(2, 2)}
    writer = StreamingShardWriter(tmp_path, _layout(tensors))
    with pytest.raises(ValueError, match="layout says"):
        writer.add("x", torch.ones(5))
    with pytest.raises(ValueError, match="not in the planned layout"):
        writer.add("z", torch.ones(4))
    writer.add("x", tensors["x"])
    with pytest.raises(ValueError, match="never written"):
        writer.close()
    writer = StreamingShardWriter(tmp_path, _layout(tensors))
    for name, tensor in tensors.items():
        writer.add(name, tensor)
    assert [p.name for p in writer.close()] == ["model.safetensors"]
    assert not (tmp_path / "model.safetensors.index.json").exists()


@pytest.mark.parametrize("suffix", ["safetensors", "bin"])
def test_reader_fetches_by_name(tmp_path, suffix):
    from safetensors.torch import save_file

    first, second = {"a": torch.randn(3)}, {"b": torch.randn(2, 2)}
    names = [f"model-0000{i}-of-00002.{suffix}" for i in (1, 2)]
    for name, state in zip(names, (first, second)):
        save_file(state, str(tmp_path / name)) if suffix == "safetensors" else torch.save(state, tmp_path / name)
    index = "model.safetensors.index.json" if suffix == "safetensors" else "pytorch_model.bin.index.json"
    (tmp_path / index).write_text(json.dumps({"weight_map": {"a": names[0], "b": names[1]}}))
    with TensorReader(tmp_path) as reader:
        assert "b" in reader and "c" not in reader
        assert torch.equal(reader.get("b"), second["b"]) and torch.equal(reader.get("a"), first["a"])
