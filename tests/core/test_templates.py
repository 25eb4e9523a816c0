"""Golden strings for every built-in template, their Jinja twins, and the published reference templates."""

import pytest

from cnllm.core.errors import UsageError
from cnllm.core.templates import (
    PROMPT_TEMPLATE_NAMES,
    TEMPLATES,
    bos_needed,
    check_template_name,
    jinja_renderer,
    resolve_template,
)

# The reference chat templates as published in the models' tokenizer_config.json.
LLAMA2_CHAT_REFERENCE = (  # meta-llama/Llama-2-7b-chat-hf
    "{% if messages[0]['role'] == 'system' %}{% set loop_messages = messages[1:] %}{% set system_message = messages[0]['content'] %}"
    "{% else %}{% set loop_messages = messages %}{% set system_message = false %}{% endif %}"
    "{% for message in loop_messages %}{% if (message['role'] == 'user') != (loop.index0 % 2 == 0) %}"
    "{{ raise_exception('Conversation roles must alternate user/assistant/user/assistant/...') }}{% endif %}"
    "{% if loop.index0 == 0 and system_message != false %}"
    "{% set content = '<<SYS>>\\n' + system_message + '\\n<</SYS>>\\n\\n' + message['content'] %}"
    "{% else %}{% set content = message['content'] %}{% endif %}"
    "{% if message['role'] == 'user' %}{{ bos_token + '[INST] ' + content.strip() + ' [/INST]' }}"
    "{% elif message['role'] == 'assistant' %}{{ ' '  + content.strip() + ' ' + eos_token }}{% endif %}{% endfor %}"
)
LLAMA3_INSTRUCT_REFERENCE = (  # meta-llama/Meta-Llama-3-8B-Instruct
    "{% set loop_messages = messages %}{% for message in loop_messages %}"
    "{% set content = '<|start_header_id|>' + message['role'] + '<|end_header_id|>\n\n'+ message['content'] | trim + '<|eot_id|>' %}"
    "{% if loop.index0 == 0 %}{% set content = bos_token + content %}{% endif %}{{ content }}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|start_header_id|>assistant<|end_header_id|>\n\n' }}{% endif %}"
)
CHATML_REFERENCE = (  # the ChatML template of the transformers chat-templating documentation
    "{% for message in messages %}{{'<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n'}}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)

ONE_TURN = [{"role": "user", "content": "你好"}]
MULTI_TURN = [
    {"role": "system", "content": "Be brief."},
    {"role": "user", "content": "Hi"},
    {"role": "assistant", "content": "Hello!"},
    {"role": "user", "content": "法国的首都?"},
]
CONVERSATIONS = [
    ONE_TURN,
    MULTI_TURN,
    MULTI_TURN[1:],
    MULTI_TURN[:3],
    MULTI_TURN[1:3],
    [{"role": "system", "content": ""}, *ONE_TURN],
]

GOLDEN = {
    ("alpaca", "one"): (
        "Below is an instruction that describes a task. Write a response that appropriately completes the request.\n\n"
        "### Instruction:\n你好\n\n### Response: "
    ),
    ("alpaca", "multi"): "Be brief.\n\n### Instruction:\nHi\n\n### Response: Hello!</s>### Instruction:\n法国的首都?\n\n### Response: ",
    ("llama2", "one"): "[INST] <<SYS>>\nYou are a helpful assistant. 你是一个乐于助人的助手。\n<</SYS>>\n\n你好 [/INST]",
    ("llama2", "multi"): "[INST] <<SYS>>\nBe brief.\n<</SYS>>\n\nHi [/INST] Hello! </s><s>[INST] 法国的首都? [/INST]",
    ("llama3", "one"): "<|start_header_id|>user<|end_header_id|>\n\n你好<|eot_id|><|start_header_id|>assistant<|end_header_id|>\n\n",
    ("llama3", "multi"): (
        "<|start_header_id|>system<|end_header_id|>\n\nBe brief.<|eot_id|>"
        "<|start_header_id|>user<|end_header_id|>\n\nHi<|eot_id|><|start_header_id|>assistant<|end_header_id|>\n\nHello!<|eot_id|>"
        "<|start_header_id|>user<|end_header_id|>\n\n法国的首都?<|eot_id|><|start_header_id|>assistant<|end_header_id|>\n\n"
    ),
    ("chatml", "one"): "<|im_start|>user\n你好<|im_end|>\n<|im_start|>assistant\n",
    ("chatml", "multi"): (
        "<|im_start|>system\nBe brief.<|im_end|>\n<|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\nHello!<|im_end|>\n"
        "<|im_start|>user\n法国的首都?<|im_end|>\n<|im_start|>assistant\n"
    ),
}


@pytest.mark.parametrize("name", sorted(TEMPLATES))
def test_golden_strings(name):
    template = TEMPLATES[name]
    assert template.render(ONE_TURN) == GOLDEN[name, "one"]
    assert template.render(MULTI_TURN) == GOLDEN[name, "multi"]


@pytest.mark.parametrize("name", sorted(TEMPLATES))
@pytest.mark.parametrize("conversation", CONVERSATIONS)
@pytest.mark.parametrize("generation_prompt", [True, False])
def test_jinja_twin_renders_the_same_bytes(name, conversation, generation_prompt):
    template = TEMPLATES[name]
    render = jinja_renderer(template.jinja(), bos_token="<s>", eos_token="</s>")
    assert render(conversation, generation_prompt) == template.render(conversation, add_generation_prompt=generation_prompt)


def test_jinja_twin_carries_the_system_prompt_it_was_trained_with():
    render = jinja_renderer(TEMPLATES["alpaca"].jinja(default_system='用"中文"回答。\n'), bos_token="<s>", eos_token="</s>")
    assert render(ONE_TURN, True) == TEMPLATES["alpaca"].render(ONE_TURN, system='用"中文"回答。\n')


@pytest.mark.parametrize(
    "name, reference, writes_bos",
    [("llama2", LLAMA2_CHAT_REFERENCE, True), ("llama3", LLAMA3_INSTRUCT_REFERENCE, True), ("chatml", CHATML_REFERENCE, False)],
)
@pytest.mark.parametrize("conversation", [MULTI_TURN, MULTI_TURN[:3], MULTI_TURN[:2]])
def test_built_ins_match_the_reference_templates(name, reference, writes_bos, conversation):
    """Byte for byte, except that LLaMA-2-chat and Llama-3-Instruct write the BOS text themselves where
    ours leaves it to the tokenizer: after the one BOS rule both give the same token ids. (Conversations
    carry a system message: our llama2 has Chinese-Alpaca-2's default system prompt, the reference none.)"""
    bos = "<|begin_of_text|>" if name == "llama3" else "<s>"
    eos = "<|eot_id|>" if name == "llama3" else "</s>"
    expected = jinja_renderer(reference, bos_token=bos, eos_token=eos)(conversation, conversation[-1]["role"] == "user")
    ours = resolve_template(name, jinja_source=None, bos_token=bos, eos_token=eos).render(conversation)
    if writes_bos:
        assert expected == bos + ours
        assert not bos_needed(expected, bos_token=bos, adds_bos=True) and bos_needed(ours, bos_token=bos, adds_bos=True)
    else:
        assert expected == ours


def test_auto_renders_the_models_own_template_and_falls_back_to_none():
    source = "{% for m in messages %}<{{ m.role }}>{{ m.content }}{% endfor %}{% if add_generation_prompt %}<assistant>{% endif %}"
    auto = resolve_template("auto", jinja_source=source, bos_token="<s>", eos_token="</s>")
    assert auto.name == "auto" and auto.stop == ("</s>",)
    assert auto.render(ONE_TURN, "sys") == "<system>sys<user>你好<assistant>"
    fallback = resolve_template("auto", jinja_source=None, bos_token="<s>", eos_token="</s>")
    assert fallback.is_plain and fallback.name == "none"


@pytest.mark.parametrize("name", sorted(TEMPLATES))
def test_auto_on_a_recorded_built_in_stops_like_the_built_in(name):
    auto = resolve_template("auto", jinja_source=TEMPLATES[name].jinja(), bos_token="<s>", eos_token="</s>")
    assert auto.name == "auto" and set(TEMPLATES[name].stop) <= set(auto.stop) and "</s>" in auto.stop
    assert auto.render(MULTI_TURN) == TEMPLATES[name].render(MULTI_TURN, bos_token="<s>", eos_token="</s>")


def test_none_is_plain_continuation_even_when_the_model_has_a_template():
    plain = resolve_template("none", jinja_source="{{ 'templated' }}", bos_token="<s>", eos_token="</s>")
    assert plain.is_plain and plain.render(ONE_TURN) == "你好"
    turns = [{"role": "user", "content": "a"}, {"role": "assistant", "content": " b"}, {"role": "user", "content": "c"}]
    assert plain.render(turns) == "a b\nc"
    assert [s.trainable for s in plain.segments(turns[:2], add_generation_prompt=False)] == [False, True]


def test_segments_mark_only_answers_trainable():
    segments = resolve_template("chatml", jinja_source=None, bos_token="", eos_token="").segments(MULTI_TURN[:3], add_generation_prompt=False)
    assert [s.text for s in segments if s.trainable] == ["Hello!<|im_end|>"]
    jinja = resolve_template("auto", jinja_source=TEMPLATES["chatml"].jinja(), bos_token="", eos_token="")
    assert "".join(s.text for s in jinja.segments(MULTI_TURN[:3], add_generation_prompt=False)) == "".join(s.text for s in segments)


def test_template_names_are_checked():
    assert set(PROMPT_TEMPLATE_NAMES) == {"alpaca", "llama2", "llama3", "chatml", "auto", "none"}
    with pytest.raises(UsageError, match="unknown template 'vicuna'; choose one of alpaca, llama2, llama3, chatml, auto, none"):
        check_template_name("vicuna")
    with pytest.raises(UsageError, match="unknown template"):
        resolve_template("vicuna", jinja_source=None, bos_token="", eos_token="")


def test_the_one_bos_rule():
    assert bos_needed("Hello", bos_token="<s>", adds_bos=True)
    assert not bos_needed("<s>[INST] Hi", bos_token="<s>", adds_bos=True)
    assert not bos_needed("<|im_start|>user", bos_token="<s>", adds_bos=False)
