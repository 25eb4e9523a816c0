"""A GGUF's metadata and tensor table, read and checked before llama.cpp (or the gguf package) sees the file.

llama.cpp trusts the header: a ``block_count`` of 100,000 over a two-layer file aborts the process (SIGABRT, no
message), a ``head_count`` of 0 divides by zero, a bos id past the vocabulary indexes out of it. :func:`check_gguf`
reads the header with bounded memory — every count is checked against the bytes left before anything is
allocated for it, arrays are skipped, not built — and refuses such a file with one line naming the key.
Every GGUF that chat, eval, serve, quantize and gguf-to-hf open passes through it.
"""

from __future__ import annotations

import mmap
import re
import struct
from dataclasses import dataclass, field
from pathlib import Path

from cnllm.core.errors import UsageError

# GGUF value types: struct formats of the fixed-size ones; 8 is a string, 9 an array.
SCALAR_FORMATS = {0: "<B", 1: "<b", 2: "<H", 3: "<h", 4: "<I", 5: "<i", 6: "<f", 7: "<?", 10: "<Q", 11: "<q", 12: "<d"}
STRING, ARRAY = 8, 9
DEFAULT_ALIGNMENT = 32
MAX_DIMENSIONS = 4  # ggml tensors have at most four
# The longest trained context a GGUF may declare (16M tokens; LLaMA-family models train for at most 128K).
MAX_CONTEXT_LENGTH = 1 << 24
SPECIAL_TOKEN_KEYS = ("bos", "eos", "unknown", "padding", "separator", "eot", "eom")
BLOCK_TENSOR = re.compile(r"^blk\.(\d+)\.")


@dataclass(frozen=True)
class GgufArray:
    """An array value, not read: its element type and length."""

    type: int
    length: int


@dataclass(frozen=True)
class GgufTensor:
    name: str
    shape: tuple[int, ...]
    type: int
    offset: int  # from the start of the data section


@dataclass
class GgufHeader:
    version: int
    metadata: dict[str, object] = field(default_factory=dict)  # scalars and strings; arrays as GgufArray
    tensors: list[GgufTensor] = field(default_factory=list)
    data_start: int = 0


class _Cursor:
    """Reads little-endian values from a buffer, refusing any read past its end."""

    def __init__(self, buffer, path: Path):
        self.buffer, self.path, self.at = buffer, path, 0

    def left(self) -> int:
        return len(self.buffer) - self.at

    def unpack(self, fmt: str):
        size = struct.calcsize(fmt)
        if size > self.left():
            raise UsageError(f"{self.path} is truncated: its GGUF header ends early")
        (value,) = struct.unpack_from(fmt, self.buffer, self.at)
        self.at += size
        return value

    def count(self, what: str, item_bytes: int) -> int:
        """A u64 count of items at least ``item_bytes`` each, refused when the rest of the file cannot hold them."""
        value = self.unpack("<Q")
        if value * item_bytes > self.left():
            raise UsageError(f"{self.path} is corrupted: its GGUF header declares {value:,} {what}, more than the file can hold")
        return value

    def skip(self, size: int) -> None:
        if size > self.left():
            raise UsageError(f"{self.path} is truncated: its GGUF header ends early")
        self.at += size

    def string(self) -> str:
        length = self.count("bytes in a string", 1)
        raw = bytes(self.buffer[self.at : self.at + length])
        self.at += length
        return raw.decode("utf-8", errors="replace")

    def value(self, kind: int) -> object:
        if kind in SCALAR_FORMATS:
            return self.unpack(SCALAR_FORMATS[kind])
        if kind == STRING:
            return self.string()
        if kind == ARRAY:
            item = self.unpack("<I")
            if item == STRING:
                length = self.count("array elements", 8)
                for _ in range(length):
                    self.skip(self.count("bytes in a string", 1))
            elif item in SCALAR_FORMATS:
                size = struct.calcsize(SCALAR_FORMATS[item])
                length = self.count("array elements", size)
                self.skip(length * size)
            else:
                raise UsageError(f"{self.path} is corrupted: an array of unknown GGUF type {item}")
            return GgufArray(item, length)
        raise UsageError(f"{self.path} is corrupted: unknown GGUF value type {kind}")


def read_gguf_header(path: Path) -> GgufHeader:
    """The metadata (arrays left unread) and tensor table of the GGUF at ``path``."""
    path = Path(path)
    try:
        with open(path, "rb") as handle, mmap.mmap(handle.fileno(), 0, access=mmap.ACCESS_READ) as buffer:
            return _parse(_Cursor(buffer, path))
    except ValueError:  # mmap of an empty file
        raise UsageError(f"{path} is not a GGUF file (it is empty)") from None
    except OSError as exc:
        raise UsageError(f"cannot read {path}: {exc.strerror or exc}") from None


def _parse(cursor: _Cursor) -> GgufHeader:
    path = cursor.path
    if bytes(cursor.buffer[:4]) != b"GGUF":
        raise UsageError(f"{path} is not a GGUF file (no GGUF magic)")
    cursor.skip(4)
    version = cursor.unpack("<I")
    if version not in (2, 3):
        raise UsageError(f"{path}: GGUF version {version} is not supported (2 and 3 are)")
    tensor_count = cursor.count("tensors", 8 + 4 + 8 + 4 + 8)
    kv_count = cursor.count("metadata keys", 8 + 4 + 1)
    header = GgufHeader(version)
    for _ in range(kv_count):
        key = cursor.string()
        header.metadata[key] = cursor.value(cursor.unpack("<I"))
    for _ in range(tensor_count):
        name = cursor.string()
        dims = cursor.unpack("<I")
        if dims > MAX_DIMENSIONS:
            raise UsageError(f"{path} is corrupted: tensor {name} has {dims} dimensions")
        shape = tuple(cursor.unpack("<Q") for _ in range(dims))
        header.tensors.append(GgufTensor(name, shape, cursor.unpack("<I"), cursor.unpack("<Q")))
    alignment = header.metadata.get("general.alignment", DEFAULT_ALIGNMENT)
    if not isinstance(alignment, int) or alignment < 1 or alignment & (alignment - 1):
        raise UsageError(f"{path}: general.alignment must be a power of two, not {alignment!r}")
    header.data_start = -(-cursor.at // alignment) * alignment
    return header


def _integer(header: GgufHeader, key: str, path: Path) -> int | None:
    value = header.metadata.get(key)
    if value is None or isinstance(value, GgufArray):
        return None
    if not isinstance(value, int) or isinstance(value, bool):
        raise UsageError(f"{path}: {key} must be an integer, not {value!r}")
    return value


def check_header(header: GgufHeader, path: Path, size: int) -> None:
    """Refuse metadata that disagrees with the tensors or with itself, and tensors that end past the file
    (a file without tensors, llama.cpp's vocabulary-only GGUFs, has no layers to count)."""
    import gguf

    architecture = header.metadata.get("general.architecture")
    if not isinstance(architecture, str) or not architecture:
        raise UsageError(f"{path}: the GGUF does not say its architecture (general.architecture)")
    blocks = {int(m.group(1)) for t in header.tensors if (m := BLOCK_TENSOR.match(t.name))}
    block_count = _integer(header, f"{architecture}.block_count", path)
    if block_count is not None and header.tensors and (block_count != len(blocks) or (blocks and max(blocks) >= block_count)):
        held = f"tensors for {len(blocks)} (blk.0 … blk.{max(blocks)})" if blocks else "no layer tensors (blk.N)"
        raise UsageError(f"{path}: {architecture}.block_count says {block_count:,} layers but the file holds {held}")
    for key in ("attention.head_count", "attention.head_count_kv", "embedding_length"):
        value = _integer(header, f"{architecture}.{key}", path)
        if value is not None and value < 1:
            raise UsageError(f"{path}: {architecture}.{key} must be at least 1, not {value}")
    context = _integer(header, f"{architecture}.context_length", path)
    if context is not None and not 1 <= context <= MAX_CONTEXT_LENGTH:
        raise UsageError(f"{path}: {architecture}.context_length {context:,} is not a context length (1 … {MAX_CONTEXT_LENGTH:,} tokens)")
    file_type = _integer(header, "general.file_type", path)
    if file_type is not None and file_type not in {int(t) for t in gguf.LlamaFileType}:
        raise UsageError(f"{path}: general.file_type {file_type} is not a llama.cpp file type")
    tokens = header.metadata.get("tokenizer.ggml.tokens")
    vocabulary = tokens.length if isinstance(tokens, GgufArray) else None
    for name in SPECIAL_TOKEN_KEYS:
        key = f"tokenizer.ggml.{name}_token_id"
        token = _integer(header, key, path)
        if token is not None and vocabulary is not None and not (0 <= token < vocabulary or token in (-1, 0xFFFFFFFF)):
            raise UsageError(f"{path}: {key} {token:,} is not in its vocabulary of {vocabulary:,} tokens")
    for tensor in header.tensors:
        try:
            block, type_bytes = gguf.GGML_QUANT_SIZES[gguf.GGMLQuantizationType(tensor.type)]
        except (ValueError, KeyError):
            raise UsageError(f"{path} is corrupted: tensor {tensor.name} has unknown ggml type {tensor.type}") from None
        elements = 1
        for dim in tensor.shape:
            elements *= dim
        end = header.data_start + tensor.offset + elements // block * type_bytes
        if end > size:
            raise UsageError(f"{path} is truncated: tensor {tensor.name} ends at byte {end:,}, the file has {size:,}")


_PASSED: set[tuple[str, int, int]] = set()  # (real path, size, mtime) of the files that passed


def check_gguf(path: Path | str) -> None:
    """Refuse a GGUF whose header llama.cpp would abort on or trust into unbounded memory (one line, the key named);
    a file that passed is not read again until it changes (chat reads the header, then loads the model)."""
    path = Path(path)
    try:
        info = path.stat()
    except OSError as exc:
        raise UsageError(f"cannot read {path}: {exc.strerror or exc}") from None
    key = (str(path.resolve()), info.st_size, info.st_mtime_ns)
    if key not in _PASSED:
        check_header(read_gguf_header(path), path, info.st_size)
        _PASSED.add(key)
