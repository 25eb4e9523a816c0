"""One dtype vocabulary for every command: fp16/float16/half, bf16/bfloat16, fp32/float32/float (fp64 for diffs).

A :class:`DType` is the word the user typed (its string value, echoed back in tables, JSON and
provenance records) together with the one canonical name the libraries need (``float16``).
"""

from __future__ import annotations

from typing import Iterable, TypeVar

from cnllm.core.errors import UsageError

SPELLINGS = {
    "float16": ("fp16", "float16", "half", "f16"),
    "bfloat16": ("bf16", "bfloat16"),
    "float32": ("fp32", "float32", "float", "f32"),
    "float64": ("fp64", "float64", "double", "f64"),
}
WORDS = {word: canonical for canonical, words in SPELLINGS.items() for word in words}
FLOAT_DTYPES = ("float16", "bfloat16", "float32")  # what models are stored and run in
SHORT = {"float16": "fp16", "bfloat16": "bf16", "float32": "fp32", "float64": "fp64"}
GGUF_TYPES = {"float16": "f16", "bfloat16": "bf16", "float32": "f32"}
# The vocabulary spelled out in every --dtype / --precision help.
DTYPE_WORDS = "fp16 (float16, half), bf16 (bfloat16) or fp32 (float32, float)"


def words_for(canonical: Iterable[str]) -> list[str]:
    """Every accepted spelling of the given dtypes, for help texts and error messages."""
    return [word for name in canonical for word in SPELLINGS[name]]


_DType = TypeVar("_DType", bound="DType")


class DType(str):
    """A dtype as the user spelled it; :attr:`name` is torch's name, :attr:`short` the fp16/bf16/fp32 form."""

    def __new__(cls: type[_DType], word: str, *, allowed: Iterable[str] = FLOAT_DTYPES, where: str = "dtype") -> _DType:
        allowed = tuple(allowed)
        text = str(word).strip()
        canonical = WORDS.get(text.lower())
        if canonical is None or canonical not in allowed:
            raise UsageError(f"{where} {text!r} is not a dtype; choose one of {', '.join(words_for(allowed))}")
        return super().__new__(cls, text)

    @property
    def name(self) -> str:
        return WORDS[self.lower()]

    @property
    def short(self) -> str:
        return SHORT[self.name]

    @property
    def gguf(self) -> str:
        return GGUF_TYPES[self.name]

    @property
    def torch(self):
        import torch

        return getattr(torch, self.name)


class WideDType(DType):
    """A dtype that may also be fp64 (weight differences are exact only in a wider type)."""

    def __new__(cls, word: str, *, allowed: Iterable[str] = (*FLOAT_DTYPES, "float64"), where: str = "dtype") -> "WideDType":
        return super().__new__(cls, word, allowed=allowed, where=where)
