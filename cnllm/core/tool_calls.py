"""Tool calls in the text a model writes: the call formats of the template families, a parser that streams, and
the JSON schema that forces a call.

A template that supports tools names its :class:`ToolFormat`: Hermes (ChatML / Qwen2.5 / Hermes-2-Pro:
``<tool_call>{"name": …, "arguments": {…}}</tool_call>``, as many as the model likes, text around them) or
Llama-3.1 JSON (the whole answer is ``{"name": …, "parameters": {…}}``). :class:`ToolCallParser` turns the answer,
fed in deltas, into content text and calls; the same parser reads a whole answer (:meth:`ToolFormat.parse`), so a
streamed answer and a plain one always agree.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from typing import Any, Sequence, Union

from cnllm.core.errors import UsageError


@dataclass(frozen=True)
class ToolCall:
    """A call in a conversation (an assistant message's ``tool_calls``): arguments as the object templates render."""

    name: str
    arguments: dict
    id: str | None = None

    def as_dict(self) -> dict:
        """The shape transformers hands chat templates: OpenAI's, with ``arguments`` a dict rather than a JSON string."""
        call: dict[str, Any] = {"type": "function", "function": {"name": self.name, "arguments": self.arguments}}
        return {"id": self.id, **call} if self.id is not None else call


def read_tool_call(raw: Any, where: str) -> ToolCall:
    """A call from a conversation: OpenAI's ``{"id", "type", "function": {"name", "arguments"}}`` (arguments a JSON
    string or an object) or the flat ``{"name", "arguments"}``."""
    if isinstance(raw, ToolCall):
        return raw
    if not isinstance(raw, dict):
        raise UsageError(f"{where}: a tool call must be an object")
    function = raw.get("function", raw)
    name, arguments = (function.get("name"), function.get("arguments", {})) if isinstance(function, dict) else (None, None)
    if not isinstance(name, str) or not name:
        raise UsageError(f"{where}: a tool call needs a function name")
    if isinstance(arguments, str):
        try:
            arguments = json.loads(arguments) if arguments.strip() else {}
        except json.JSONDecodeError as exc:
            raise UsageError(f"{where}: the arguments of {name!r} are not valid JSON ({exc.msg})") from None
    if not isinstance(arguments, dict):
        raise UsageError(f"{where}: the arguments of {name!r} must be a JSON object")
    call_id = raw.get("id")
    return ToolCall(name, arguments, call_id if isinstance(call_id, str) else None)


@dataclass(frozen=True)
class ParsedCall:
    """A call found in a model's answer; ``arguments`` is the JSON string the OpenAI API returns."""

    name: str
    arguments: str


Event = Union[str, ParsedCall]  # what the parser emits: content text or a complete call


@dataclass(frozen=True)
class ToolFormat:
    """How one template family writes a call. ``open_tag`` empty: the whole answer is the call object (or several)."""

    name: str
    arguments_key: str
    open_tag: str = ""
    close_tag: str = ""

    @property
    def forced_prefix(self) -> str:
        """What the prompt ends with when a call is forced: the opening tag the template's model writes before its JSON."""
        return self.open_tag + "\n" if self.open_tag else ""

    def call_schema(self, tools: Sequence[dict]) -> dict:
        """The JSON schema of one call object to one of ``tools`` (OpenAI function definitions): what a grammar forces.

        The name is a ``const`` and the arguments the function's own ``parameters`` schema (none: an empty object).
        Each call is an ``allOf`` of a name part and an arguments part rather than one ``properties`` object: the
        llama.cpp backend serialises schemas with sorted keys, and the converter orders an object's keys as its
        ``properties`` list them, which would put ``arguments`` before ``name``; an ``allOf`` list keeps the order the
        template's model writes (name first), and the converter lets no other key in."""
        options = []
        for tool in tools:
            parameters = tool.get("parameters")
            if parameters is None:
                parameters = {"type": "object", "properties": {}, "additionalProperties": False}
            options.append(
                {
                    "allOf": [
                        {"type": "object", "properties": {"name": {"const": tool["name"]}}, "required": ["name"]},
                        {"type": "object", "properties": {self.arguments_key: parameters}, "required": [self.arguments_key]},
                    ]
                }
            )
        return options[0] if len(options) == 1 else {"anyOf": options}

    def parser(self, names: Sequence[str], *, forced: bool = False) -> "ToolCallParser":
        """A parser of answers that may call the functions ``names``; ``forced``: the answer is the call's JSON alone
        (the grammar wrote it after :attr:`forced_prefix`)."""
        return ToolCallParser(self, frozenset(names), forced=forced)

    def parse(self, text: str, names: Sequence[str], *, forced: bool = False) -> tuple[str, list[ParsedCall]]:
        """A whole answer as (content text, calls): what the streamed events of the same answer add up to."""
        parser = self.parser(names, forced=forced)
        events = parser.feed(text) + parser.finish()
        return "".join(e for e in events if isinstance(e, str)), [e for e in events if isinstance(e, ParsedCall)]


HERMES = ToolFormat("hermes", "arguments", "<tool_call>", "</tool_call>")
LLAMA3_JSON = ToolFormat("llama3-json", "parameters")
ARGUMENT_KEYS = ("arguments", "parameters")  # models trained on one family sometimes write the other's key


def call_from_json(value: Any, names: frozenset[str]) -> ParsedCall | None:
    """A call object the model wrote, when it names one of the offered functions and its arguments are an object."""
    if not isinstance(value, dict) or value.get("name") not in names:
        return None
    arguments: Any = next((value[key] for key in ARGUMENT_KEYS if key in value), {})
    if isinstance(arguments, str):  # some models write the arguments as a JSON string, as the API returns them
        try:
            arguments = json.loads(arguments)
        except json.JSONDecodeError:
            return None
    if not isinstance(arguments, dict):
        return None
    return ParsedCall(value["name"], json.dumps(arguments, ensure_ascii=False))


def calls_from_json_text(text: str, names: frozenset[str]) -> list[ParsedCall] | None:
    """Every call in ``text`` when it is nothing but call objects (one, a JSON list, or several separated by ``;`` as
    Llama-3.1 writes parallel calls); None when anything else is in it."""
    decoder = json.JSONDecoder()
    calls: list[ParsedCall] = []
    at = 0
    while True:
        while at < len(text) and (text[at].isspace() or (text[at] == ";" and calls)):
            at += 1
        if at == len(text):
            return calls or None
        try:
            value, at = decoder.raw_decode(text, at)
        except json.JSONDecodeError:
            return None
        for item in value if isinstance(value, list) else [value]:
            call = call_from_json(item, names)
            if call is None:
                return None
            calls.append(call)


@dataclass
class ToolCallParser:
    """Content and calls out of an answer fed in deltas.

    Text that may still turn into a call is held back: in the Hermes format a tail that could be the start of
    ``<tool_call>`` and everything inside a call until its closing tag; in the JSON format (and for a forced call)
    the whole answer when it starts with ``{`` or ``[``. A call that does not parse, or names a function that was not
    offered, is content after all. When the answer calls a tool, whitespace around the calls is not content."""

    format: ToolFormat
    names: frozenset[str]
    forced: bool = False
    _buffer: str = ""
    _in_call: bool = False
    _json: bool | None = None  # whole-answer formats: does the answer start like JSON (None: not known yet)
    _space: str = ""  # trailing whitespace of the content, held until more content follows
    _content_started: bool = False
    calls: list[ParsedCall] = field(default_factory=list)

    @property
    def _tagged(self) -> bool:
        return bool(self.format.open_tag) and not self.forced

    def feed(self, text: str) -> list[Event]:
        out: list[Event] = []
        self._buffer += text
        if self._tagged:
            self._scan_tags(out)
        else:
            if self._json is None:
                start = self._buffer.lstrip()
                if start:
                    self._json = start[0] in "{["
            if self._json is False:
                self._content(self._buffer, out)
                self._buffer = ""
        return out

    def finish(self) -> list[Event]:
        out: list[Event] = []
        rest, self._buffer = self._buffer, ""
        if self._tagged:
            if self._in_call:
                self._call_or_text(rest, self.format.open_tag + rest, out)
            else:
                self._content(rest, out)
        elif rest:
            calls = calls_from_json_text(rest, self.names)
            if calls:
                self.calls += calls
                out += calls
            else:
                self._content(rest, out)
        if not self.calls and self._space:
            out.append(self._space)
        self._space = ""
        return out

    def _scan_tags(self, out: list[Event]) -> None:
        open_tag, close_tag = self.format.open_tag, self.format.close_tag
        while True:
            if not self._in_call:
                at = self._buffer.find(open_tag)
                if at < 0:
                    hold = next((size for size in range(min(len(open_tag) - 1, len(self._buffer)), 0, -1) if self._buffer.endswith(open_tag[:size])), 0)
                    cut = len(self._buffer) - hold
                    self._content(self._buffer[:cut], out)
                    self._buffer = self._buffer[cut:]
                    return
                self._content(self._buffer[:at], out)
                self._buffer, self._in_call = self._buffer[at + len(open_tag) :], True
            at = self._buffer.find(close_tag)
            if at < 0:
                return
            body, self._buffer, self._in_call = self._buffer[:at], self._buffer[at + len(close_tag) :], False
            self._call_or_text(body, open_tag + body + close_tag, out)

    def _call_or_text(self, body: str, raw: str, out: list[Event]) -> None:
        try:
            call = call_from_json(json.loads(body), self.names)
        except json.JSONDecodeError:
            call = None
        if call is None:
            self._content(raw, out)
        else:
            self.calls.append(call)
            out.append(call)

    def _content(self, text: str, out: list[Event]) -> None:
        text = self._space + text
        if not self._content_started:
            text = text.lstrip()
        kept = text.rstrip()
        self._space = text[len(kept) :]
        if kept:
            self._content_started = True
            out.append(kept)
