"""Helpers shared by the GGUF tests."""

from __future__ import annotations

import shutil
from pathlib import Path


def copy_model(source: Path, target: Path) -> Path:
    """A writable copy of a fixture model directory, for tests that change or break it."""
    shutil.copytree(source, target)
    return target


def gguf_fields(path: Path) -> dict:
    """Every metadata key of a GGUF with its decoded value."""
    from gguf import GGUFReader

    return {f.name: f.contents() for f in GGUFReader(path).fields.values() if not f.name.startswith("GGUF.")}


def gguf_tensors(path: Path) -> dict:
    """Tensor name → (type name, numpy-order shape, data) of a GGUF."""
    from gguf import GGUFReader

    return {t.name: (t.tensor_type.name, tuple(int(d) for d in reversed(t.shape)), t.data) for t in GGUFReader(path).tensors}
