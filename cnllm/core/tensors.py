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
from typing import IO, TYPE_CHECKING, Iterator

from cnllm.core.errors import UsageError

if TYPE_CHECKING:
    import torch

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


class ShardSize(str):
    """A ``--max-shard-size`` (``500MB``, ``2GB``, ``4GiB``), checked where it is made: every command that writes
    safetensors shards takes this one type (an options field coerces to it), so the words and the check live here."""

    def __new__(cls, text: str | int, *, where: str = "--max-shard-size") -> "ShardSize":
        try:
            size = parse_size(text if isinstance(text, int) else str(text))
        except UsageError as exc:
            raise UsageError(f"{where}: {exc.message}") from None
        if size < 1:
            raise UsageError(f"{where} must be at least 1 byte, got {text!r}")
        return super().__new__(cls, str(text).strip())

    @property
    def bytes(self) -> int:
        return parse_size(str(self))


DEFAULT_SHARD_SIZE = ShardSize("2GB")


def human_bytes(count: float) -> str:
    """``1536`` → ``"1.5 KiB"``: sizes in messages and tables."""
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if abs(count) < 1024 or unit == "TiB":
            return f"{count:.0f} {unit}" if unit == "B" else f"{count:.1f} {unit}"
        count /= 1024
    return f"{count:.1f} TiB"


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
    except RecursionError:
        raise UsageError(f"{path} is corrupted: its safetensors header is nested too deeply") from None
    except OSError as exc:
        raise UsageError(f"cannot read {path}: {exc.strerror}") from exc
    if not isinstance(header, dict):
        raise UsageError(f"{path} is corrupted: bad safetensors header")
    for name, meta in header.items():
        if name != "__metadata__":
            _check_header_entry(path, name, meta)
    end = _check_data_layout(path, header)
    if 8 + length + end > size:
        raise UsageError(f"{path} is truncated: {size} bytes, the header describes {8 + length + end}")
    if 8 + length + end < size:
        raise UsageError(f"{path} is corrupted: {size - 8 - length - end} bytes after the last tensor's data_offsets")
    return header


def _check_data_layout(path: Path, header: dict) -> int:
    """The tensors' data, as safetensors itself checks it: in file order each tensor starts where the previous
    one ended (no overlap, no gap), from 0. Returns where the data ends."""
    entries = sorted(((meta["data_offsets"], name) for name, meta in header.items() if name != "__metadata__"))
    end, previous = 0, None
    for (start, stop), name in entries:
        if start != end:
            where = f"overlap those of {previous}" if start < end else f"leave a gap of {start - end} bytes after {previous or 'the header'}"
            raise UsageError(f"{path} is corrupted: the data_offsets of tensor {name} {where}")
        end, previous = stop, name
    return end


# Every dtype the safetensors format defines, in bits per element (its own size check: elements × size == bytes).
SAFETENSORS_DTYPE_BITS = {
    "BOOL": 8, "U8": 8, "I8": 8, "F8_E5M2": 8, "F8_E4M3": 8, "F8_E8M0": 8, "F4": 4, "F6_E2M3": 6, "F6_E3M2": 6,
    "I16": 16, "U16": 16, "F16": 16, "BF16": 16, "I32": 32, "U32": 32, "F32": 32, "C64": 64, "I64": 64, "U64": 64, "F64": 64,
}


def _is_count(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value >= 0


def _check_header_entry(path: Path, name: str, meta) -> None:
    """One tensor's header entry: ``dtype`` a string, ``shape`` a list of sizes, ``data_offsets`` [start, end]."""
    problem = None
    if not isinstance(meta, dict):
        problem = "an entry that is not a mapping"
    elif not isinstance(meta.get("dtype"), str):
        problem = "no dtype"
    elif not isinstance(meta.get("shape"), list) or not all(_is_count(s) for s in meta["shape"]):
        problem = "no valid shape"
    else:
        offsets = meta.get("data_offsets")
        if not isinstance(offsets, list) or len(offsets) != 2 or not all(_is_count(o) for o in offsets) or offsets[0] > offsets[1]:
            problem = "no valid data_offsets [start, end]"
        elif meta["dtype"] not in SAFETENSORS_DTYPE_BITS:
            problem = f"an unknown dtype {meta['dtype']!r}"
        else:
            bits = _numel(meta["shape"]) * SAFETENSORS_DTYPE_BITS[meta["dtype"]]
            if (offsets[1] - offsets[0]) * 8 != bits:
                takes = f"{bits // 8} bytes" if bits % 8 == 0 else f"{bits} bits"
                problem = f"{offsets[1] - offsets[0]} bytes of data where {meta['dtype']} of shape {meta['shape']} takes {takes}: the dtype or shape is wrong"
    if problem:
        raise UsageError(f"{path} is corrupted: tensor {name} has {problem} in the safetensors header")


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


def iter_tensors(model: Path | str) -> Iterator[tuple[str, "torch.Tensor"]]:
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


SAFETENSORS_TORCH_DTYPES = {
    "F64": "float64", "F32": "float32", "F16": "float16", "BF16": "bfloat16",
    "I64": "int64", "I32": "int32", "I16": "int16", "I8": "int8", "U8": "uint8", "BOOL": "bool",
}


def stream_tensors(model: Path | str) -> Iterator[tuple[str, "torch.Tensor"]]:
    """Like :func:`iter_tensors`, but safetensors are read with plain reads in file order instead of mmap.

    A memory map keeps every page it has touched resident (and counted in the process's RSS)
    until the file is closed, so a 10 GB shard read through ``safe_open`` can look like 10 GB of
    memory; reading each tensor into its own buffer keeps memory at one tensor.
    """
    for path in checkpoint_files(model):
        if path.suffix != ".safetensors":
            state = load_pickled_tensors(path)
            for name in list(state):
                yield name, state.pop(name)
            del state
            continue
        header = read_safetensors_header(path)
        with open(path, "rb", buffering=0) as handle:
            entries = sorted(((k, v) for k, v in header.items() if k != "__metadata__"), key=lambda item: item[1]["data_offsets"][0])
            for name, meta in entries:
                yield name, _read_safetensor(handle, path, name, meta)


def _read_safetensor(handle, path: Path, name: str, meta: dict, rows: tuple[int, int] | None = None):
    """One tensor of an open safetensors file (or rows ``[first, stop)`` of it), read into a fresh buffer."""
    import torch

    if meta["dtype"] not in SAFETENSORS_TORCH_DTYPES:
        raise UsageError(f"{path}: tensor {name} has an unsupported dtype {meta['dtype']}")
    start, end = meta["data_offsets"]  # checked against the dtype and shape by read_safetensors_header
    dtype = getattr(torch, SAFETENSORS_TORCH_DTYPES[meta["dtype"]])
    shape = list(meta["shape"])
    if rows is not None:
        row_bytes = (end - start) // shape[0] if shape[0] else 0
        start, end = start + rows[0] * row_bytes, start + rows[1] * row_bytes
        shape[0] = rows[1] - rows[0]
    tensor = torch.empty(shape, dtype=dtype)
    if end > start:
        handle.seek(0)
        (length,) = struct.unpack("<Q", handle.read(8))
        handle.seek(8 + length + start)
        buffer = memoryview(tensor.reshape(-1).view(torch.uint8).numpy())  # type: ignore[arg-type]  # numpy's stubs give ndarray __buffer__ on Python 3.12+ only
        while buffer:
            read = handle.readinto(buffer)
            if not read:
                raise UsageError(f"{path} is truncated while reading {name}")
            buffer = buffer[read:]
    return tensor


class ShardWriter:
    """Write tensors into ``model-0000i-of-0000N.safetensors`` shards of at most ``max_shard_size`` bytes.

    Tensors are buffered only up to one shard; ``close()`` names the shards and writes the index
    (a single shard is written as ``model.safetensors`` with no index, as transformers does).
    """

    def __init__(self, directory: Path, *, max_shard_size: int | str = DEFAULT_SHARD_SIZE, prefix: str = "model", metadata: dict | None = None):
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


SAFETENSORS_DTYPES = {
    "torch.float64": "F64",
    "torch.float32": "F32",
    "torch.float16": "F16",
    "torch.bfloat16": "BF16",
    "torch.int64": "I64",
    "torch.int32": "I32",
    "torch.int16": "I16",
    "torch.int8": "I8",
    "torch.uint8": "U8",
    "torch.bool": "BOOL",
}


def shard_names(count: int, prefix: str = "model") -> list[str]:
    """File names transformers gives ``count`` safetensors shards."""
    if count == 1:
        return [f"{prefix}.safetensors"]
    return [f"{prefix}-{number:05d}-of-{count:05d}.safetensors" for number in range(1, count + 1)]


class StreamingShardWriter:
    """Write safetensors shards whose layout is known in advance, each tensor straight to disk.

    :class:`ShardWriter` buffers a whole shard (up to ``max_shard_size``) because a safetensors
    header must list every tensor before the data. When the names, shapes and dtypes are known
    up front (merging, diff recovery), the headers are written first and each tensor is written
    at its offset as soon as it is computed, in any order, so memory holds one tensor at a time.
    """

    def __init__(
        self,
        directory: Path,
        layout: list[tuple[str, tuple[int, ...], "torch.dtype"]],
        *,
        max_shard_size: int | str = DEFAULT_SHARD_SIZE,
        prefix: str = "model",
        metadata: dict | None = None,
    ):
        self.directory = Path(directory)
        limit = parse_size(max_shard_size)
        groups: list[list[tuple[str, tuple[int, ...], torch.dtype, int]]] = [[]]
        pending = 0
        for name, shape, dtype in layout:
            nbytes = _numel(shape) * _element_size(dtype)
            if groups[-1] and pending + nbytes > limit:
                groups.append([])
                pending = 0
            groups[-1].append((name, tuple(shape), dtype, nbytes))
            pending += nbytes
        self.files = [self.directory / name for name in shard_names(len(groups), prefix)]
        self.total_size = sum(entry[3] for group in groups for entry in group)
        self._slots: dict[str, tuple[int, int, tuple[int, ...], torch.dtype]] = {}
        self._handles: dict[int, object] = {}
        self._rows_written: dict[str, int] = {}
        self._headers: list[bytes] = []
        meta = {"format": "pt", **(metadata or {})}
        for number, group in enumerate(groups):
            header: dict = {"__metadata__": meta}
            offset = 0
            for name, shape, dtype, nbytes in group:
                header[name] = {"dtype": SAFETENSORS_DTYPES[str(dtype)], "shape": list(shape), "data_offsets": [offset, offset + nbytes]}
                offset += nbytes
            encoded = json.dumps(header, separators=(",", ":")).encode("utf-8")
            encoded += b" " * (-len(encoded) % 8)
            data_start = 8 + len(encoded)
            for name, shape, dtype, _nbytes in group:
                self._slots[name] = (number, data_start + header[name]["data_offsets"][0], shape, dtype)
            self._headers.append(struct.pack("<Q", len(encoded)) + encoded)
        self._group_names = [[entry[0] for entry in group] for group in groups]

    def _handle(self, number: int):
        if number not in self._handles:
            handle = open(self.files[number], "wb")
            handle.write(self._headers[number])
            self._handles[number] = handle
        return self._handles[number]

    def add(self, name: str, tensor) -> None:
        """Write one planned tensor (its shape and dtype must match the layout)."""
        if name in self._slots and tuple(tensor.shape) != self._slots[name][2]:
            raise ValueError(f"tensor {name} is {tuple(tensor.shape)} {tensor.dtype}, the layout says {self._slots[name][2]} {self._slots[name][3]}")
        self.add_rows(name, 0, tensor)

    def add_rows(self, name: str, first: int, block) -> None:
        """Write rows ``first…`` of a planned tensor (each row once), so a huge tensor can be produced a block at a time."""
        import torch

        if name not in self._slots:
            raise ValueError(f"tensor {name} is not in the planned layout")
        number, offset, shape, dtype = self._slots[name]
        rows = shape[0] if shape else 1
        block_shape = tuple(block.shape) if shape else (1,)
        if block.dtype != dtype or tuple(block.shape[1:]) != shape[1:] or first + block_shape[0] > rows:
            raise ValueError(f"rows {first}… of {name} are {tuple(block.shape)} {block.dtype}, the layout says {shape} {dtype}")
        row_bytes = _numel(shape[1:]) * _element_size(dtype)
        handle = self._handle(number)
        handle.seek(offset + first * row_bytes)
        data = block.detach().contiguous().reshape(-1)
        if data.numel():
            handle.write(memoryview(data.view(torch.uint8).numpy()))
        self._rows_written[name] = self._rows_written.get(name, 0) + block_shape[0]

    def close(self) -> list[Path]:
        """Close the shards (and write the index when there are several); every planned tensor must be written."""
        missing = [name for name, slot in self._slots.items() if self._rows_written.get(name, 0) < (slot[2][0] if slot[2] else 1)]
        for number in range(len(self.files)):
            self._handle(number).close()
        if missing:
            raise ValueError(f"{len(missing)} planned tensors were never written (first: {missing[0]})")
        if len(self.files) > 1:
            weight_map = {name: path.name for path, names in zip(self.files, self._group_names) for name in names}
            index = {"metadata": {"total_size": self.total_size}, "weight_map": dict(sorted(weight_map.items()))}
            prefix = self.files[0].name.split("-00001-of-")[0]
            (self.directory / f"{prefix}.safetensors.index.json").write_text(json.dumps(index, indent=2) + "\n", encoding="utf-8")
        return list(self.files)


def _numel(shape: tuple[int, ...]) -> int:
    count = 1
    for size in shape:
        count *= size
    return count


def _element_size(dtype) -> int:
    import torch

    return torch.empty((), dtype=dtype).element_size()


class TensorReader:
    """Random access to a checkpoint's tensors by name, one tensor in memory at a time.

    Safetensors are read with plain reads (see :func:`stream_tensors`); pickled shards are loaded
    with ``weights_only`` (memory-mapped where the format allows), one shard at a time, so reading
    in checkpoint order holds one shard.
    """

    def __init__(self, model: Path | str):
        self.model = Path(model)
        self.infos = tensor_infos(model)
        self._open: dict[Path, tuple[IO[bytes] | None, dict]] = {}  # safetensors: (handle, header); pickles: (None, tensors)

    def __contains__(self, name: str) -> bool:
        return name in self.infos

    def get(self, name: str):
        path = self.infos[name].file
        if path not in self._open:
            if path.suffix == ".safetensors":
                self._open_safetensors(path)
            else:
                # one pickled shard at a time: old-format pickles cannot be memory-mapped
                for other in [p for p, (handle, _) in self._open.items() if handle is None]:
                    del self._open[other]
                self._open[path] = (None, load_pickled_tensors(path))
        handle, source = self._open[path]
        return source[name] if handle is None else _read_safetensor(handle, path, name, source[name])

    def get_rows(self, name: str, first: int, stop: int):
        """Rows ``[first, stop)`` of a tensor (its first dimension), reading only those bytes from safetensors."""
        path = self.infos[name].file
        if path.suffix != ".safetensors":
            return self.get(name)[first:stop]
        self._open_safetensors(path)
        handle, header = self._open[path]
        return _read_safetensor(handle, path, name, header[name], rows=(first, stop))

    def _open_safetensors(self, path: Path) -> None:
        if path not in self._open:
            self._open[path] = (open(path, "rb", buffering=0), read_safetensors_header(path))

    def close(self) -> None:
        for handle, _ in self._open.values():
            if handle is not None:
                handle.close()
        self._open.clear()

    def __enter__(self) -> "TensorReader":
        return self

    def __exit__(self, *exc) -> None:
        self.close()
