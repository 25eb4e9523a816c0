"""Long prompts are evaluated in pieces with a cancellation check between them (issue 26), on both backends.

The pieces change nothing a client sees (the same greedy answer as one pass over the prompt), and a cancel
during prompt processing ends it within one piece instead of after the whole prompt.
"""

from __future__ import annotations

import threading
import time

import pytest

from cnllm.core.generation.base import LoadOptions, SamplingParams

PROMPT = [1] + [3 + (i * 7) % 990 for i in range(1500)]  # three pieces of 512 and a rest
GREEDY = SamplingParams(max_tokens=6, temperature=0)


@pytest.fixture(scope="module")
def models(tiny_llama_dir, tiny_gguf):
    from cnllm.core.backends import load_model

    # Without llama.cpp's prompt cache (serve's default), so each test evaluates the whole prompt.
    with load_model(tiny_llama_dir, LoadOptions(n_ctx=2048)) as hf, load_model(tiny_gguf, LoadOptions(n_ctx=2048, prompt_cache=False)) as gguf:
        yield {"transformers": hf, "llama.cpp": gguf}


def one_pass(model, monkeypatch):
    """The answer without pieces: the whole prompt left to the backend's own generate."""
    with monkeypatch.context() as patch:
        patch.setattr(model, "_evaluate_prompt_head", lambda *args: None if model.backend == "transformers" else True)
        return model.complete(PROMPT, GREEDY).token_ids


def slowed(model, monkeypatch, seconds_per_token: float) -> list[int]:
    """Makes the backend's prompt evaluation take ``seconds_per_token`` per token; returns the sizes it is called with."""
    sizes: list[int] = []
    if model.backend == "llama.cpp":
        owner, name = model._llama, "eval"
    else:
        owner, name = model.model.get_decoder(), "forward"
    original = getattr(owner, name)

    def evaluate(*args, **kwargs):
        tokens = kwargs["input_ids"].shape[1] if "input_ids" in kwargs else len(args[0])
        sizes.append(tokens)
        time.sleep(seconds_per_token * tokens)
        return original(*args, **kwargs)

    monkeypatch.setattr(owner, name, evaluate)
    return sizes


@pytest.mark.parametrize("backend", ["transformers", "llama.cpp"])
def test_a_prompt_in_pieces_gets_the_one_pass_answer(models, backend, monkeypatch):
    model = models[backend]
    assert model.complete(PROMPT, GREEDY).token_ids == one_pass(model, monkeypatch)


@pytest.mark.parametrize("backend", ["transformers", "llama.cpp"])
def test_a_cancel_during_prompt_processing_ends_it_within_one_piece(models, backend, monkeypatch):
    model = models[backend]
    sizes = slowed(model, monkeypatch, 0.001)  # 0.5 s a piece, 1.5 s for the whole prompt at once
    stream = model.stream(PROMPT, GREEDY)
    threading.Timer(0.2, stream.cancel).start()
    result = stream.read()
    assert (result.finish_reason, result.token_ids, sizes) == ("cancelled", [], [512])  # the first piece, then the cancel was seen
