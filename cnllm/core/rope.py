"""RoPE context extension: one set of choices (``--rope-scaling``, ``--rope-factor``, ``--rope-freq-base``) mapped
onto both backends, so a model runs past its trained context without retraining, and the training-time scaling
written into a model's config.

Inference methods, with ``T`` the trained context, ``L`` the context in use (``--n-ctx``), ``θ`` the rope base,
``d`` the rotary dimension (head size) and ``f`` the factor (default ``L / T``):

* ``none`` — plain RoPE, even when the model's config or GGUF says otherwise.
* ``linear`` — position interpolation (Chen et al. 2023): positions divided by ``f``.
* ``ntk`` — NTK-aware base change (bloc97 2023): base ``θ · f^(d/(d−2))``, all positions kept.
* ``dynamic`` — dynamic NTK (transformers' ``dynamic``): base ``θ · (f·L/T − (f−1))^(d/(d−2))`` once ``L > T``;
  transformers recomputes it from the actual sequence length, llama.cpp fixes it at ``--n-ctx``.
* ``ntk-auto`` — the adaptive NTK rule of Chinese-LLaMA-Alpaca-2 (``scripts/attn_and_long_ctx_patches.py``,
  ``ALPHA="auto"``): base ``θ · α^(d/(d−2))`` with ``α = 1.1 · (4·L/T − 1)`` once ``L > T``, chosen from the sequence
  length so no factor needs picking. For ``T = 4096`` this is exactly the seeds' ``α = (L/1024 − 1) · 1.1``.
  Like ``dynamic``, transformers follows the actual length and llama.cpp fixes it at ``--n-ctx``.
* ``yarn`` — YaRN (Peng et al. 2023): interpolation of the low frequencies only, ramp between β_fast = 32 and
  β_slow = 1 rotations, attention scaled by ``0.1 · ln f + 1``.

Training methods (``linear``, ``dynamic``, ``yarn``, ``llama3``) are written into ``config.json`` as transformers
reads them (:func:`training_rope_config`); ``convert-gguf`` carries linear, YaRN and llama3 into GGUF metadata.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from cnllm.core.config import coerce_fields
from cnllm.core.errors import UsageError

# The largest context window any command loads with (1M tokens; LLaMA-family models train for at most 128K):
# llama.cpp allocates the window up front, so a larger --n-ctx or --length is refused before any memory goes.
MAX_CONTEXT = 1 << 20
INFERENCE_METHODS = ("none", "linear", "ntk", "ntk-auto", "dynamic", "yarn")
TRAINING_METHODS = ("linear", "dynamic", "yarn", "llama3")
# The transformers rope type cnllm registers for ``ntk-auto`` ("dynamic" in its name makes transformers recompute
# the frequencies from the sequence length, as for its own dynamic NTK).
NTK_AUTO_ROPE_TYPE = "dynamic_ntk_auto"


@dataclass(frozen=True)
class RopeOptions:
    """Context extension at load time; all ``None``: the model's own rope settings."""

    scaling: str | None = None
    factor: float | None = None
    freq_base: float | None = None

    def __post_init__(self) -> None:
        coerce_fields(self)

    @property
    def active(self) -> bool:
        return self.scaling is not None or self.freq_base is not None

    def validate(self) -> None:
        if self.scaling is not None and self.scaling not in INFERENCE_METHODS:
            raise UsageError(f"--rope-scaling must be one of {', '.join(INFERENCE_METHODS)}; got {self.scaling!r}")
        if self.factor is not None:
            if self.factor < 1:
                raise UsageError(f"--rope-factor must be at least 1, got {self.factor}")
            if self.scaling in (None, "none", "ntk-auto"):
                raise UsageError(f"--rope-factor needs --rope-scaling linear, ntk, dynamic or yarn (got {self.scaling or 'none set'})")
        if self.freq_base is not None and self.freq_base <= 0:
            raise UsageError(f"--rope-freq-base must be > 0, got {self.freq_base}")

    def factor_for(self, n_ctx: int | None, trained: int) -> float:
        """The factor given, else ``n_ctx / trained`` (at least 1)."""
        if self.factor is not None:
            return float(self.factor)
        return max(1.0, n_ctx / trained) if n_ctx else 1.0

    def extended_context(self, trained: int | None) -> int | None:
        """The context a chosen factor reaches (``T · f``), the default ``--n-ctx`` when only ``--rope-factor`` says it."""
        return int(trained * self.factor) if trained and self.factor is not None else None

    def to_dict(self) -> dict:
        return {"scaling": self.scaling, "factor": self.factor, "freq_base": self.freq_base}


@dataclass(frozen=True)
class ModelRope:
    """What a model says about its rope: trained context, rotary dimension and base."""

    trained: int
    head_dim: int
    theta: float


def ntk_base(theta: float, alpha: float, dim: int) -> float:
    """The NTK-aware base: ``θ · α^(d/(d−2))``."""
    return theta * alpha ** (dim / (dim - 2))


def ntk_auto_alpha(length: int, trained: int) -> float:
    """Chinese-LLaMA-Alpaca-2's adaptive α for a sequence of ``length`` tokens (1 within the trained context)."""
    if length <= trained:
        return 1.0
    return 1.1 * (4 * length / trained - 1)


def dynamic_alpha(length: int, trained: int, factor: float) -> float:
    """transformers' dynamic NTK: ``f·L/T − (f−1)`` (1 within the trained context)."""
    return factor * max(length, trained) / trained - (factor - 1)


def beyond_trained_warning(n_ctx: int | None, trained: int | None, rope: RopeOptions | None) -> str | None:
    """The warning for a context past the trained one with no scaling chosen (quality usually collapses there)."""
    if not n_ctx or not trained or n_ctx <= trained:
        return None
    if rope is not None and rope.scaling not in (None, "none"):
        return None
    return (
        f"--n-ctx {n_ctx} is beyond the model's trained context of {trained} tokens and no rope scaling is set; "
        "output past that length is usually poor (choose one with --rope-scaling, e.g. yarn or ntk-auto)"
    )


def llama_cpp_kwargs(rope: RopeOptions, model: ModelRope, n_ctx: int) -> dict:
    """``Llama(...)`` keyword arguments for ``rope`` at context ``n_ctx``."""
    import llama_cpp

    if not rope.active:
        return {}
    theta = rope.freq_base or model.theta
    kwargs: dict = {"rope_freq_base": theta}
    method = rope.scaling
    if method is None:
        return kwargs
    factor = rope.factor_for(n_ctx, model.trained)
    kwargs.update(rope_scaling_type=llama_cpp.LLAMA_ROPE_SCALING_TYPE_NONE, rope_freq_scale=1.0)
    if method == "linear":
        kwargs.update(rope_scaling_type=llama_cpp.LLAMA_ROPE_SCALING_TYPE_LINEAR, rope_freq_scale=1.0 / factor)
    elif method == "ntk":
        kwargs["rope_freq_base"] = ntk_base(theta, factor, model.head_dim)
    elif method == "dynamic":
        kwargs["rope_freq_base"] = ntk_base(theta, dynamic_alpha(n_ctx, model.trained, factor), model.head_dim)
    elif method == "ntk-auto":
        kwargs["rope_freq_base"] = ntk_base(theta, ntk_auto_alpha(n_ctx, model.trained), model.head_dim)
    elif method == "yarn":
        kwargs.update(
            rope_scaling_type=llama_cpp.LLAMA_ROPE_SCALING_TYPE_YARN,
            rope_freq_scale=1.0 / factor,
            yarn_orig_ctx=model.trained,
            yarn_ext_factor=1.0,
            yarn_attn_factor=1.0,
            yarn_beta_fast=32.0,
            yarn_beta_slow=1.0,
        )
    return kwargs


def hf_model_rope(config) -> ModelRope:
    """The trained context, rotary dimension and base of a transformers config (its original context when scaled)."""
    params = dict(getattr(config, "rope_parameters", None) or {})
    theta = params.get("rope_theta") or getattr(config, "rope_theta", None) or 10000.0
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
    trained = params.get("original_max_position_embeddings") or config.max_position_embeddings
    return ModelRope(int(trained), int(head_dim), float(theta))


def apply_to_hf_config(config, rope: RopeOptions, n_ctx: int | None) -> None:
    """Set ``config.rope_parameters`` (transformers 5) for ``rope``; the model built from ``config`` then uses it."""
    if not rope.active:
        return
    model = hf_model_rope(config)
    theta = rope.freq_base or model.theta
    params = dict(getattr(config, "rope_parameters", None) or {"rope_type": "default"})
    params["rope_theta"] = theta
    method = rope.scaling
    if method is not None:
        factor = rope.factor_for(n_ctx, model.trained)
        config.max_position_embeddings = model.trained
        params = {"rope_type": "default", "rope_theta": theta}
        if method == "linear":
            params.update(rope_type="linear", factor=factor)
        elif method == "ntk":
            params["rope_theta"] = ntk_base(theta, factor, model.head_dim)
        elif method == "dynamic":
            params.update(rope_type="dynamic", factor=factor)
        elif method == "ntk-auto":
            register_ntk_auto()
            params["rope_type"] = NTK_AUTO_ROPE_TYPE
        elif method == "yarn":
            params.update(rope_type="yarn", factor=factor, original_max_position_embeddings=model.trained, beta_fast=32.0, beta_slow=1.0)
    config.rope_parameters = params


def register_ntk_auto() -> None:
    """Teach transformers the ``ntk-auto`` rope (an extension point its ``ROPE_INIT_FUNCTIONS`` table offers)."""
    from transformers import modeling_rope_utils

    modeling_rope_utils.ROPE_INIT_FUNCTIONS.setdefault(NTK_AUTO_ROPE_TYPE, _ntk_auto_parameters)


def _ntk_auto_parameters(config, device=None, seq_len=None, layer_type=None):
    """Inverse frequencies for the adaptive NTK base at ``seq_len`` (transformers' rope-init signature)."""
    import torch

    model = hf_model_rope(config)
    length = int(seq_len) if seq_len is not None else model.trained
    base = ntk_base(model.theta, ntk_auto_alpha(length, model.trained), model.head_dim)
    dim = model.head_dim
    inv_freq = 1.0 / (base ** (torch.arange(0, dim, 2, dtype=torch.int64).to(device=device, dtype=torch.float) / dim))
    return inv_freq, 1.0


def training_rope_config(method: str, factor: float, original: int) -> tuple[dict, int]:
    """``(rope_parameters, max_position_embeddings)`` for a model trained with ``method`` scaling by ``factor``
    from an ``original`` context (transformers' conventions: dynamic keeps ``T`` as max_position_embeddings)."""
    if method not in TRAINING_METHODS:
        raise UsageError(f"--rope-scaling must be one of {', '.join(TRAINING_METHODS)} for training; got {method!r}")
    if factor <= 1:
        raise UsageError(f"--rope-factor must be > 1 for training with rope scaling, got {factor}")
    extended = int(math.ceil(original * factor))
    if method == "linear":
        return {"rope_type": "linear", "factor": factor}, extended
    if method == "dynamic":
        return {"rope_type": "dynamic", "factor": factor}, original
    if method == "yarn":
        return {"rope_type": "yarn", "factor": factor, "original_max_position_embeddings": original}, extended
    return {
        "rope_type": "llama3",
        "factor": factor,
        "low_freq_factor": 1.0,
        "high_freq_factor": 4.0,
        "original_max_position_embeddings": original,
    }, extended


def training_overrides(method: str, factor: float, config: dict, original: int | None = None) -> dict:
    """The ``config.json`` keys a model trained with ``method`` scaling carries (``rope_parameters`` as transformers 5
    writes them, and ``max_position_embeddings``); ``original`` defaults to the base model's trained context."""
    params = dict(config.get("rope_parameters") or config.get("rope_scaling") or {})
    theta = params.get("rope_theta") or config.get("rope_theta") or 10000.0
    original = original or params.get("original_max_position_embeddings") or config.get("max_position_embeddings")
    if not original:
        raise UsageError("the base model's config.json has no max_position_embeddings; pass --original-context")
    rope_parameters, length = training_rope_config(method, float(factor), int(original))
    return {"rope_parameters": {**rope_parameters, "rope_theta": theta}, "max_position_embeddings": length}
