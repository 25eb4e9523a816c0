"""GGUF: conversion from Hugging Face checkpoints (gguf.GGUFWriter) and quantization (llama.cpp's own quantizer)."""

from pathlib import Path

GGUF_MAGIC = b"GGUF"


def is_gguf(path: Path) -> bool:
    """Whether ``path`` is a file that starts with the GGUF magic (cheap: reads four bytes)."""
    try:
        with open(path, "rb") as handle:
            return handle.read(4) == GGUF_MAGIC
    except OSError:
        return False
