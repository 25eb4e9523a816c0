"""Checkpoint tensors one at a time: read (safetensors first, pickles only as plain tensors) and write shards.

Every command that touches weights (merge-lora, diff-recover, convert-gguf, pt/sft checks) goes
through here, so no command ever holds a whole model it does not need, and no pickle is ever
executed: ``.bin``/``.pth`` files are loaded with ``torch.load(weights_only=True)``.
"""

from __future__ import annotations

import json
import re
import struct
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

from cnllm.core.errors import UsageError

SAFETENSORS_INDEX = "model.safetensors.index.json"
BIN_INDEX = "pytorch_model.bin.index.json"
_SIZE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*([KMGT]?I?B?)\s*$", re.IGNORECASE)
_UNITS = {"": 1, "B": 1, "KB": 10**3, "MB": 10**6, "GB": 10**9, "TB": 10**12, "KIB": 2**10, "MIB": 2**20, "GIB": 2**30, "TIB": 2**40}


def parse_size(text: str | int) -> int:
    """``"2GB"`` → 2_000_000_000 (``GiB`` for powers of two); ints pass through."""
    if isinstance(text, int):
        return text
    match = _SIZE.match(text)
    unit = match.group(2).upper() if match else None
    if not match or unit not in _UNITS:
        raise UsageError(f"cannot read size {text!r}; write e.g. 500MB, 2GB or 4GiB")
    return int(float(match.group(1)) * _UNITS[unit])


@dataclass(frozen=True)
class TensorInfo:
    name: str
    shape: tuple[int, ...]
    dtype: str
    file: Path


def read_safetensors_header(path: Path) -> dict:
    """The JSON header of a safetensors file, checked against the file's size (truncation, corruption)."""
    try:
        size = path.stat().st_size
        with open(path, "rb") as handle:
            prefix = handle.read(8)
            if len(prefix) < 8:
                raise UsageError(f"{path} is not a safetensors file (too short)")
            (length,) = struct.unpack("<Q", prefix)
            if length > min(size - 8, 100 << 20):
                raise UsageError(f"{path} is truncated or not a safetensors file (bad header length)")
            header = json.loads(handle.read(length))
    except (json.JSONDecodeError, UnicodeDecodeError):
        raise UsageError(f"{path} is corrupted: its safetensors header is not valid JSON") from None
    except OSError as exc:
        raise UsageError(f"cannot read {path}: {exc.strerror}") from exc
    if not isinstance(header, dict):
        raise UsageError(f"{path} is corrupted: bad safetensors header")
    end = max((v["data_offsets"][1] for k, v in header.items() if k != "__metadata__"), default=0)
    if 8 + length + end > size:
        raise UsageError(f"{path} is truncated: {size} bytes, the header describes {8 + length + end}")
    return header


def checkpoint_files(model: Path | str) -> list[Path]:
    """The weight files of a model directory (or a single weight file): safetensors preferred."""
    model = Path(model)
    if model.is_file():
        return [model]
    if not model.is_dir():
        raise UsageError(f"model path {model} does not exist")
    for index_name in (SAFETENSORS_INDEX, BIN_INDEX):
        index = model / index_name
        if index.exists():
            try:
                weight_map = json.loads(index.read_text(encoding="utf-8"))["weight_map"]
            except (json.JSONDecodeError, KeyError):
                raise UsageError(f"{index} is not a valid checkpoint index") from None
            files = [model / name for name in dict.fromkeys(weight_map.values())]
            missing = [f.name for f in files if not f.exists()]
            if missing:
                raise UsageError(f"{model} is incomplete: {', '.join(missing)} listed in {index_name} is missing")
            return files
    for pattern in ("*.safetensors", "pytorch_model*.bin", "adapter_model.bin", "consolidated.*.pth", "*.pth"):
        found = sorted(model.glob(pattern))
        if found:
            return found
    raise UsageError(f"{model} holds no weights (no *.safetensors, pytorch_model*.bin or consolidated.*.pth)")


def load_pickled_tensors(path: Path) -> dict:
    """A ``.bin``/``.pth`` state dict, loaded without executing code (``weights_only``, memory-mapped)."""
    import pickle

    import torch

    try:
        try:
            state = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
        except RuntimeError as exc:
            if "mmap" not in str(exc):
                raise
            state = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as exc:
        raise UsageError(
            f"{path} contains objects other than plain tensors; refusing to execute its pickle "
            "(convert it to safetensors with a trusted tool first)"
        ) from exc
    except (RuntimeError, EOFError, OSError) as exc:
        raise UsageError(f"cannot load {path}: truncated or not a PyTorch checkpoint ({str(exc).splitlines()[0]})") from exc
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise UsageError(f"{path} is not a plain state dict of tensors")
    return state


def tensor_infos(model: Path | str) -> dict[str, TensorInfo]:
    """Names, shapes and dtypes of every tensor, reading only safetensors headers where possible."""
    infos: dict[str, TensorInfo] = {}
    for path in checkpoint_files(model):
        if path.suffix == ".safetensors":
            for name, meta in read_safetensors_header(path).items():
                if name != "__metadata__":
                    infos[name] = TensorInfo(name, tuple(meta["shape"]), meta["dtype"], path)
        else:
            for name, tensor in load_pickled_tensors(path).items():
                infos[name] = TensorInfo(name, tuple(tensor.shape), str(tensor.dtype).removeprefix("torch."), path)
    return infos


def iter_tensors(model: Path | str) -> Iterator[tuple[str, "torch.Tensor"]]:  # noqa: F821
    """Yield ``(name, tensor)`` one at a time, one file open at a time."""
    from safetensors import SafetensorError, safe_open

    for path in checkpoint_files(model):
        if path.suffix == ".safetensors":
            read_safetensors_header(path)
            try:
                with safe_open(str(path), framework="pt") as handle:
                    for name in handle.keys():
                        yield name, handle.get_tensor(name)
            except SafetensorError as exc:
                raise UsageError(f"{path} is corrupted: {exc}") from exc
        else:
            state = load_pickled_tensors(path)
            for name in list(state):
                yield name, state.pop(name)
            del state


class ShardWriter:
    """Write tensors into ``model-0000i-of-0000N.safetensors`` shards of at most ``max_shard_size`` bytes.

    Tensors are buffered only up to one shard; ``close()`` names the shards and writes the index
    (a single shard is written as ``model.safetensors`` with no index, as transformers does).
    """

    def __init__(self, directory: Path, *, max_shard_size: int | str = "2GB", prefix: str = "model", metadata: dict | None = None):
        self.directory = Path(directory)
        self.max_bytes = parse_size(max_shard_size)
        self.prefix = prefix
        self.metadata = {"format": "pt", **(metadata or {})}
        self._pending: dict = {}
        self._pending_bytes = 0
        self._shards: list[tuple[Path, list[str]]] = []
        self.total_size = 0

    def add(self, name: str, tensor) -> None:
        nbytes = tensor.numel() * tensor.element_size()
        if self._pending and self._pending_bytes + nbytes > self.max_bytes:
            self._flush()
        self._pending[name] = tensor.contiguous()
        self._pending_bytes += nbytes
        self.total_size += nbytes

    def _flush(self) -> None:
        from safetensors.torch import save_file

        path = self.directory / f".{self.prefix}-shard-{len(self._shards) + 1}.safetensors"
        save_file(self._pending, str(path), metadata=self.metadata)
        self._shards.append((path, list(self._pending)))
        self._pending, self._pending_bytes = {}, 0

    def close(self) -> list[Path]:
        if self._pending or not self._shards:
            self._flush()
        count = len(self._shards)
        final: list[Path] = []
        weight_map: dict[str, str] = {}
        for number, (path, names) in enumerate(self._shards, start=1):
            name = f"{self.prefix}.safetensors" if count == 1 else f"{self.prefix}-{number:05d}-of-{count:05d}.safetensors"
            target = self.directory / name
            path.rename(target)
            final.append(target)
            weight_map.update({tensor: name for tensor in names})
        if count > 1:
            index = {"metadata": {"total_size": self.total_size}, "weight_map": dict(sorted(weight_map.items()))}
            (self.directory / f"{self.prefix}.safetensors.index.json").write_text(json.dumps(index, indent=2) + "\n", encoding="utf-8")
        return final
