"""One dtype vocabulary: every common spelling, the canonical name for libraries, the user's word echoed back."""

from __future__ import annotations

import json

import pytest

from cnllm.core.dtypes import DType, WideDType
from cnllm.core.errors import UsageError


@pytest.mark.parametrize(
    "words, canonical, short",
    [(("fp16", "float16", "half", "FP16"), "float16", "fp16"), (("bf16", "bfloat16"), "bfloat16", "bf16"), (("fp32", "float32", "float"), "float32", "fp32")],
)
def test_every_spelling_names_one_dtype(words, canonical, short):
    for word in words:
        dtype = DType(word)
        assert (dtype.name, dtype.short) == (canonical, short)
        assert json.dumps({"dtype": dtype}) == json.dumps({"dtype": word})  # the user's word comes back


def test_unknown_and_too_wide_words_list_the_choices():
    with pytest.raises(UsageError, match=r"--dtype 'int8' is not a dtype; choose one of fp16, float16, half, f16, bf16, bfloat16, fp32"):
        DType("int8", where="--dtype")
    with pytest.raises(UsageError, match="is not a dtype"):
        DType("fp64")
    assert WideDType("double").name == "float64"
