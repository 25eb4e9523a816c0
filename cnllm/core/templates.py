"""Chat templates and the one renderer behind sft (loss masks), multiple-choice prompts, chat and serve.

A template turns a conversation into :class:`Segment` s: text pieces marked trainable when they
are assistant output (the answer and its end marker), so SFT can label prompt tokens -100 while
generation renders the same text. :func:`resolve_template` is the only way from a ``--template``
word to a :class:`PromptFormat`: a built-in name (alpaca, llama2, llama3, chatml), ``auto`` (the
model's own Jinja ``chat_template``; a model without one runs as plain continuation) or ``none``
(plain continuation). Each built-in also exists as Jinja (:meth:`ChatTemplate.jinja`) that renders
the same bytes, which sft writes into the adapter's tokenizer so the template travels with the
model through merge-lora and convert-gguf. :func:`bos_needed` is the one BOS rule.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from typing import Callable, Sequence

from cnllm.core.errors import UsageError

# The Chinese-Alpaca (v1) prompt: a preamble (the system prompt) and Instruction/Response sections.
ALPACA_DEFAULT_SYSTEM = "Below is an instruction that describes a task. Write a response that appropriately completes the request."
ALPACA_TURN = "### Instruction:\n{instruction}\n\n### Response: "
LLAMA2_DEFAULT_SYSTEM = "You are a helpful assistant. 你是一个乐于助人的助手。"
ROLES = ("system", "user", "assistant")


@dataclass(frozen=True)
class Message:
    role: str
    content: str


@dataclass(frozen=True)
class Segment:
    text: str
    trainable: bool = False


def normalize_messages(messages: Sequence[Message | dict]) -> list[Message]:
    """Validate roles and order: optional system first, then user/assistant turns starting with user."""
    result = []
    for index, raw in enumerate(messages):
        role, content = (raw.role, raw.content) if isinstance(raw, Message) else (str(raw.get("role", "")), raw.get("content"))
        if role not in ROLES:
            raise UsageError(f"message {index}: unknown role {role!r} (expected one of {', '.join(ROLES)})")
        if not isinstance(content, str):
            raise UsageError(f"message {index}: content must be a string")
        if role == "system" and index != 0:
            raise UsageError(f"message {index}: a system message may only come first")
        result.append(raw if isinstance(raw, Message) else Message(role, content))
    turns = [m for m in result if m.role != "system"]
    if not turns:
        raise UsageError("the conversation has no user message")
    for index, message in enumerate(turns):
        expected = "user" if index % 2 == 0 else "assistant"
        if message.role != expected:
            raise UsageError(f"turn {index}: expected a {expected} message, got {message.role}")
    return result


@dataclass(frozen=True)
class ChatTemplate:
    """A built-in template: its segments in Python (trainable parts marked) and the same text as Jinja."""

    name: str
    default_system: str | None
    stop: tuple[str, ...]
    _segments: Callable[[list[Message], str | None, str, str, bool], list[Segment]]
    _jinja: str

    def segments(
        self,
        messages: Sequence[Message | dict],
        *,
        system: str | None = None,
        bos_token: str = "<s>",
        eos_token: str = "</s>",
        add_generation_prompt: bool = True,
    ) -> list[Segment]:
        """The conversation as segments; ``system`` overrides a system message and the default."""
        msgs = normalize_messages(messages)
        if msgs[0].role == "system":
            system = system if system is not None else msgs[0].content
            msgs = msgs[1:]
        if system is None:
            system = self.default_system
        ends_with_user = msgs[-1].role == "user"
        return self._segments(msgs, system, bos_token, eos_token, add_generation_prompt and ends_with_user)

    def render(self, messages: Sequence[Message | dict], **kwargs) -> str:
        return "".join(s.text for s in self.segments(messages, **kwargs))

    def jinja(self, default_system: str | None = None) -> str:
        """The template as a Hugging Face ``chat_template`` (``default_system`` replaces the built-in default)."""
        system = default_system if default_system is not None else self.default_system
        return JINJA_HEADER.format(name=self.name, system=json.dumps(system, ensure_ascii=False) if system is not None else "none") + self._jinja


def _pairs(messages: list[Message]) -> list[tuple[str, str | None]]:
    return [(messages[i].content, messages[i + 1].content if i + 1 < len(messages) else None) for i in range(0, len(messages), 2)]


def _alpaca(messages, system, bos, eos, generation_prompt):
    out = []
    for index, (user, answer) in enumerate(_pairs(messages)):
        turn = f"### Instruction:\n{user}\n\n" + ("### Response: " if answer is not None or generation_prompt else "")
        out.append(Segment(f"{system}\n\n{turn}" if index == 0 and system else turn))
        if answer is not None:
            out.append(Segment(answer + eos, trainable=True))
    return out


def _llama2(messages, system, bos, eos, generation_prompt):
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


def _role_blocks(system_block: tuple[str, str], user_block: tuple[str, str], assistant_header: str, answer_end: str, after_answer: str = ""):
    """Segments for templates that wrap each role's text in markers (Llama-3, ChatML): ``(open, close)`` pairs."""

    def segments(messages, system, bos, eos, generation_prompt):
        out = [Segment(system_block[0] + system + system_block[1])] if system else []
        for user, answer in _pairs(messages):
            header = assistant_header if answer is not None or generation_prompt else ""
            out.append(Segment(user_block[0] + user + user_block[1] + header))
            if answer is not None:
                out.append(Segment(answer + answer_end, trainable=True))
                if after_answer:
                    out.append(Segment(after_answer))
        return out

    return segments


_llama3 = _role_blocks(
    ("<|start_header_id|>system<|end_header_id|>\n\n", "<|eot_id|>"),
    ("<|start_header_id|>user<|end_header_id|>\n\n", "<|eot_id|>"),
    "<|start_header_id|>assistant<|end_header_id|>\n\n",
    "<|eot_id|>",
)
_chatml = _role_blocks(("<|im_start|>system\n", "<|im_end|>\n"), ("<|im_start|>user\n", "<|im_end|>\n"), "<|im_start|>assistant\n", "<|im_end|>", "\n")


# The Jinja twins of the segment functions above (tests render both and compare bytes). Every one
# starts with JINJA_HEADER: the system prompt (a system message, else the default) and role checks.
JINJA_HEADER = (
    "{{#- cnllm template: {name} -#}}\n"
    "{{%- set default_system = {system} -%}}\n"
    "{{%- if messages[0]['role'] == 'system' -%}}"
    "{{%- set system = messages[0]['content'] -%}}{{%- set loop_messages = messages[1:] -%}}"
    "{{%- else -%}}"
    "{{%- set system = default_system -%}}{{%- set loop_messages = messages -%}}"
    "{{%- endif -%}}\n"
    "{{%- for message in loop_messages -%}}"
    "{{%- if (message['role'] == 'user') != (loop.index0 % 2 == 0) -%}}"
    "{{{{ raise_exception('Conversation roles must alternate user/assistant/user/assistant/...') }}}}"
    "{{%- endif -%}}"
    "{{%- endfor -%}}\n"
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
    "{{ '<|start_header_id|>user<|end_header_id|>\\n\\n' + message['content'] + '<|eot_id|>' }}"
    + _ASSISTANT_FOLLOWS + "{{ '<|start_header_id|>assistant<|end_header_id|>\\n\\n' }}{%- endif -%}"
    "{%- else -%}{{ message['content'] + '<|eot_id|>' }}{%- endif -%}"
    "{%- endfor -%}"
)
CHATML_JINJA = (
    "{%- if system -%}{{ '<|im_start|>system\\n' + system + '<|im_end|>\\n' }}{%- endif -%}"
    "{%- for message in loop_messages -%}"
    "{%- if message['role'] == 'user' -%}"
    "{{ '<|im_start|>user\\n' + message['content'] + '<|im_end|>\\n' }}"
    + _ASSISTANT_FOLLOWS + "{{ '<|im_start|>assistant\\n' }}{%- endif -%}"
    "{%- else -%}{{ message['content'] + '<|im_end|>\\n' }}{%- endif -%}"
    "{%- endfor -%}"
)

TEMPLATES: dict[str, ChatTemplate] = {
    "alpaca": ChatTemplate("alpaca", ALPACA_DEFAULT_SYSTEM, ("### Instruction:",), _alpaca, ALPACA_JINJA),
    "llama2": ChatTemplate("llama2", LLAMA2_DEFAULT_SYSTEM, ("[INST]",), _llama2, LLAMA2_JINJA),
    "llama3": ChatTemplate("llama3", None, ("<|eot_id|>",), _llama3, LLAMA3_JINJA),
    "chatml": ChatTemplate("chatml", None, ("<|im_end|>",), _chatml, CHATML_JINJA),
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


def jinja_renderer(source: str, *, bos_token: str, eos_token: str) -> Callable[[list[dict], bool], str]:
    """A chat-template renderer with the sandbox and helpers transformers gives Jinja templates."""
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
    try:
        template = env.from_string(source)
    except TemplateError as exc:
        raise UsageError(f"the model's chat template does not parse: {exc}; choose a built-in --template") from None

    def render(messages: list[dict], add_generation_prompt: bool) -> str:
        try:
            return template.render(messages=messages, add_generation_prompt=add_generation_prompt, bos_token=bos_token, eos_token=eos_token)
        except TemplateError as exc:
            raise UsageError(f"the model's chat template rejected the conversation: {exc}") from None

    return render


def jinja_segments(
    render: Callable[[list[dict], bool], str],
    messages: Sequence[Message | dict],
    *,
    system: str | None = None,
    add_generation_prompt: bool = True,
) -> list[Segment]:
    """Segments from a Jinja template (``render(messages, add_generation_prompt)``).

    Each assistant span is found by rendering the conversation up to its user turn with the
    generation prompt, then including the answer: the difference is the trainable part.
    """
    msgs = normalize_messages(messages)
    if system is not None:
        msgs = [Message("system", system)] + [m for m in msgs if m.role != "system"]
    as_dicts = [{"role": m.role, "content": m.content} for m in msgs]
    segments: list[Segment] = []
    rendered = ""
    for index, message in enumerate(as_dicts):
        if message["role"] != "assistant":
            continue
        prefix = render(as_dicts[:index], True)
        full = render(as_dicts[: index + 1], False)
        if not prefix.startswith(rendered) or not full.startswith(prefix):
            raise UsageError("the chat template does not render conversations incrementally; choose a built-in --template")
        segments.append(Segment(prefix[len(rendered):]))
        segments.append(Segment(full[len(prefix):], trainable=True))
        rendered = full
    if as_dicts[-1]["role"] != "assistant":
        final = render(as_dicts, add_generation_prompt)
        segments.append(Segment(final[len(rendered):]))
    return [s for s in segments if s.text]


def plain_segments(messages: Sequence[Message | dict], system: str | None) -> list[Segment]:
    """No template (``none``): the conversation as running text, each answer continuing its prompt."""
    msgs = normalize_messages(messages)
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


@dataclass(frozen=True)
class PromptFormat:
    """How conversations become text for one model: what :func:`resolve_template` returns."""

    name: str  # a built-in name, "auto" (the model's own Jinja template) or "none" (plain continuation)
    stop: tuple[str, ...]
    _segments: Callable[[Sequence[Message | dict], str | None, bool], list[Segment]]

    @property
    def is_plain(self) -> bool:
        return self.name == NONE

    def segments(self, messages: Sequence[Message | dict], system: str | None = None, *, add_generation_prompt: bool = True) -> list[Segment]:
        return self._segments(messages, system, add_generation_prompt)

    def render(self, messages: Sequence[Message | dict], system: str | None = None) -> str:
        """The prompt for the next answer (the generation prompt included)."""
        return "".join(s.text for s in self.segments(messages, system))


def resolve_template(name: str | None, *, jinja_source: str | None, bos_token: str, eos_token: str) -> PromptFormat:
    """The one way from a ``--template`` word to a renderer. ``auto`` (or None) is the model's own Jinja
    template; a model without one runs as plain continuation, exactly like ``none`` (callers say so)."""
    name = check_template_name(name or AUTO)
    if name in TEMPLATES:
        built_in = TEMPLATES[name]
        return PromptFormat(
            name,
            built_in.stop,
            lambda messages, system, generation: built_in.segments(
                messages, system=system, bos_token=bos_token, eos_token=eos_token, add_generation_prompt=generation
            ),
        )
    if name == AUTO and jinja_source:
        render = jinja_renderer(jinja_source, bos_token=bos_token, eos_token=eos_token)
        recorded = recorded_template(jinja_source)
        stops = tuple(dict.fromkeys(((eos_token,) if eos_token else ()) + (recorded.stop if recorded else ())))
        return PromptFormat(
            AUTO, stops, lambda messages, system, generation: jinja_segments(render, messages, system=system, add_generation_prompt=generation)
        )
    return PromptFormat(NONE, (), lambda messages, system, generation: plain_segments(messages, system))
