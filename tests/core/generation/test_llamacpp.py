"""The llama.cpp backend on the tiny model converted to an f32 GGUF: it must agree with transformers."""

from __future__ import annotations

import json
import math

import pytest

from cnllm.core.backends import load_model
from cnllm.core.errors import UsageError
from cnllm.core.generation.base import LoadOptions, SamplingParams

GREEDY = SamplingParams(max_tokens=10, temperature=0, repetition_penalty=1.0)


@pytest.fixture(scope="module")
def gguf_generator(tiny_gguf):
    generator = load_model(tiny_gguf)
    yield generator
    generator.close()


def test_tokens_logprobs_and_greedy_text_match_transformers(gguf_generator, tiny_generator):
    text = "Hello world, 你好"
    assert gguf_generator.tokenize(text) == tiny_generator.tokenize(text)
    ids = tiny_generator.encode_prompt(text)
    ours = [s.logprob for s in gguf_generator.prompt_logprobs(ids, top=2)[1:]]
    reference = [s.logprob for s in tiny_generator.prompt_logprobs(ids)[1:]]
    assert ours == pytest.approx(reference, abs=2e-3)
    assert gguf_generator.complete(ids, GREEDY).token_ids == tiny_generator.complete(ids, GREEDY).token_ids


def test_generation_after_scoring_and_seeded_sampling(gguf_generator):
    ids = gguf_generator.encode_prompt("Once upon")
    first = gguf_generator.complete(ids, GREEDY)
    gguf_generator.prompt_logprobs(ids + first.token_ids)
    assert gguf_generator.complete(ids, GREEDY).token_ids == first.token_ids
    sampled = SamplingParams(max_tokens=10, temperature=1.2, top_k=0, top_p=1.0, seed=3)
    assert gguf_generator.complete(ids, sampled).token_ids == gguf_generator.complete(ids, sampled).token_ids


def test_embeddings(gguf_generator):
    vectors, count = gguf_generator.embed(["hello", "world"])
    assert len(vectors) == 2 and len(vectors[0]) == 64 and count > 0
    assert all(math.isclose(sum(x * x for x in v), 1.0, rel_tol=1e-4) for v in vectors)


def test_draft_model_reports_acceptance(tiny_gguf, gguf_generator):
    with load_model(tiny_gguf, LoadOptions(draft_model=tiny_gguf, draft_tokens=3)) as speculative:
        result = speculative.complete("Hello world", GREEDY)
    assert result.token_ids == gguf_generator.complete("Hello world", GREEDY).token_ids
    assert result.speculative.proposed > 0 and result.speculative.accepted > 0


def test_truncated_gguf_is_a_usage_error(tiny_gguf, tmp_path):
    truncated = tmp_path / "truncated.gguf"
    truncated.write_bytes(tiny_gguf.read_bytes()[: tiny_gguf.stat().st_size // 2])
    with pytest.raises(UsageError, match="truncated.gguf"):
        load_model(truncated)
    with pytest.raises(UsageError, match="Hugging Face"):
        load_model(tiny_gguf, LoadOptions(lora=tmp_path))


PERSON = {
    "type": "object",
    "properties": {"name": {"type": "string", "maxLength": 8}, "age": {"type": "integer"}},
    "required": ["name", "age"],
}


def check_person(text: str) -> None:
    """The answer parses and holds what PERSON demands (jsonschema is not installed: checked by hand)."""
    person = json.loads(text)
    assert set(person) >= {"name", "age"}
    # Random weights can emit malformed UTF-8 (a lead byte with wrong continuation bytes): llama.cpp's grammar reads it
    # as one character, Python decodes it as several U+FFFD. Real models spell characters whole.
    assert isinstance(person["name"], str) and len(person["name"].replace("\ufffd", "")) <= 8
    assert isinstance(person["age"], int) and not isinstance(person["age"], bool)


@pytest.mark.parametrize("temperature", [0, 1.0])
def test_a_json_schema_constrains_random_weights_to_valid_json(gguf_generator, temperature):
    params = SamplingParams(max_tokens=200, temperature=temperature, seed=3, json_schema=PERSON)
    free = gguf_generator.complete("Who are you?", SamplingParams(max_tokens=30, temperature=temperature, seed=3))
    with pytest.raises(ValueError):
        json.loads(free.text)  # random weights ramble unless constrained
    result = gguf_generator.complete("Who are you?", params)
    assert result.finish_reason == "stop", result.text
    check_person(result.text)


def test_an_invalid_json_schema_is_a_usage_error(gguf_generator):
    for schema in ({"type": "no-such-type"}, {"$ref": "#/missing"}):
        with pytest.raises(UsageError, match="the JSON schema cannot be turned into a grammar"):
            gguf_generator.stream("Hi", SamplingParams(json_schema=schema))
    # llama.cpp's parser recurses per nested group: 100,000 deep overflowed the C stack and killed the process
    with pytest.raises(UsageError, match="too large for llama.cpp"):
        gguf_generator.stream("Hi", SamplingParams(json_schema={"type": "string", "maxLength": 5000}))
    with pytest.raises(UsageError, match="llama.cpp refused the grammar"):  # refused by llama.cpp itself, cleanly
        gguf_generator.stream("Hi", SamplingParams(json_schema={"type": "string", "maxLength": 1100}))
    # the converter spells repetitions out: these would be gigabytes of grammar before any later check
    for schema in ({"type": "string", "maxLength": 10**9}, {"type": "array", "items": {"type": "string", "pattern": "^((a{1000}){1000}){1000}$"}}):
        with pytest.raises(UsageError, match="repeats more than"):
            gguf_generator.stream("Hi", SamplingParams(json_schema=schema))
    with pytest.raises(UsageError, match="repeats more than"):
        gguf_generator.stream("Hi", SamplingParams(json_schema={"type": "string", "pattern": "^a{" + "9" * 5000 + "}$"}))
    deep: dict = {}
    for _ in range(100_000):
        deep = {"anyOf": [deep]}
    with pytest.raises(UsageError, match="nested too deeply"):
        gguf_generator.stream("Hi", SamplingParams(json_schema=deep))


def test_grammar_nesting_skips_literals_and_classes():
    from cnllm.core.generation.llamacpp import grammar_nesting

    assert grammar_nesting('root ::= ("(" [()] (a)?)* "\\"" ")"') == 2


def test_pattern_atoms_multiply_nested_quantifiers():
    from cnllm.core.generation.llamacpp import pattern_atoms

    assert pattern_atoms(r"^\d{4}-\d{2}$") == 9
    assert pattern_atoms("^(ab|cd){3}$") == 17  # an upper bound: alternatives (and the bar) counted together, 5 × 3 + 2
    assert pattern_atoms("^[{]}x{2}$") == 6
    assert pattern_atoms("^((a{1000}){1000}){1000}$") == 10**9 + 2
