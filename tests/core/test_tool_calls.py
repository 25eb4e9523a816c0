"""Reading tool calls out of answers: each template family's format, whole and streamed in pieces (the same result
either way), text that only looks like a call, and the schema that forces one."""

import json

import pytest

from cnllm.core.errors import UsageError
from cnllm.core.tool_calls import HERMES, LLAMA3_JSON, ParsedCall, ToolCall, read_tool_call

NAMES = ("get_weather", "now")
BEIJING = ParsedCall("get_weather", '{"city": "北京"}')


def streamed(format, text: str, size: int, **kwargs) -> tuple[str, list[ParsedCall]]:
    """The answer fed ``size`` characters at a time: the content and calls the events add up to."""
    parser = format.parser(NAMES, **kwargs)
    events = [event for at in range(0, len(text), size) for event in parser.feed(text[at : at + size])] + parser.finish()
    return "".join(e for e in events if isinstance(e, str)), [e for e in events if isinstance(e, ParsedCall)]


HERMES_CASES = [
    ('<tool_call>\n{"name": "get_weather", "arguments": {"city": "北京"}}\n</tool_call>', "", [BEIJING]),
    (
        '我查一下。\n<tool_call>\n{"name": "get_weather", "arguments": {"city": "北京"}}\n</tool_call>\n'
        '<tool_call>\n{"name": "now", "arguments": {}}\n</tool_call>\n',
        "我查一下。",
        [BEIJING, ParsedCall("now", "{}")],
    ),
    ('<tool_call>{"name": "get_weather", "arguments": "{\\"city\\": \\"北京\\"}"}', "", [BEIJING]),  # unclosed at EOS, string arguments
    ('<tool_call>{"name": "now", "parameters": {}}</tool_call> 好的', "好的", [ParsedCall("now", "{}")]),
    ("天气不错，a < b <tool", "天气不错，a < b <tool", []),  # a tag's first letters at the end stay text
    ('<tool_call>{"name": "rm_rf", "arguments": {}}</tool_call>', '<tool_call>{"name": "rm_rf", "arguments": {}}</tool_call>', []),
    ("<tool_call>{not json}</tool_call>\n", "<tool_call>{not json}</tool_call>\n", []),  # no call: the text as it was
    ('<tool_call>{"name": "now", "arguments": [1]}</tool_call>', '<tool_call>{"name": "now", "arguments": [1]}</tool_call>', []),
    ("plain answer\n\n", "plain answer\n\n", []),
]


@pytest.mark.parametrize("text, content, calls", HERMES_CASES)
def test_hermes_calls_whole_and_streamed(text, content, calls):
    assert HERMES.parse(text, NAMES) == (content, calls)
    for size in (1, 2, 5, 11):
        assert streamed(HERMES, text, size) == (content, calls), size


def test_content_before_a_call_streams_before_the_call_is_complete():
    parser = HERMES.parser(NAMES)
    assert parser.feed("Let me check.") == ["Let me check."]
    assert parser.feed("\n<tool") == []  # whitespace and a possible tag held back
    assert parser.feed('_call>{"name": "now", "arguments": {}}') == []
    assert parser.feed("</tool_call>") == [ParsedCall("now", "{}")]
    assert parser.feed("\n") == [] and parser.finish() == []


LLAMA3_CASES = [
    ('{"name": "get_weather", "parameters": {"city": "北京"}}', "", [BEIJING]),
    ('{"name": "get_weather", "parameters": {"city": "北京"}}; {"name": "now", "parameters": {}}', "", [BEIJING, ParsedCall("now", "{}")]),
    ('[{"name": "now", "arguments": {}}]', "", [ParsedCall("now", "{}")]),
    ('{"name": "get_weather", "parameters": {"city": "北京"}} and more', '{"name": "get_weather", "parameters": {"city": "北京"}} and more', []),
    ('{"answer": 42}', '{"answer": 42}', []),
    ("北京今天晴。", "北京今天晴。", []),
    ('{"name": "now", "parameters": {', '{"name": "now", "parameters": {', []),  # cut by max_tokens
]


@pytest.mark.parametrize("text, content, calls", LLAMA3_CASES)
def test_llama3_json_calls_whole_and_streamed(text, content, calls):
    assert LLAMA3_JSON.parse(text, NAMES) == (content, calls)
    for size in (1, 3, 7):
        assert streamed(LLAMA3_JSON, text, size) == (content, calls), size


def test_text_that_is_not_json_streams_at_once_in_the_json_format():
    parser = LLAMA3_JSON.parser(NAMES)
    assert parser.feed("北京") == ["北京"] and parser.feed("今天晴") == ["今天晴"]


def test_a_forced_hermes_call_is_the_json_alone():
    """After the prompt's ``<tool_call>`` the grammar writes just the object."""
    text = '{"name": "get_weather", "arguments": {"city": "北京"}}'
    assert HERMES.parse(text, NAMES, forced=True) == ("", [BEIJING])
    assert streamed(HERMES, text, 4, forced=True) == ("", [BEIJING])
    assert HERMES.forced_prefix == "<tool_call>\n" and LLAMA3_JSON.forced_prefix == ""


def test_call_schema():
    tools = [{"name": "get_weather", "parameters": {"type": "object", "properties": {"city": {"type": "string"}}}}, {"name": "now"}]
    assert LLAMA3_JSON.call_schema(tools[:1]) == {
        "allOf": [
            {"type": "object", "properties": {"name": {"const": "get_weather"}}, "required": ["name"]},
            {"type": "object", "properties": {"parameters": tools[0]["parameters"]}, "required": ["parameters"]},
        ]
    }
    both = HERMES.call_schema(tools)
    assert [option["allOf"][0]["properties"]["name"]["const"] for option in both["anyOf"]] == ["get_weather", "now"]
    assert both["anyOf"][1]["allOf"][1]["properties"]["arguments"] == {"type": "object", "properties": {}, "additionalProperties": False}


def test_call_schema_grammar_writes_the_name_first():
    """Through llama.cpp's JSON-schema converter as the backend hands it schemas (sorted keys): the name comes first,
    as the template's model writes it, and nothing else gets in (skips without llama-cpp)."""
    pytest.importorskip("llama_cpp")
    from cnllm.core.generation.llamacpp import schema_grammar

    grammar = schema_grammar(json.dumps(HERMES.call_schema([{"name": "now"}]), sort_keys=True))
    root = next(line for line in grammar.splitlines() if line.startswith("root ::="))
    assert root == 'root ::= "{" space name-kv "," space arguments-kv "}" space'
    assert 'name ::= "\\"now\\""' in grammar and 'arguments ::= "{" space  "}" space' in grammar


def test_calls_in_a_conversation():
    assert read_tool_call({"id": "c1", "type": "function", "function": {"name": "now", "arguments": "{}"}}, "m") == ToolCall("now", {}, "c1")
    assert read_tool_call({"name": "now", "arguments": {"a": 1}}, "m").as_dict() == {"type": "function", "function": {"name": "now", "arguments": {"a": 1}}}
    for raw, message in (
        ({"function": {"name": "now", "arguments": "{oops"}}, "not valid JSON"),
        ({"function": {"name": "now", "arguments": "[1]"}}, "must be a JSON object"),
        ({"function": {"arguments": "{}"}}, "needs a function name"),
        ("now()", "must be an object"),
    ):
        with pytest.raises(UsageError, match=message):
            read_tool_call(raw, "message 2, tool call 0")
