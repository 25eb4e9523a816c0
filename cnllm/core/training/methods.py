"""The training methods, one table: a command or pipeline step name → its :class:`~cnllm.core.training.method.TrainingMethod`."""

from __future__ import annotations

from cnllm.core.errors import UsageError
from cnllm.core.training.align import ALIGN
from cnllm.core.training.method import TrainingMethod
from cnllm.core.training.pt import PT
from cnllm.core.training.sft import SFT

METHODS: dict[str, TrainingMethod] = {method.name: method for method in (PT, SFT, ALIGN)}


def method_for(options) -> TrainingMethod:
    """The method whose options ``options`` are (a PtOptions trains pt)."""
    for method in METHODS.values():
        if type(options) is method.options_type:
            return method
    raise UsageError(f"{type(options).__name__} are not the options of a training method ({', '.join(METHODS)})")
