"""Process-wide settings for the heavy libraries, applied once by code paths that import them."""

from __future__ import annotations

import logging
import os


def quiet_libraries(verbose: bool = False) -> None:
    """Keep stdout clean and stderr readable: no transformers/datasets/hub progress bars or info logs."""
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    if verbose:
        return
    # gguf-py warns about LLaMA's own pair template ("<s> $A <s> $B") on every conversion.
    logging.getLogger("gguf").setLevel(logging.ERROR)
    try:
        import transformers

        transformers.utils.logging.set_verbosity_error()
        transformers.utils.logging.disable_progress_bar()
    except ImportError:
        pass
    try:
        import datasets

        datasets.utils.logging.set_verbosity_error()
        datasets.disable_progress_bars()
    except ImportError:
        pass
