"""RoPE context extension: the formulas, their mapping onto transformers and llama.cpp, and both backends
agreeing at twice the trained context under every method."""

from __future__ import annotations

import math

import numpy as np
import pytest

from cnllm.core.errors import UsageError
from cnllm.core.rope import (
    INFERENCE_METHODS,
    ModelRope,
    RopeOptions,
    apply_to_hf_config,
    beyond_trained_warning,
    llama_cpp_kwargs,
    ntk_auto_alpha,
    training_rope_config,
)
from tests.conftest import SHORT_CONTEXT

LONG = 2 * SHORT_CONTEXT


def test_ntk_auto_is_the_seeds_rule_on_a_4k_model():
    # Chinese-LLaMA-Alpaca-2: alpha = (seq_len / 1024 - 1) * 1.1 beyond the 4096 trained positions
    for length in (4097, 8192, 12288, 18000):
        assert ntk_auto_alpha(length, 4096) == pytest.approx((length / 1024 - 1) * 1.1)
    assert ntk_auto_alpha(4096, 4096) == 1.0


def test_llama_cpp_mapping():
    import llama_cpp

    model = ModelRope(trained=4096, head_dim=128, theta=10000.0)
    linear = llama_cpp_kwargs(RopeOptions("linear", 4.0), model, 16384)
    assert linear["rope_scaling_type"] == llama_cpp.LLAMA_ROPE_SCALING_TYPE_LINEAR and linear["rope_freq_scale"] == 0.25
    ntk = llama_cpp_kwargs(RopeOptions("ntk", 4.0), model, 16384)
    assert ntk["rope_freq_base"] == pytest.approx(10000 * 4 ** (128 / 126)) and ntk["rope_freq_scale"] == 1.0
    auto = llama_cpp_kwargs(RopeOptions("ntk-auto"), model, 8192)
    assert auto["rope_freq_base"] == pytest.approx(10000 * ((8192 / 1024 - 1) * 1.1) ** (128 / 126))
    dynamic = llama_cpp_kwargs(RopeOptions("dynamic", 2.0), model, 16384)
    assert dynamic["rope_freq_base"] == pytest.approx(10000 * (2 * 16384 / 4096 - 1) ** (128 / 126))
    yarn = llama_cpp_kwargs(RopeOptions("yarn"), model, 16384)  # the factor defaults to n_ctx / trained
    assert yarn["rope_scaling_type"] == llama_cpp.LLAMA_ROPE_SCALING_TYPE_YARN
    assert yarn["rope_freq_scale"] == 0.25 and yarn["yarn_orig_ctx"] == 4096
    none = llama_cpp_kwargs(RopeOptions("none"), model, 4096)
    assert none["rope_scaling_type"] == llama_cpp.LLAMA_ROPE_SCALING_TYPE_NONE and none["rope_freq_scale"] == 1.0
    assert llama_cpp_kwargs(RopeOptions(freq_base=5e5), model, 4096) == {"rope_freq_base": 5e5}
    assert llama_cpp_kwargs(RopeOptions(), model, 4096) == {}


def test_transformers_mapping(tiny_llama_dir):
    from transformers import AutoConfig

    def params(rope: RopeOptions, n_ctx: int = 2048) -> dict:
        config = AutoConfig.from_pretrained(str(tiny_llama_dir))
        apply_to_hf_config(config, rope, n_ctx)
        return dict(config.rope_parameters)

    assert params(RopeOptions("linear", 2.0)) == {"rope_type": "linear", "factor": 2.0, "rope_theta": 10000.0}
    assert params(RopeOptions("dynamic")) == {"rope_type": "dynamic", "factor": 4.0, "rope_theta": 10000.0}
    yarn = params(RopeOptions("yarn", 8.0))
    assert yarn["rope_type"] == "yarn" and yarn["original_max_position_embeddings"] == 512 and yarn["factor"] == 8.0
    assert params(RopeOptions("ntk", 2.0))["rope_theta"] == pytest.approx(10000 * 2 ** (16 / 14))
    assert params(RopeOptions("ntk-auto"))["rope_type"] == "dynamic_ntk_auto"
    assert params(RopeOptions(freq_base=1e6))["rope_theta"] == 1e6


@pytest.mark.parametrize(
    "rope, message",
    [
        (RopeOptions("ntk-auto", 2.0), "--rope-factor needs"),
        (RopeOptions(None, 2.0), "--rope-factor needs"),
        (RopeOptions("linear", 0.5), "at least 1"),
        (RopeOptions("longrope"), "must be one of"),
    ],
)
def test_bad_combinations_are_usage_errors(rope, message):
    with pytest.raises(UsageError, match=message):
        rope.validate()


def test_warning_names_the_trained_length():
    assert "trained context of 4096" in beyond_trained_warning(8192, 4096, None)
    assert "trained context of 4096" in beyond_trained_warning(8192, 4096, RopeOptions("none"))
    assert beyond_trained_warning(8192, 4096, RopeOptions("yarn")) is None
    assert beyond_trained_warning(4096, 4096, None) is None


def test_training_configs():
    assert training_rope_config("linear", 4.0, 4096) == ({"rope_type": "linear", "factor": 4.0}, 16384)
    assert training_rope_config("dynamic", 2.0, 4096) == ({"rope_type": "dynamic", "factor": 2.0}, 4096)
    yarn, length = training_rope_config("yarn", 16.0, 4096)
    assert yarn["original_max_position_embeddings"] == 4096 and length == 65536
    llama3, _ = training_rope_config("llama3", 8.0, 8192)
    assert llama3["rope_type"] == "llama3" and llama3["original_max_position_embeddings"] == 8192
    with pytest.raises(UsageError):
        training_rope_config("ntk", 2.0, 4096)


def _logprobs(path, rope: RopeOptions | None) -> np.ndarray:
    from cnllm.core.backends import load_model
    from cnllm.core.generation.base import LoadOptions

    ids = [1] + [int(x) for x in np.random.default_rng(0).integers(3, 900, size=LONG - 1)]
    with load_model(path, LoadOptions(n_ctx=LONG, threads=1, rope=rope)) as model:
        assert model.trained_context == SHORT_CONTEXT
        return model.target_logprobs([ids], 1)[0]


@pytest.fixture(scope="module")
def unscaled(short_context_dir) -> np.ndarray:
    return _logprobs(short_context_dir, None)


@pytest.mark.parametrize("method", INFERENCE_METHODS)
def test_transformers_and_llama_cpp_agree_beyond_the_trained_context(method, short_context_dir, short_context_gguf, unscaled):
    rope = RopeOptions(method, 2.0 if method in ("linear", "ntk", "dynamic", "yarn") else None)
    hf = _logprobs(short_context_dir, rope)
    gguf = _logprobs(short_context_gguf, rope)
    assert np.abs(hf - gguf).max() < 5e-3
    if method == "none":
        assert np.abs(hf - unscaled).max() < 1e-9
    else:  # the method changes the positions (by far more than the agreement tolerance)
        assert np.abs(hf - unscaled).max() > 0.1
    assert math.isfinite(float(hf.sum()))

