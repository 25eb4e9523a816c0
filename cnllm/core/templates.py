"""Chat templates and the one renderer behind sft (loss masks), multiple-choice prompts, chat and serve.

A template turns a conversation into :class:`Segment` s: text pieces marked trainable when they
are assistant output (the answer and its end marker), so SFT can label prompt tokens -100 while
generation renders the same text. :func:`resolve_template` is the only way from a ``--template``
word to a :class:`PromptFormat`: a built-in name (alpaca, llama2, llama3, chatml), ``auto`` (the
model's own Jinja ``chat_template``; a model without one runs as plain continuation) or ``none``
(plain continuation). Each built-in also exists as Jinja (:meth:`ChatTemplate.jinja`) that renders
the same bytes, which sft writes into the adapter's tokenizer so the template travels with the
model through merge-lora and convert-gguf. :func:`bos_needed` is the one BOS rule.

Tools: chatml (Hermes ``<tool_call>`` blocks, as Qwen2.5 writes them) and llama3 (Llama-3.1's JSON calls) render
OpenAI-style ``tools``, assistant ``tool_calls`` and ``tool`` results, in Python and in their Jinja twins; a model's
own Jinja template gets them as transformers passes them. :attr:`PromptFormat.tool_format` says how the model
writes calls (:mod:`cnllm.core.tool_calls` parses them); alpaca, llama2 and plain continuation have none.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from typing import Callable, Optional, Protocol, Sequence

from cnllm.core.errors import UsageError
from cnllm.core.tool_calls import HERMES, LLAMA3_JSON, ToolCall, ToolFormat, read_tool_call

# The Chinese-Alpaca (v1) prompt: a preamble (the system prompt) and Instruction/Response sections.
ALPACA_DEFAULT_SYSTEM = "Below is an instruction that describes a task. Write a response that appropriately completes the request."
ALPACA_TURN = "### Instruction:\n{instruction}\n\n### Response: "
LLAMA2_DEFAULT_SYSTEM = "You are a helpful assistant. 你是一个乐于助人的助手。"
ROLES = ("system", "user", "assistant", "tool")


@dataclass(frozen=True)
class Message:
    role: str
    content: str
    tool_calls: tuple[ToolCall, ...] = ()  # an assistant message's calls
    tool_call_id: str | None = None  # a tool message: the call it answers

    def as_dict(self, call_names: dict[str, str] | None = None) -> dict:
        """The message as chat templates get it; ``tool_calls`` only when there are calls (templates test ``'tool_calls'
        in message``), a tool result with the ``name`` of the call it answers when known."""
        message: dict = {"role": self.role, "content": self.content}
        if self.tool_calls:
            message["tool_calls"] = [call.as_dict() for call in self.tool_calls]
        if self.role == "tool":
            message["tool_call_id"] = self.tool_call_id
            name = (call_names or {}).get(self.tool_call_id or "")
            if name is not None:
                message["name"] = name
        return message


def _read_message(index: int, raw: Message | dict) -> Message:
    if isinstance(raw, Message):
        return raw
    role, content = str(raw.get("role", "")), raw.get("content")
    calls = raw.get("tool_calls") or ()
    if role not in ROLES:
        raise UsageError(f"message {index}: unknown role {role!r} (expected one of {', '.join(ROLES)})")
    if calls and role != "assistant":
        raise UsageError(f"message {index}: only assistant messages make tool calls")
    if content is None and calls:
        content = ""
    if not isinstance(content, str):
        raise UsageError(f"message {index}: content must be a string")
    if not isinstance(calls, (list, tuple)):
        raise UsageError(f"message {index}: tool_calls must be a list")
    tool_calls = tuple(read_tool_call(call, f"message {index}, tool call {n}") for n, call in enumerate(calls))
    call_id = raw.get("tool_call_id")
    return Message(role, content, tool_calls, call_id if isinstance(call_id, str) else None)


def _allowed_after(previous: Message | None) -> tuple[str, ...]:
    """The roles that may follow a turn: a conversation starts with the user and alternates, except that calls are
    answered by one or more tool results, after which the assistant (or the user) speaks."""
    if previous is None:
        return ("user",)
    if previous.role == "user":
        return ("assistant",)
    if previous.role == "assistant":
        return ("tool",) if previous.tool_calls else ("user",)
    return ("tool", "assistant", "user")


@dataclass(frozen=True)
class Segment:
    text: str
    trainable: bool = False


def normalize_messages(messages: Sequence[Message | dict]) -> list[Message]:
    """Validate roles and order: optional system first, then user/assistant turns starting with user."""
    result = []
    for index, raw in enumerate(messages):
        message = _read_message(index, raw)
        if message.role == "system" and index != 0:
            raise UsageError(f"message {index}: a system message may only come first")
        result.append(message)
    turns = [m for m in result if m.role != "system"]
    if not turns:
        raise UsageError("the conversation has no user message")
    previous = None
    for index, message in enumerate(turns):
        allowed = _allowed_after(previous)
        if message.role not in allowed:
            raise UsageError(f"turn {index}: expected a {' or '.join(allowed)} message, got {message.role}")
        previous = message
    return result


def uses_tools(messages: Sequence[Message]) -> bool:
    return any(m.role == "tool" or m.tool_calls for m in messages)


def call_names(messages: Sequence[Message]) -> dict[str, str]:
    """Call id → function name, so a tool result can carry the name of the call it answers."""
    return {call.id: call.name for m in messages for call in m.tool_calls if call.id is not None}


@dataclass(frozen=True)
class ChatTemplate:
    """A built-in template: its segments in Python (trainable parts marked) and the same text as Jinja."""

    name: str
    default_system: str | None
    stop: tuple[str, ...]
    _segments: Callable[[list[Message], str | None, str, str, bool, list[dict]], list[Segment]]
    _jinja: str
    tool_format: ToolFormat | None = None  # how this template's model writes tool calls (None: no tool support)

    def segments(
        self,
        messages: Sequence[Message | dict],
        *,
        system: str | None = None,
        bos_token: str = "<s>",
        eos_token: str = "</s>",
        add_generation_prompt: bool = True,
        tools: Sequence[dict] | None = None,
    ) -> list[Segment]:
        """The conversation as segments; ``system`` overrides a system message and the default; ``tools``: OpenAI
        tool definitions (``{"type": "function", "function": {…}}``) the model is told it may call."""
        msgs = normalize_messages(messages)
        if self.tool_format is None and (tools or uses_tools(msgs)):
            raise UsageError(f"the {self.name} template has no tool calls; {TOOL_TEMPLATES_HINT}")
        if msgs[0].role == "system":
            system = system if system is not None else msgs[0].content
            msgs = msgs[1:]
        if system is None:
            system = self.default_system
        answer_due = msgs[-1].role != "assistant"
        return self._segments(msgs, system, bos_token, eos_token, add_generation_prompt and answer_due, list(tools or ()))

    def render(self, messages: Sequence[Message | dict], **kwargs) -> str:
        return "".join(s.text for s in self.segments(messages, **kwargs))

    def jinja(self, default_system: str | None = None) -> str:
        """The template as a Hugging Face ``chat_template`` (``default_system`` replaces the built-in default)."""
        system = default_system if default_system is not None else self.default_system
        header = JINJA_HEADER.format(name=self.name, system=json.dumps(system, ensure_ascii=False) if system is not None else "none")
        return header + (TOOL_TURN_CHECK if self.tool_format else ALTERNATION_CHECK) + self._jinja


TOOL_TEMPLATES_HINT = "choose a template that has them (chatml, llama3) or serve a model whose own chat template takes tools"


def _pairs(messages: list[Message]) -> list[tuple[str, str | None]]:
    return [(messages[i].content, messages[i + 1].content if i + 1 < len(messages) else None) for i in range(0, len(messages), 2)]


def _alpaca(messages, system, bos, eos, generation_prompt, tools):
    out = []
    for index, (user, answer) in enumerate(_pairs(messages)):
        turn = f"### Instruction:\n{user}\n\n" + ("### Response: " if answer is not None or generation_prompt else "")
        out.append(Segment(f"{system}\n\n{turn}" if index == 0 and system else turn))
        if answer is not None:
            out.append(Segment(answer + eos, trainable=True))
    return out


def _llama2(messages, system, bos, eos, generation_prompt, tools):
    out = []
    for index, (user, answer) in enumerate(_pairs(messages)):
        if index == 0 and system:
            text = f"[INST] <<SYS>>\n{system}\n<</SYS>>\n\n{user} [/INST]"
        else:
            text = f"[INST] {user} [/INST]"
        out.append(Segment(text if index == 0 else bos + text))
        if answer is not None:
            out.append(Segment(f" {answer} {eos}", trainable=True))
    return out


def _tojson(value, indent: int | None = None) -> str:
    """JSON as the ``tojson`` filter of :func:`jinja_renderer` (and transformers) writes it."""
    return json.dumps(value, ensure_ascii=False, indent=indent)


def _header_due(messages: list[Message], index: int, generation_prompt: bool) -> bool:
    """Whether the assistant's header follows turn ``index`` (a user or tool turn): the assistant speaks next, or it is
    the last turn and an answer is asked for."""
    return messages[index + 1].role == "assistant" if index + 1 < len(messages) else generation_prompt


# Qwen2.5's tool prompt (the Hermes function-calling format), put after the system prompt.
HERMES_TOOLS_INTRO = (
    "# Tools\n\nYou may call one or more functions to assist with the user query.\n\n"
    "You are provided with function signatures within <tools></tools> XML tags:\n<tools>"
)
HERMES_TOOLS_OUTRO = (
    "\n</tools>\n\nFor each function call, return a json object with function name and arguments within "
    '<tool_call></tool_call> XML tags:\n<tool_call>\n{"name": <function-name>, "arguments": <args-json-object>}\n</tool_call>'
)
# Llama-3.1's tool prompt, put before the first user message (its template's default, tools_in_user_message).
LLAMA3_TOOLS_INTRO = (
    "Given the following functions, please respond with a JSON for a function call with its proper arguments that best "
    'answers the given prompt.\n\nRespond in the format {"name": function name, "parameters": dictionary of argument name '
    "and its value}.Do not use variables.\n\n"
)
LLAMA3_CALL_SEPARATOR = "; "  # parallel calls, as vLLM's Llama-3 JSON parser reads them (Llama-3.1's own template has one call)


def _chatml(messages, system, bos, eos, generation_prompt, tools):
    header = "<|im_start|>assistant\n"
    out = []
    if tools:
        listed = "".join("\n" + _tojson(tool) for tool in tools)
        out.append(Segment("<|im_start|>system\n" + (system + "\n\n" if system else "") + HERMES_TOOLS_INTRO + listed + HERMES_TOOLS_OUTRO + "<|im_end|>\n"))
    elif system:
        out.append(Segment("<|im_start|>system\n" + system + "<|im_end|>\n"))
    for index, message in enumerate(messages):
        if message.role == "assistant":
            calls = [f'<tool_call>\n{{"name": "{c.name}", "arguments": {_tojson(c.arguments)}}}\n</tool_call>' for c in message.tool_calls]
            answer = "\n".join(([message.content] if message.content else []) + calls) if calls else message.content
            out += [Segment(answer + "<|im_end|>", trainable=True), Segment("\n")]
            continue
        if message.role == "user":
            text = "<|im_start|>user\n" + message.content + "<|im_end|>\n"
        else:  # tool results in a row share one user turn, as Qwen2.5 writes them
            opens = index == 0 or messages[index - 1].role != "tool"
            closes = index + 1 == len(messages) or messages[index + 1].role != "tool"
            text = ("<|im_start|>user" if opens else "") + "\n<tool_response>\n" + message.content + "\n</tool_response>" + ("<|im_end|>\n" if closes else "")
        out.append(Segment(text + (header if _header_due(messages, index, generation_prompt) else "")))
    return out


def _llama3(messages, system, bos, eos, generation_prompt, tools):
    header = "<|start_header_id|>assistant<|end_header_id|>\n\n"
    out = [Segment("<|start_header_id|>system<|end_header_id|>\n\n" + system + "<|eot_id|>")] if system else []
    for index, message in enumerate(messages):
        if message.role == "assistant":
            calls = [f'{{"name": "{c.name}", "parameters": {_tojson(c.arguments)}}}' for c in message.tool_calls]
            answer = LLAMA3_CALL_SEPARATOR.join(calls) if calls else message.content  # a call turn is the JSON alone, as in Llama-3.1
            out.append(Segment(answer + "<|eot_id|>", trainable=True))
            continue
        if message.role == "user":
            listed = LLAMA3_TOOLS_INTRO + "".join(_tojson(tool, indent=4) + "\n\n" for tool in tools) if tools and index == 0 else ""
            text = "<|start_header_id|>user<|end_header_id|>\n\n" + listed + message.content + "<|eot_id|>"
        else:
            text = "<|start_header_id|>ipython<|end_header_id|>\n\n" + message.content + "<|eot_id|>"
        out.append(Segment(text + (header if _header_due(messages, index, generation_prompt) else "")))
    return out


def _lit(text: str) -> str:
    """``text`` as a Jinja string literal."""
    return json.dumps(text)


# The Jinja twins of the segment functions above (tests render both and compare bytes). Every one
# starts with JINJA_HEADER (the system prompt: a system message, else the default), then the role check:
# strict alternation, or for templates with tools, tool results after the calls they answer.
JINJA_HEADER = (
    "{{#- cnllm template: {name} -#}}\n"
    "{{%- set default_system = {system} -%}}\n"
    "{{%- if messages[0]['role'] == 'system' -%}}"
    "{{%- set system = messages[0]['content'] -%}}{{%- set loop_messages = messages[1:] -%}}"
    "{{%- else -%}}"
    "{{%- set system = default_system -%}}{{%- set loop_messages = messages -%}}"
    "{{%- endif -%}}\n"
)
ALTERNATION_CHECK = (
    "{%- for message in loop_messages -%}"
    "{%- if (message['role'] == 'user') != (loop.index0 % 2 == 0) -%}"
    "{{ raise_exception('Conversation roles must alternate user/assistant/user/assistant/...') }}"
    "{%- endif -%}"
    "{%- endfor -%}\n"
)
TOOL_TURN_CHECK = (
    "{%- for message in loop_messages -%}"
    "{%- set before = loop_messages[loop.index0 - 1] if not loop.first else {'role': ''} -%}"
    "{%- set calls_before = before['role'] == 'assistant' and before['tool_calls'] -%}"
    "{%- if message['role'] == 'user' -%}{%- set fits = before['role'] in ['', 'tool'] or (before['role'] == 'assistant' and not calls_before) -%}"
    "{%- elif message['role'] == 'assistant' -%}{%- set fits = before['role'] in ['user', 'tool'] -%}"
    "{%- elif message['role'] == 'tool' -%}{%- set fits = before['role'] == 'tool' or calls_before -%}"
    "{%- else -%}{%- set fits = false -%}"
    "{%- endif -%}"
    "{%- if not fits -%}"
    "{{ raise_exception('Conversation roles must alternate user/assistant/user/assistant/..., tool results following the calls they answer') }}"
    "{%- endif -%}"
    "{%- endfor -%}\n"
)


def _header_due_jinja(header: str) -> str:
    return (
        "{%- if message['role'] != 'assistant' and (add_generation_prompt if loop.last else loop_messages[loop.index0 + 1]['role'] == 'assistant') -%}"
        "{{ " + _lit(header) + " }}{%- endif -%}"
    )


_ASSISTANT_FOLLOWS = "{%- if not loop.last or add_generation_prompt -%}"
ALPACA_JINJA = (
    "{%- for message in loop_messages -%}"
    "{%- if message['role'] == 'user' -%}"
    "{%- if loop.first and system -%}{{ system + '\\n\\n' }}{%- endif -%}"
    "{{ '### Instruction:\\n' + message['content'] + '\\n\\n' }}"
    + _ASSISTANT_FOLLOWS + "{{ '### Response: ' }}{%- endif -%}"
    "{%- else -%}{{ message['content'] + eos_token }}{%- endif -%}"
    "{%- endfor -%}"
)
LLAMA2_JINJA = (
    "{%- for message in loop_messages -%}"
    "{%- if message['role'] == 'user' -%}"
    "{%- if loop.first and system -%}"
    "{{ '[INST] <<SYS>>\\n' + system + '\\n<</SYS>>\\n\\n' + message['content'] + ' [/INST]' }}"
    "{%- else -%}"
    "{{ ('' if loop.first else bos_token) + '[INST] ' + message['content'] + ' [/INST]' }}"
    "{%- endif -%}"
    "{%- else -%}{{ ' ' + message['content'] + ' ' + eos_token }}{%- endif -%}"
    "{%- endfor -%}"
)
LLAMA3_JINJA = (
    "{%- if system -%}{{ '<|start_header_id|>system<|end_header_id|>\\n\\n' + system + '<|eot_id|>' }}{%- endif -%}"
    "{%- for message in loop_messages -%}"
    "{%- if message['role'] == 'user' -%}"
    "{{ '<|start_header_id|>user<|end_header_id|>\\n\\n' }}"
    "{%- if tools and loop.first -%}{{ " + _lit(LLAMA3_TOOLS_INTRO) + " }}"
    "{%- for tool in tools -%}{{ tool | tojson(indent=4) + '\\n\\n' }}{%- endfor -%}{%- endif -%}"
    "{{ message['content'] + '<|eot_id|>' }}"
    "{%- elif message['role'] == 'tool' -%}"
    "{{ '<|start_header_id|>ipython<|end_header_id|>\\n\\n' + message['content'] + '<|eot_id|>' }}"
    "{%- elif message['tool_calls'] -%}"
    "{%- for call in message['tool_calls'] -%}"
    "{%- if not loop.first -%}{{ " + _lit(LLAMA3_CALL_SEPARATOR) + " }}{%- endif -%}"
    "{{ " + _lit('{"name": "') + " + call['function']['name'] + " + _lit('", "parameters": ') + " + call['function']['arguments'] | tojson + '}' }}"
    "{%- endfor -%}{{ '<|eot_id|>' }}"
    "{%- else -%}{{ message['content'] + '<|eot_id|>' }}{%- endif -%}"
    + _header_due_jinja("<|start_header_id|>assistant<|end_header_id|>\n\n")
    + "{%- endfor -%}"
)
CHATML_JINJA = (
    "{%- if tools -%}"
    "{{ '<|im_start|>system\\n' }}{%- if system -%}{{ system + '\\n\\n' }}{%- endif -%}{{ " + _lit(HERMES_TOOLS_INTRO) + " }}"
    "{%- for tool in tools -%}{{ '\\n' + tool | tojson }}{%- endfor -%}{{ " + _lit(HERMES_TOOLS_OUTRO + "<|im_end|>\n") + " }}"
    "{%- elif system -%}{{ '<|im_start|>system\\n' + system + '<|im_end|>\\n' }}{%- endif -%}"
    "{%- for message in loop_messages -%}"
    "{%- if message['role'] == 'user' -%}"
    "{{ '<|im_start|>user\\n' + message['content'] + '<|im_end|>\\n' }}"
    "{%- elif message['role'] == 'tool' -%}"
    "{%- if loop.first or loop_messages[loop.index0 - 1]['role'] != 'tool' -%}{{ '<|im_start|>user' }}{%- endif -%}"
    "{{ '\\n<tool_response>\\n' + message['content'] + '\\n</tool_response>' }}"
    "{%- if loop.last or loop_messages[loop.index0 + 1]['role'] != 'tool' -%}{{ '<|im_end|>\\n' }}{%- endif -%}"
    "{%- elif message['tool_calls'] -%}"
    "{%- if message['content'] -%}{{ message['content'] + '\\n' }}{%- endif -%}"
    "{%- for call in message['tool_calls'] -%}"
    "{%- if not loop.first -%}{{ '\\n' }}{%- endif -%}"
    "{{ " + _lit('<tool_call>\n{"name": "') + " + call['function']['name'] + " + _lit('", "arguments": ') + " + call['function']['arguments'] | tojson + "
    + _lit("}\n</tool_call>") + " }}"
    "{%- endfor -%}{{ '<|im_end|>\\n' }}"
    "{%- else -%}{{ message['content'] + '<|im_end|>\\n' }}{%- endif -%}"
    + _header_due_jinja("<|im_start|>assistant\n")
    + "{%- endfor -%}"
)

TEMPLATES: dict[str, ChatTemplate] = {
    "alpaca": ChatTemplate("alpaca", ALPACA_DEFAULT_SYSTEM, ("### Instruction:",), _alpaca, ALPACA_JINJA),
    "llama2": ChatTemplate("llama2", LLAMA2_DEFAULT_SYSTEM, ("[INST]",), _llama2, LLAMA2_JINJA),
    "llama3": ChatTemplate("llama3", None, ("<|eot_id|>",), _llama3, LLAMA3_JINJA, LLAMA3_JSON),
    "chatml": ChatTemplate("chatml", None, ("<|im_end|>",), _chatml, CHATML_JINJA, HERMES),
}
AUTO, NONE = "auto", "none"
TEMPLATE_NAMES = (*TEMPLATES, AUTO)  # what sft trains with
PROMPT_TEMPLATE_NAMES = (*TEMPLATE_NAMES, NONE)  # what chat, serve and eval accept (none: plain continuation)


def get_template(name: str) -> ChatTemplate:
    """A built-in template by name (``auto`` and ``none`` are resolved by :func:`resolve_template`)."""
    try:
        return TEMPLATES[name]
    except KeyError:
        raise UsageError(f"unknown template {name!r}; choose one of {', '.join(PROMPT_TEMPLATE_NAMES)}") from None


def recorded_template(jinja_source: str) -> ChatTemplate | None:
    """The built-in whose Jinja twin ``jinja_source`` is (the first line names it), so ``auto`` on a model
    sft trained also stops at that template's end marker, as the named template would."""
    match = re.match(r"\{#- cnllm template: (\w+) -#\}", jinja_source)
    return TEMPLATES.get(match.group(1)) if match else None


def check_template_name(name: str, *, allowed: Sequence[str] = PROMPT_TEMPLATE_NAMES) -> str:
    """Validate a ``--template`` word before anything loads."""
    if name not in allowed:
        raise UsageError(f"unknown template {name!r}; choose one of {', '.join(allowed)}")
    return name


def bos_needed(text: str, *, bos_token: str, adds_bos: bool) -> bool:
    """The one BOS rule for training samples, multiple-choice prompts, chat and serve: BOS goes in when
    the model's tokenizer adds one, once: not when the rendered text already starts with it (templates
    such as Llama-3-Instruct's write ``bos_token`` themselves)."""
    return adds_bos and not (bos_token and text.startswith(bos_token))


class Renderer(Protocol):
    def __call__(self, messages: list[dict], add_generation_prompt: bool, tools: Sequence[dict] | None = None) -> str: ...


def _sandbox():
    """The sandbox and helpers transformers gives Jinja chat templates."""
    from datetime import datetime

    from jinja2.exceptions import TemplateError
    from jinja2.sandbox import ImmutableSandboxedEnvironment

    def raise_exception(message):
        raise TemplateError(message)

    def tojson(value, ensure_ascii=False, indent=None, separators=None, sort_keys=False):
        return json.dumps(value, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys)

    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True, extensions=["jinja2.ext.loopcontrols"])
    env.filters["tojson"] = tojson
    env.globals["raise_exception"] = raise_exception
    env.globals["strftime_now"] = lambda format: datetime.now().strftime(format)
    return env


def jinja_renderer(source: str, *, bos_token: str, eos_token: str) -> Renderer:
    """A chat-template renderer; ``tools`` go to the template as transformers' ``apply_chat_template(tools=…)`` passes them."""
    from jinja2.exceptions import TemplateError

    try:
        template = _sandbox().from_string(source)
    except TemplateError as exc:
        raise UsageError(f"the model's chat template does not parse: {exc}; choose a built-in --template") from None

    def render(messages: list[dict], add_generation_prompt: bool, tools: Sequence[dict] | None = None) -> str:
        try:
            return template.render(
                messages=messages,
                tools=list(tools) if tools else None,
                add_generation_prompt=add_generation_prompt,
                bos_token=bos_token,
                eos_token=eos_token,
            )
        except TemplateError as exc:
            raise UsageError(f"the model's chat template rejected the conversation: {exc}") from None

    return render


def jinja_tool_format(source: str) -> tuple[ToolFormat | None, str]:
    """How a model's own template has its model write tool calls, or (None, why not).

    A template takes tools when it reads the ``tools`` variable; the call format is the built-in whose twin it is,
    else recognised from the text the template writes: Hermes ``<tool_call>`` (Qwen2.5, Hermes-2-Pro) or Llama-3.1's
    ``"parameters"`` JSON."""
    recorded = recorded_template(source)
    if recorded is not None:
        return recorded.tool_format, "" if recorded.tool_format else f"the {recorded.name} template has no tool calls; {TOOL_TEMPLATES_HINT}"
    from jinja2 import meta
    from jinja2.exceptions import TemplateError

    try:
        variables = meta.find_undeclared_variables(_sandbox().parse(source))
    except TemplateError:
        return None, "the model's chat template does not parse"
    if "tools" not in variables:
        return None, "the model's chat template does not take tools; choose --template chatml or llama3 if the model was trained on one of their call formats"
    if HERMES.open_tag in source:
        return HERMES, ""
    if '"parameters"' in source:
        return LLAMA3_JSON, ""
    return None, (
        "the model's chat template takes tools, but writes calls in a format cnllm does not read "
        "(it reads Hermes <tool_call> blocks and Llama-3.1 JSON calls)"
    )


def jinja_segments(
    render: Renderer,
    messages: Sequence[Message | dict],
    *,
    system: str | None = None,
    add_generation_prompt: bool = True,
    tools: Sequence[dict] | None = None,
) -> list[Segment]:
    """Segments from a Jinja template (``render(messages, add_generation_prompt, tools)``).

    Each assistant span is found by rendering the conversation up to its user turn with the
    generation prompt, then including the answer: the difference is the trainable part.
    """
    msgs = normalize_messages(messages)
    if system is not None:
        msgs = [Message("system", system)] + [m for m in msgs if m.role != "system"]
    names = call_names(msgs)
    as_dicts = [m.as_dict(names) for m in msgs]
    segments: list[Segment] = []
    rendered = ""
    for index, message in enumerate(as_dicts):
        if message["role"] != "assistant":
            continue
        prefix = render(as_dicts[:index], True, tools)
        full = render(as_dicts[: index + 1], False, tools)
        if not prefix.startswith(rendered) or not full.startswith(prefix):
            raise UsageError("the chat template does not render conversations incrementally; choose a built-in --template")
        segments.append(Segment(prefix[len(rendered):]))
        segments.append(Segment(full[len(prefix):], trainable=True))
        rendered = full
    if as_dicts[-1]["role"] != "assistant":
        final = render(as_dicts, add_generation_prompt, tools)
        segments.append(Segment(final[len(rendered):]))
    return [s for s in segments if s.text]


def plain_segments(messages: Sequence[Message | dict], system: str | None) -> list[Segment]:
    """No template (``none``): the conversation as running text, each answer continuing its prompt."""
    msgs = normalize_messages(messages)
    if uses_tools(msgs):
        raise UsageError(f"plain continuation (template none) has no tool calls; {TOOL_TEMPLATES_HINT}")
    if msgs[0].role == "system":
        system = system if system is not None else msgs[0].content
        msgs = msgs[1:]
    segments = [Segment(f"{system}\n\n")] if system else []
    text = segments[0].text if segments else ""
    for message in msgs:
        piece = message.content if message.role == "assistant" else ("\n" if text and not text.endswith("\n") else "") + message.content
        segments.append(Segment(piece, trainable=message.role == "assistant"))
        text += piece
    return [s for s in segments if s.text]


SegmentsFn = Callable[[Sequence[Message | dict], Optional[str], bool, Optional[Sequence[dict]]], list[Segment]]


@dataclass(frozen=True)
class PromptFormat:
    """How conversations become text for one model: what :func:`resolve_template` returns."""

    name: str  # a built-in name, "auto" (the model's own Jinja template) or "none" (plain continuation)
    stop: tuple[str, ...]
    _segments: SegmentsFn
    tool_format: ToolFormat | None = None  # how the model writes tool calls; None: the template takes no tools
    no_tools_reason: str = ""  # why not, for the error a request with tools gets

    @property
    def is_plain(self) -> bool:
        return self.name == NONE

    def segments(
        self, messages: Sequence[Message | dict], system: str | None = None, *, add_generation_prompt: bool = True, tools: Sequence[dict] | None = None
    ) -> list[Segment]:
        if tools and self.tool_format is None:
            raise UsageError(self.no_tools_reason)
        return self._segments(messages, system, add_generation_prompt, tools)

    def render(self, messages: Sequence[Message | dict], system: str | None = None, *, tools: Sequence[dict] | None = None) -> str:
        """The prompt for the next answer (the generation prompt included); ``tools``: OpenAI tool definitions."""
        return "".join(s.text for s in self.segments(messages, system, tools=tools))


def resolve_template(name: str | None, *, jinja_source: str | None, bos_token: str, eos_token: str) -> PromptFormat:
    """The one way from a ``--template`` word to a renderer. ``auto`` (or None) is the model's own Jinja
    template; a model without one runs as plain continuation, exactly like ``none`` (callers say so)."""
    name = check_template_name(name or AUTO)
    if name in TEMPLATES:
        built_in = TEMPLATES[name]
        return PromptFormat(
            name,
            built_in.stop,
            lambda messages, system, generation, tools: built_in.segments(
                messages, system=system, bos_token=bos_token, eos_token=eos_token, add_generation_prompt=generation, tools=tools
            ),
            built_in.tool_format,
            f"the {name} template has no tool calls; {TOOL_TEMPLATES_HINT}",
        )
    if name == AUTO and jinja_source:
        render = jinja_renderer(jinja_source, bos_token=bos_token, eos_token=eos_token)
        recorded = recorded_template(jinja_source)
        stops = tuple(dict.fromkeys(((eos_token,) if eos_token else ()) + (recorded.stop if recorded else ())))
        tool_format, reason = jinja_tool_format(jinja_source)
        return PromptFormat(
            AUTO,
            stops,
            lambda messages, system, generation, tools: jinja_segments(render, messages, system=system, add_generation_prompt=generation, tools=tools),
            tool_format,
            reason,
        )
    reason = f"plain continuation ({'--template none' if name == NONE else 'the model has no chat template'}) has no tool calls; {TOOL_TEMPLATES_HINT}"
    return PromptFormat(NONE, (), lambda messages, system, generation, tools: plain_segments(messages, system), None, reason)
