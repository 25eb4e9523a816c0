"""Golden strings for every built-in template, their Jinja twins, and the published reference templates."""

import pytest

from cnllm.core.errors import UsageError
from cnllm.core.templates import (
    PROMPT_TEMPLATE_NAMES,
    TEMPLATES,
    bos_needed,
    call_names,
    check_template_name,
    jinja_renderer,
    jinja_tool_format,
    normalize_messages,
    resolve_template,
)
from cnllm.core.tool_calls import HERMES, LLAMA3_JSON

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

QWEN25_REFERENCE = (  # Qwen/Qwen2.5-7B-Instruct
    "{%- if tools %}\n"
    "    {{- '<|im_start|>system\\n' }}\n"
    "    {%- if messages[0]['role'] == 'system' %}\n"
    "        {{- messages[0]['content'] }}\n"
    "    {%- else %}\n"
    "        {{- 'You are Qwen, created by Alibaba Cloud. You are a helpful assistant.' }}\n"
    "    {%- endif %}\n"
    '    {{- "\\n\\n# Tools\\n\\nYou may call one or more functions to assist with the user query.\\n\\nYou are provided with function signatures within <tools></tools> XML tags:\\n<tools>" }}\n'
    "    {%- for tool in tools %}\n"
    '        {{- "\\n" }}\n'
    "        {{- tool | tojson }}\n"
    "    {%- endfor %}\n"
    '    {{- "\\n</tools>\\n\\nFor each function call, return a json object with function name and arguments within <tool_call></tool_call> XML tags:\\n<tool_call>\\n{\\"name\\": <function-name>, \\"arguments\\": <args-json-object>}\\n</tool_call><|im_end|>\\n" }}\n'
    "{%- else %}\n"
    "    {%- if messages[0]['role'] == 'system' %}\n"
    "        {{- '<|im_start|>system\\n' + messages[0]['content'] + '<|im_end|>\\n' }}\n"
    "    {%- else %}\n"
    "        {{- '<|im_start|>system\\nYou are Qwen, created by Alibaba Cloud. You are a helpful assistant.<|im_end|>\\n' }}\n"
    "    {%- endif %}\n"
    "{%- endif %}\n"
    "{%- for message in messages %}\n"
    '    {%- if (message.role == "user") or (message.role == "system" and not loop.first) or (message.role == "assistant" and not message.tool_calls) %}\n'
    "        {{- '<|im_start|>' + message.role + '\\n' + message.content + '<|im_end|>' + '\\n' }}\n"
    '    {%- elif message.role == "assistant" %}\n'
    "        {{- '<|im_start|>' + message.role }}\n"
    "        {%- if message.content %}\n"
    "            {{- '\\n' + message.content }}\n"
    "        {%- endif %}\n"
    "        {%- for tool_call in message.tool_calls %}\n"
    "            {%- if tool_call.function is defined %}\n"
    "                {%- set tool_call = tool_call.function %}\n"
    "            {%- endif %}\n"
    "            {{- '\\n<tool_call>\\n{\"name\": \"' }}\n"
    "            {{- tool_call.name }}\n"
    "            {{- '\", \"arguments\": ' }}\n"
    "            {{- tool_call.arguments | tojson }}\n"
    "            {{- '}\\n</tool_call>' }}\n"
    "        {%- endfor %}\n"
    "        {{- '<|im_end|>\\n' }}\n"
    '    {%- elif message.role == "tool" %}\n'
    '        {%- if (loop.index0 == 0) or (messages[loop.index0 - 1].role != "tool") %}\n'
    "            {{- '<|im_start|>user' }}\n"
    "        {%- endif %}\n"
    "        {{- '\\n<tool_response>\\n' }}\n"
    "        {{- message.content }}\n"
    "        {{- '\\n</tool_response>' }}\n"
    '        {%- if loop.last or (messages[loop.index0 + 1].role != "tool") %}\n'
    "            {{- '<|im_end|>\\n' }}\n"
    "        {%- endif %}\n"
    "    {%- endif %}\n"
    "{%- endfor %}\n"
    "{%- if add_generation_prompt %}\n"
    "    {{- '<|im_start|>assistant\\n' }}\n"
    "{%- endif %}\n"
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


TOOLS = [
    {
        "type": "function",
        "function": {
            "name": "get_weather",
            "description": "今天的天气",
            "parameters": {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]},
        },
    },
    {"type": "function", "function": {"name": "now"}},
]
TOOL_TURNS = [
    {"role": "system", "content": "Be brief."},
    {"role": "user", "content": "北京和上海天气?"},
    {
        "role": "assistant",
        "content": None,
        "tool_calls": [
            {"id": "c1", "type": "function", "function": {"name": "get_weather", "arguments": '{"city": "北京"}'}},
            {"id": "c2", "type": "function", "function": {"name": "get_weather", "arguments": '{"city": "上海"}'}},
        ],
    },
    {"role": "tool", "tool_call_id": "c1", "content": "晴"},
    {"role": "tool", "tool_call_id": "c2", "content": "雨"},
    {"role": "assistant", "content": "北京晴，上海雨。"},
    {"role": "user", "content": "现在几点?"},
]
TOOL_CONVERSATIONS = [TOOL_TURNS, TOOL_TURNS[:3], TOOL_TURNS[:4], TOOL_TURNS[:5], TOOL_TURNS[1:6], MULTI_TURN]


def as_template_input(conversation) -> list[dict]:
    """The messages as jinja_segments hands them to a Jinja template (arguments as objects, tool results named)."""
    messages = normalize_messages(conversation)
    return [m.as_dict(call_names(messages)) for m in messages]


@pytest.mark.parametrize("name", ["chatml", "llama3"])
@pytest.mark.parametrize("conversation", TOOL_CONVERSATIONS)
@pytest.mark.parametrize("tools", [TOOLS, None])
@pytest.mark.parametrize("generation_prompt", [True, False])
def test_jinja_twins_render_tools_the_same(name, conversation, tools, generation_prompt):
    template = TEMPLATES[name]
    render = jinja_renderer(template.jinja(), bos_token="<s>", eos_token="</s>")
    expected = template.render(conversation, tools=tools, add_generation_prompt=generation_prompt)
    assert render(as_template_input(conversation), generation_prompt, tools) == expected


@pytest.mark.parametrize("conversation", TOOL_CONVERSATIONS)
@pytest.mark.parametrize("tools", [TOOLS, None])
def test_chatml_with_tools_is_qwen25s_template(conversation, tools):
    """Byte for byte (conversations with a system message: Qwen's default system prompt is not ours)."""
    if conversation[0]["role"] != "system":
        conversation = [{"role": "system", "content": "S"}, *conversation]
    ours = resolve_template("chatml", jinja_source=None, bos_token="", eos_token="<|im_end|>")
    qwen = resolve_template("auto", jinja_source=QWEN25_REFERENCE, bos_token="", eos_token="<|im_end|>")
    assert qwen.render(conversation, tools=tools) == ours.render(conversation, tools=tools)


def test_tool_golden_strings():
    chatml = TEMPLATES["chatml"].render(TOOL_TURNS[1:4], tools=TOOLS[1:])
    assert chatml == (
        "<|im_start|>system\n# Tools\n\nYou may call one or more functions to assist with the user query.\n\n"
        "You are provided with function signatures within <tools></tools> XML tags:\n<tools>\n"
        '{"type": "function", "function": {"name": "now"}}\n</tools>\n\n'
        "For each function call, return a json object with function name and arguments within <tool_call></tool_call> XML tags:\n"
        '<tool_call>\n{"name": <function-name>, "arguments": <args-json-object>}\n</tool_call><|im_end|>\n'
        "<|im_start|>user\n北京和上海天气?<|im_end|>\n<|im_start|>assistant\n"
        '<tool_call>\n{"name": "get_weather", "arguments": {"city": "北京"}}\n</tool_call>\n'
        '<tool_call>\n{"name": "get_weather", "arguments": {"city": "上海"}}\n</tool_call><|im_end|>\n'
        "<|im_start|>user\n<tool_response>\n晴\n</tool_response><|im_end|>\n<|im_start|>assistant\n"
    )
    llama3 = TEMPLATES["llama3"].render(TOOL_TURNS[1:4], tools=TOOLS[1:])
    assert llama3 == (
        "<|start_header_id|>user<|end_header_id|>\n\nGiven the following functions, please respond with a JSON for a function "
        "call with its proper arguments that best answers the given prompt.\n\nRespond in the format "
        '{"name": function name, "parameters": dictionary of argument name and its value}.Do not use variables.\n\n'
        '{\n    "type": "function",\n    "function": {\n        "name": "now"\n    }\n}\n\n北京和上海天气?<|eot_id|>'
        '<|start_header_id|>assistant<|end_header_id|>\n\n{"name": "get_weather", "parameters": {"city": "北京"}}; '
        '{"name": "get_weather", "parameters": {"city": "上海"}}<|eot_id|>'
        "<|start_header_id|>ipython<|end_header_id|>\n\n晴<|eot_id|><|start_header_id|>assistant<|end_header_id|>\n\n"
    )


def test_calls_are_trainable_answers():
    for source in (None, TEMPLATES["chatml"].jinja()):
        prompt_format = resolve_template("auto" if source else "chatml", jinja_source=source, bos_token="", eos_token="")
        segments = prompt_format.segments(TOOL_TURNS[:6], add_generation_prompt=False, tools=TOOLS)
        trainable = [s.text.rstrip("\n") for s in segments if s.trainable]  # the Jinja path counts the newline after the end marker
        assert trainable[0].startswith("<tool_call>\n") and trainable[0].endswith("</tool_call><|im_end|>")
        assert trainable[1] == "北京晴，上海雨。<|im_end|>" and len(trainable) == 2


BAD_TOOL_ORDERS = [
    ([{"role": "user", "content": "a"}, {"role": "tool", "content": "r"}], "turn 1: expected a assistant message, got tool"),
    ([*TOOL_TURNS[1:3], {"role": "user", "content": "b"}], "turn 2: expected a tool message, got user"),
    ([*MULTI_TURN[1:3], {"role": "tool", "content": "r"}], "turn 2: expected a user message, got tool"),
]


@pytest.mark.parametrize(
    "conversation, message",
    [
        *BAD_TOOL_ORDERS,
        ([{"role": "user", "content": "a", "tool_calls": [{"function": {"name": "now"}}]}], "only assistant messages make tool calls"),
        ([TOOL_TURNS[1], {"role": "assistant", "content": None, "tool_calls": [{"function": {"name": "now", "arguments": "{"}}]}], "not valid JSON"),
    ],
)
def test_tool_turns_are_checked(conversation, message):
    with pytest.raises(UsageError, match=message):
        normalize_messages(conversation)


@pytest.mark.parametrize("name", ["chatml", "llama3"])
@pytest.mark.parametrize("conversation", [c for c, _ in BAD_TOOL_ORDERS])
def test_the_twins_refuse_the_same_orders(name, conversation):
    render = jinja_renderer(TEMPLATES[name].jinja(), bos_token="", eos_token="")
    with pytest.raises(UsageError, match="roles must alternate"):
        render(conversation, True)


@pytest.mark.parametrize("name", ["alpaca", "llama2", "none"])
def test_templates_without_tool_calls_refuse_them(name):
    prompt_format = resolve_template(name, jinja_source=None, bos_token="", eos_token="")
    assert prompt_format.tool_format is None and "has no tool calls" in prompt_format.no_tools_reason
    with pytest.raises(UsageError, match="has no tool calls"):
        prompt_format.render(ONE_TURN, tools=TOOLS)
    with pytest.raises(UsageError, match="has no tool calls"):
        prompt_format.render(TOOL_TURNS[:5])  # nor can they write a conversation that has calls in it
    assert prompt_format.render(ONE_TURN)


LLAMA31_TOOL_EXCERPT = (  # the part of Llama-3.1-Instruct's template that writes a call
    "{%- if tools is not none %}{{ tools | length }}{%- endif %}{%- for message in messages %}{%- if 'tool_calls' in message %}{%- set tool_call = message.tool_calls[0].function %}"
    "{{- '{\"name\": \"' + tool_call.name + '\", ' }}{{- '\"parameters\": ' }}{{- tool_call.arguments | tojson }}{{- '}' }}"
    "{%- else %}{{ message.content }}{%- endif %}{%- endfor %}"
)


def test_the_models_own_template_says_how_it_calls_tools():
    assert jinja_tool_format(QWEN25_REFERENCE) == (HERMES, "")
    assert jinja_tool_format(LLAMA31_TOOL_EXCERPT) == (LLAMA3_JSON, "")
    for name in TEMPLATES:  # a recorded built-in: that built-in's format
        assert jinja_tool_format(TEMPLATES[name].jinja())[0] is TEMPLATES[name].tool_format
    assert TEMPLATES["chatml"].tool_format is HERMES and TEMPLATES["llama3"].tool_format is LLAMA3_JSON
    fmt, reason = jinja_tool_format(CHATML_REFERENCE)
    assert fmt is None and "does not take tools" in reason
    fmt, reason = jinja_tool_format("{{ tools | tojson }}[TOOL_CALLS]{{ messages[0].content }}")
    assert fmt is None and "format cnllm does not read" in reason
    auto = resolve_template("auto", jinja_source=LLAMA31_TOOL_EXCERPT, bos_token="", eos_token="")
    assert auto.tool_format is LLAMA3_JSON
    assert auto.render(TOOL_TURNS[1:3], tools=TOOLS)== '2北京和上海天气?{"name": "get_weather", "parameters": {"city": "北京"}}'
