"""The transformers backend on the tiny random LLaMA: sampling, scoring, embeddings, LoRA, draft models, chat sessions."""

from __future__ import annotations

import math

import pytest

from cnllm.core.backends import load_model
from cnllm.core.errors import UsageError
from cnllm.core.generation.base import ContextOverflow, LoadOptions, SamplingParams
from cnllm.core.generation.session import ChatSession

GREEDY = SamplingParams(max_tokens=12, temperature=0, repetition_penalty=1.0)


def test_greedy_is_deterministic_and_seed_reproduces_sampling(tiny_generator):
    first = tiny_generator.complete("Hello world", GREEDY)
    assert first.completion_tokens == 12 and first.finish_reason == "length"
    assert tiny_generator.complete("Hello world", GREEDY).token_ids == first.token_ids
    sampled = SamplingParams(max_tokens=12, temperature=1.5, top_k=0, top_p=1.0, seed=7)
    runs = [tiny_generator.complete("Hello world", sampled).token_ids for _ in range(2)]
    assert runs[0] == runs[1]
    other = tiny_generator.complete("Hello world", SamplingParams(max_tokens=12, temperature=1.5, top_k=0, top_p=1.0, seed=8))
    assert other.token_ids != runs[0]


def test_greedy_tokens_are_the_most_likely_under_prompt_logprobs(tiny_generator):
    prompt = tiny_generator.encode_prompt("The cat sat")
    result = tiny_generator.complete(prompt, SamplingParams(max_tokens=5, temperature=0, repetition_penalty=1.0))
    scored = tiny_generator.prompt_logprobs(prompt + result.token_ids, top=3)
    assert len(scored) == len(prompt) + 5
    assert scored[0].logprob is None and all(s.logprob <= 0 for s in scored[1:])
    for item in scored[len(prompt) :]:
        assert math.isclose(item.logprob, item.top[0][1], abs_tol=1e-5)
    assert "".join(s.text for s in scored) == tiny_generator.decode(prompt + result.token_ids)


def test_embeddings_are_normalised(tiny_generator):
    vectors, count = tiny_generator.embed(["hello", "北京"])
    assert len(vectors) == 2 and len(vectors[0]) == 64
    assert all(math.isclose(sum(x * x for x in v), 1.0, rel_tol=1e-4) for v in vectors)
    assert vectors[0] != vectors[1]
    assert count == len(tiny_generator.tokenize("hello")) + len(tiny_generator.tokenize("北京"))


def test_draft_model_gives_the_same_greedy_answer_and_reports_acceptance(tiny_llama_dir, tiny_generator):
    with load_model(tiny_llama_dir, LoadOptions(draft_model=tiny_llama_dir, draft_tokens=3)) as speculative:
        result = speculative.complete("Hello world", GREEDY)
    assert result.token_ids == tiny_generator.complete("Hello world", GREEDY).token_ids
    assert result.speculative.proposed > 0
    assert result.speculative.acceptance_rate == 1.0  # the draft is the target itself


def test_draft_model_with_another_vocabulary_is_refused(tiny_llama_dir, tiny_llama3_dir):
    with pytest.raises(UsageError, match="same|share"):
        load_model(tiny_llama_dir, LoadOptions(draft_model=tiny_llama3_dir))


def test_lora_adapter_is_applied_without_merging(tmp_path, tiny_llama_dir, tiny_generator):
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    base = AutoModelForCausalLM.from_pretrained(str(tiny_llama_dir), dtype=torch.float32)
    torch.manual_seed(0)
    peft_model = get_peft_model(base, LoraConfig(r=4, lora_alpha=32, target_modules=["q_proj", "v_proj"], init_lora_weights=False))
    peft_model.save_pretrained(tmp_path / "adapter")
    ids = tiny_generator.encode_prompt("Hello world")
    with load_model(tiny_llama_dir, LoadOptions(lora=tmp_path / "adapter")) as adapted:
        assert type(adapted.model).__name__ == "PeftModel"
        with_lora = [s.logprob for s in adapted.prompt_logprobs(ids)[1:]]
    with torch.inference_mode():
        expected = torch.log_softmax(peft_model(torch.tensor([ids])).logits[0].float(), -1)
    assert with_lora == pytest.approx([float(expected[i - 1, ids[i]]) for i in range(1, len(ids))], abs=1e-4)
    assert with_lora != pytest.approx([s.logprob for s in tiny_generator.prompt_logprobs(ids)[1:]], abs=1e-4)
    with pytest.raises(UsageError, match="adapter_config.json"):
        load_model(tiny_llama_dir, LoadOptions(lora=tmp_path))


def test_stop_string_cuts_a_real_generation(tiny_generator):
    text = tiny_generator.complete("Hello world", SamplingParams(max_tokens=30, temperature=0, repetition_penalty=1.0)).text
    stop = text[len(text) // 2 : len(text) // 2 + 3]
    cut = tiny_generator.complete("Hello world", SamplingParams(max_tokens=30, temperature=0, repetition_penalty=1.0, stop=(stop,)))
    assert cut.finish_reason == "stop"
    assert cut.text == text[: text.index(stop)]


def test_chat_session_drops_oldest_turns_but_keeps_the_system_prompt(tiny_llama_dir):
    with load_model(tiny_llama_dir, LoadOptions(n_ctx=120)) as generator:
        session = ChatSession(generator, generator.prompt_format("llama2"), SamplingParams(max_tokens=20, temperature=0), system="Be brief.")
        for turn in range(6):
            session.record(f"question number {turn} about the weather today", f"answer number {turn} is sunny and warm")
        ids = session.prompt_ids("final question")
        assert len(ids) <= 100
        prompt = generator.decode(ids)
        assert "Be brief." in prompt and "final question" in prompt
        assert "question number 0" not in prompt and "question number 5" in prompt
        assert session.dropped_turns > 0
        with pytest.raises(ContextOverflow):
            session.prompt_ids("word " * 200)


def test_auto_template_comes_from_the_tokenizer(tiny_generator, monkeypatch):
    assert tiny_generator.prompt_format("auto").is_plain
    source = "{{ bos_token }}{% for m in messages %}[{{ m.role }}]{{ m.content }}{% endfor %}{% if add_generation_prompt %}[assistant]{% endif %}"
    monkeypatch.setattr(tiny_generator.tokenizer, "chat_template", source)
    auto = tiny_generator.prompt_format("auto")
    prompt = auto.render([{"role": "user", "content": "你好"}], "sys")
    assert (auto.name, prompt, auto.stop) == ("auto", "<s>[system]sys[user]你好[assistant]", ("</s>",))
    ids = tiny_generator.encode_prompt(prompt)
    assert ids.count(tiny_generator.tokenizer.bos_token_id) == 1  # the template's BOS is not doubled


@pytest.mark.parametrize("template", ["alpaca", "llama2", "chatml", "auto-with-bos", "auto-without-bos"])
def test_training_samples_start_with_the_prompt_chat_sends(tiny_generator, monkeypatch, template):
    """One renderer and one BOS rule: the ids sft trains on before the answer are the ids chat sends."""
    from cnllm.core.training import data

    sources = {
        "auto-with-bos": "{{ bos_token }}{% for m in messages %}[{{ m.role }}]{{ m.content }}{% endfor %}{% if add_generation_prompt %}[assistant]{% endif %}",
        "auto-without-bos": "{% for m in messages %}[{{ m.role }}]{{ m.content }}{% endfor %}{% if add_generation_prompt %}[assistant]{% endif %}",
    }
    if template in sources:
        monkeypatch.setattr(tiny_generator.tokenizer, "chat_template", sources[template])
        template = "auto"
    record = data.SftRecord("test", [data.Message("user", "Name a color."), data.Message("assistant", "Blue.")])
    [example] = data.tokenize_records([record], tiny_generator.tokenizer, template=template, system=None, max_seq_length=512, stats=data.SftStats())
    prompt = [i for i, label in zip(example.input_ids, example.labels) if label == -100]
    chat_prompt = tiny_generator.encode_prompt(tiny_generator.prompt_format(template).render([{"role": "user", "content": "Name a color."}]))
    assert example.input_ids[: len(chat_prompt)] == chat_prompt
    assert prompt[: len(chat_prompt)] == chat_prompt
    assert example.input_ids.count(tiny_generator.tokenizer.bos_token_id) == 1


def test_structured_output_is_refused_with_the_way_to_get_it(tiny_generator):
    """transformers has no grammar-constrained decoding here (no grammar library is a dependency): refused up front."""
    with pytest.raises(UsageError, match="needs a GGUF model"):
        tiny_generator.stream("Hi", SamplingParams(json_schema={"type": "object"}))
