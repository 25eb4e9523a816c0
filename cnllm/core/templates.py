"""Chat templates, defined once and used by sft (loss masks), chat, serve and eval.

A template turns a conversation into :class:`Segment` s: text pieces marked trainable when they
are assistant output (the answer and its end marker), so SFT can label prompt tokens -100 while
generation renders the same text. ``auto`` uses the tokenizer's own Jinja chat template.
"""

from __future__ import annotations

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
        message = raw if isinstance(raw, Message) else Message(str(raw.get("role", "")), raw.get("content"))
        if message.role not in ROLES:
            raise UsageError(f"message {index}: unknown role {message.role!r} (expected one of {', '.join(ROLES)})")
        if not isinstance(message.content, str):
            raise UsageError(f"message {index}: content must be a string")
        if message.role == "system" and index != 0:
            raise UsageError(f"message {index}: a system message may only come first")
        result.append(message)
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
    name: str
    default_system: str | None
    stop: tuple[str, ...]
    _segments: Callable[[list[Message], str | None, str, bool], list[Segment]]

    def segments(
        self, messages: Sequence[Message | dict], *, system: str | None = None, eos_token: str = "</s>", add_generation_prompt: bool = True
    ) -> list[Segment]:
        """The conversation as segments; ``system`` overrides a system message and the default."""
        msgs = normalize_messages(messages)
        if msgs[0].role == "system":
            system = system if system is not None else msgs[0].content
            msgs = msgs[1:]
        if system is None:
            system = self.default_system
        ends_with_user = msgs[-1].role == "user"
        return self._segments(msgs, system, eos_token, add_generation_prompt and ends_with_user)

    def render(self, messages: Sequence[Message | dict], **kwargs) -> str:
        return "".join(s.text for s in self.segments(messages, **kwargs))


def _pairs(messages: list[Message]) -> list[tuple[str, str | None]]:
    return [(messages[i].content, messages[i + 1].content if i + 1 < len(messages) else None) for i in range(0, len(messages), 2)]


def _alpaca(messages, system, eos, generation_prompt):
    out = []
    for index, (user, answer) in enumerate(_pairs(messages)):
        turn = ALPACA_TURN.format(instruction=user)
        out.append(Segment(f"{system}\n\n{turn}" if index == 0 and system else turn))
        if answer is not None:
            out.append(Segment(answer + eos, trainable=True))
    return out


def _llama2(messages, system, eos, generation_prompt):
    out = []
    for index, (user, answer) in enumerate(_pairs(messages)):
        if index == 0 and system:
            text = f"[INST] <<SYS>>\n{system}\n<</SYS>>\n\n{user} [/INST]"
        else:
            text = f"[INST] {user} [/INST]"
        out.append(Segment(text if index == 0 else "<s>" + text))
        if answer is not None:
            out.append(Segment(f" {answer} {eos}", trainable=True))
    return out


def _llama3(messages, system, eos, generation_prompt):
    out = []
    if system:
        out.append(Segment(f"<|start_header_id|>system<|end_header_id|>\n\n{system}<|eot_id|>"))
    for user, answer in _pairs(messages):
        out.append(Segment(f"<|start_header_id|>user<|end_header_id|>\n\n{user}<|eot_id|><|start_header_id|>assistant<|end_header_id|>\n\n"))
        if answer is not None:
            out.append(Segment(f"{answer}<|eot_id|>", trainable=True))
    return out


def _chatml(messages, system, eos, generation_prompt):
    out = []
    if system:
        out.append(Segment(f"<|im_start|>system\n{system}<|im_end|>\n"))
    for user, answer in _pairs(messages):
        out.append(Segment(f"<|im_start|>user\n{user}<|im_end|>\n<|im_start|>assistant\n"))
        if answer is not None:
            out.append(Segment(f"{answer}<|im_end|>", trainable=True))
            out.append(Segment("\n"))
    return out


TEMPLATES: dict[str, ChatTemplate] = {
    "alpaca": ChatTemplate("alpaca", ALPACA_DEFAULT_SYSTEM, ("### Instruction:",), _alpaca),
    "llama2": ChatTemplate("llama2", LLAMA2_DEFAULT_SYSTEM, ("[INST]",), _llama2),
    "llama3": ChatTemplate("llama3", None, ("<|eot_id|>",), _llama3),
    "chatml": ChatTemplate("chatml", None, ("<|im_end|>",), _chatml),
}
TEMPLATE_NAMES = (*TEMPLATES, "auto")


def get_template(name: str) -> ChatTemplate:
    """A built-in template by name (``auto`` is resolved against a tokenizer by :func:`jinja_segments`)."""
    try:
        return TEMPLATES[name]
    except KeyError:
        raise UsageError(f"unknown template {name!r}; choose one of {', '.join(TEMPLATE_NAMES)}") from None


def jinja_segments(render: Callable[[list[dict], bool], str], messages: Sequence[Message | dict], *, system: str | None = None) -> list[Segment]:
    """Segments from a tokenizer's Jinja template (``render(messages, add_generation_prompt)``).

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
            raise UsageError("the tokenizer's chat template does not render conversations incrementally; choose a built-in --template")
        segments.append(Segment(prefix[len(rendered):]))
        segments.append(Segment(full[len(prefix):], trainable=True))
        rendered = full
    if as_dicts[-1]["role"] == "user":
        final = render(as_dicts, True)
        segments.append(Segment(final[len(rendered):]))
    return [s for s in segments if s.text]
