"""The one place cnllm opens a llama.cpp model: every GGUF that chat, serve, eval, the pipeline, the tests and the
benchmarks load through llama-cpp-python comes through :func:`open_llama` (or :func:`model_params` for the low-level
``llama_model_load_from_file``), so the weight-repacking decision of :mod:`cnllm.core.cpu` holds everywhere
(a test keeps other ``Llama(...)`` calls out of the repository), and every header is checked first
(:func:`cnllm.core.gguf.header.check_gguf`: llama.cpp aborts on metadata that disagrees with the tensors).

llama-cpp-python's ``Llama.__init__`` builds llama.cpp's ``llama_model_params`` and loads the model in one go, and
(0.3.36) has no keyword for ``use_extra_bufts``. It does assign the parameters to ``self.model_params`` before the
load, so :class:`CnllmLlama` — ``Llama`` with ``model_params`` as a property — sets the field on them as they are
assigned: per instance, no global state patched, every other keyword untouched. ``context_params`` gets the same
treatment for ``sequences`` (llama.cpp's ``n_seq_max``, one KV stream each: continuous batching in serve), which
``Llama.__init__`` has no keyword for either. A llama-cpp-python whose
``llama_model_params`` lacks the field (older than llama.cpp's ``--no-repack``) loads with llama.cpp's default;
:func:`repack_support` says so (``cnllm doctor`` prints it) and a load that asked for repacking off warns.
"""

from __future__ import annotations

import warnings
from functools import lru_cache
from pathlib import Path
from typing import Any, Callable

from cnllm.core.cpu import RepackDecision, repack_decision

FIELD = "use_extra_bufts"


def repack_support() -> bool:
    """Whether this llama-cpp-python's ``llama_model_params`` has the ``use_extra_bufts`` field cnllm sets."""
    import llama_cpp

    return any(field[0] == FIELD for field in getattr(llama_cpp.llama_model_params, "_fields_", ()))


def apply_repack(params: Any, enabled: bool) -> bool:
    """Set ``use_extra_bufts`` on a ``llama_model_params``; False when this llama-cpp-python has no such field."""
    if not any(field[0] == FIELD for field in getattr(type(params), "_fields_", ())):
        return False
    setattr(params, FIELD, enabled)
    return True


def _unapplied(decision: RepackDecision) -> None:
    if not decision.enabled:
        warnings.warn(
            f"this llama-cpp-python cannot turn llama.cpp's weight repacking off (no {FIELD} in llama_model_params); "
            f"the model loads with it on although {decision.reason} — install the version cnllm pins (see cnllm doctor)",
            RuntimeWarning,
            stacklevel=3,
        )


def _assigned_by_init(name: str, adopt: Callable[[Any, Any], None]) -> property:
    """A property for a parameter struct ``Llama.__init__`` assigns to ``name`` before it uses it: ``adopt`` sets
    cnllm's fields on the struct as it is assigned."""
    key = f"_{name}"

    def get(self):
        try:
            return self.__dict__[key]
        except KeyError:
            raise AttributeError(name) from None

    def put(self, params) -> None:
        adopt(self, params)
        self.__dict__[key] = params

    return property(get, put)


@lru_cache(maxsize=None)
def _llama_class() -> type:
    from llama_cpp import Llama

    class CnllmLlama(Llama):
        """``Llama`` whose model parameters get cnllm's ``use_extra_bufts``, and whose context parameters its sequences,
        as ``Llama.__init__`` assigns them."""

        def __init__(self, *args: Any, repack: RepackDecision | None = None, sequences: int = 1, **kwargs: Any):
            self.repack = repack if repack is not None else repack_decision()  # None: Llama.__setstate__ re-running __init__
            self.repack_applied = False
            self.sequences = sequences
            super().__init__(*args, **kwargs)

        @property
        def repack_in_effect(self) -> bool:
            """Whether llama.cpp repacked this model's weights (its default when the choice could not be passed)."""
            return self.repack.enabled if self.repack_applied else True

        def _adopt_model_params(self, params) -> None:
            self.repack_applied = apply_repack(params, self.repack.enabled)

        def _adopt_context_params(self, params) -> None:
            if self.sequences > 1:  # n_ctx is then the sum over sequences, each its own KV stream of n_ctx / sequences
                params.n_seq_max = self.sequences
                params.kv_unified = False

        model_params = _assigned_by_init("model_params", _adopt_model_params)
        context_params = _assigned_by_init("context_params", _adopt_context_params)

    return CnllmLlama


def open_llama(model_path: Path | str, *, repack: bool | None = None, sequences: int = 1, **kwargs: Any):
    """``llama_cpp.Llama(model_path, **kwargs)`` with weight repacking decided by :func:`cnllm.core.cpu.decide_repack`
    (``repack``: the --repack / --no-repack option, None for the environment and the CPU) and ``sequences`` parallel
    sequences (``n_ctx`` is their sum). The result carries
    ``repack`` (the :class:`RepackDecision`) and ``repack_applied`` (whether it reached llama.cpp)."""
    from cnllm.core.gguf.header import check_gguf

    check_gguf(model_path)
    decision = repack_decision(repack)
    llm = _llama_class()(model_path=str(model_path), repack=decision, sequences=sequences, **kwargs)
    if not llm.repack_applied:
        _unapplied(decision)
    return llm


def model_params(repack: bool | None = None, **fields: Any):
    """llama.cpp's default ``llama_model_params`` with cnllm's repack decision and ``fields`` set, for code that
    calls ``llama_model_load_from_file`` itself."""
    import llama_cpp

    decision = repack_decision(repack)
    params = llama_cpp.llama_model_default_params()
    if not apply_repack(params, decision.enabled):
        _unapplied(decision)
    for name, value in fields.items():
        setattr(params, name, value)
    return params
