"""Tool calls on ``/v1/chat/completions``: a request's ``tools`` and ``tool_choice`` checked against the template
(:class:`ToolPlan`), and the model's answer read back into OpenAI's ``tool_calls``.

A forced call (``tool_choice`` ``"required"`` or a named function) is decoding under a grammar, which is the JSON
schema of the call object (:meth:`cnllm.core.tool_calls.ToolFormat.call_schema`) handed to the structured-output
path that already exists (``SamplingParams.json_schema``). The grammar cannot hold the template's call syntax around
the JSON (Hermes ``<tool_call>`` tags), and a grammar written by hand would bypass the converter's checks, so the
prompt ends with the opening tag instead (:attr:`ToolFormat.forced_prefix`: the model sees what it would have
written itself) and the answer, the call's JSON alone, is read as that one call. Llama-3.1's calls are bare JSON, so
there the grammar holds the whole call.
"""

from __future__ import annotations

import secrets
from dataclasses import dataclass

from cnllm.core.server import schemas
from cnllm.core.server.errors import APIError
from cnllm.core.templates import PromptFormat
from cnllm.core.tool_calls import Event, ParsedCall, ToolCallParser, ToolFormat


@dataclass(frozen=True)
class ToolPlan:
    """What a request with tools does: the definitions the template shows the model, the functions its answer may
    call, and whether a grammar forces one call."""

    format: ToolFormat
    definitions: list[dict]  # OpenAI tool definitions, as chat templates get them
    names: tuple[str, ...]  # the functions the answer may call (a named tool_choice: that one)
    forced: bool
    max_calls: int | None  # 1 when parallel_tool_calls is false or a call is forced

    @property
    def prompt_suffix(self) -> str:
        return self.format.forced_prefix if self.forced else ""

    def schema(self) -> dict | None:
        """The JSON schema the answer is held to: one call to one of :attr:`names` (None: the model chooses freely)."""
        if not self.forced:
            return None
        return self.format.call_schema([d["function"] for d in self.definitions if d["function"]["name"] in self.names])

    def parser(self) -> ToolCallParser:
        return self.format.parser(self.names, forced=self.forced)


def plan_tools(request: schemas.ChatCompletionRequest, prompt_format: PromptFormat) -> ToolPlan | None:
    """The request's tools checked against the template (None: the answer is plain text). ``tool_choice`` defaults to
    OpenAI's: ``auto`` with tools, ``none`` without; with ``none`` the tools are not shown to the model at all."""
    tools = request.tools or []
    choice = request.tool_choice or ("auto" if tools else "none")
    named = choice.function.name if isinstance(choice, schemas.NamedToolChoice) else None
    if not tools:
        if choice != "none" and choice != "auto":
            raise APIError(400, "tool_choice asks for a tool call, but the request has no tools", param="tool_choice")
        return None
    names = [tool.function.name for tool in tools]
    repeated = sorted({name for name in names if names.count(name) > 1})
    if repeated:
        raise APIError(400, f"tools: more than one function is named {', '.join(map(repr, repeated))}", param="tools")
    if choice == "none":
        return None
    if prompt_format.tool_format is None:
        raise APIError(400, f"tools: {prompt_format.no_tools_reason} (or send tool_choice \"none\")", param="tools")
    if request.response_format is not None and request.response_format.type != "text":
        raise APIError(
            400,
            "response_format and tools cannot be combined: both constrain the whole answer; send tool_choice \"none\" "
            "for a structured answer, or drop response_format",
            param="response_format",
        )
    if named is not None and named not in names:
        raise APIError(400, f"tool_choice names the function {named!r}, which is not among the tools ({', '.join(names)})", param="tool_choice")
    definitions = [{"type": "function", "function": definition(tool.function)} for tool in tools]
    forced = choice != "auto"
    return ToolPlan(prompt_format.tool_format, definitions, (named,) if named else tuple(names), forced, 1 if forced or request.parallel_tool_calls is False else None)


def definition(function: schemas.FunctionDefinition) -> dict:
    """A function as templates show it: OpenAI's keys, absent ones left out (a template writes what it is given)."""
    fields = {"name": function.name, "description": function.description, "parameters": function.parameters}
    return {key: value for key, value in fields.items() if value is not None}


def call_id() -> str:
    return f"call_{secrets.token_hex(12)}"


def answer(plan: ToolPlan, text: str, finish_reason: str | None) -> tuple[schemas.AssistantMessage, str | None]:
    """The message of a whole answer: its calls, the text around them as content (None when there is none), and
    ``finish_reason`` ``tool_calls`` when an answer that ended by itself called a tool."""
    content, calls = plan.format.parse(text, plan.names, forced=plan.forced)
    calls = calls[: plan.max_calls]
    if not calls:
        return schemas.AssistantMessage(content=content), finish_reason
    tool_calls = [schemas.ToolCall(id=call_id(), function=schemas.FunctionCall(name=c.name, arguments=c.arguments)) for c in calls]
    return schemas.AssistantMessage(content=content or None, tool_calls=tool_calls), "tool_calls" if finish_reason == "stop" else finish_reason


class StreamedCalls:
    """A streamed answer's deltas: content as it comes, each call as OpenAI streams one (a first delta with its index,
    id and name, then its arguments) once the parser has it whole."""

    def __init__(self, plan: ToolPlan):
        self.plan = plan
        self.parser = plan.parser()
        self.count = 0

    def feed(self, text: str) -> list[schemas.Delta]:
        return self._deltas(self.parser.feed(text))

    def finish(self) -> list[schemas.Delta]:
        return self._deltas(self.parser.finish())

    def finish_reason(self, finish_reason: str | None) -> str | None:
        return "tool_calls" if self.count and finish_reason == "stop" else finish_reason

    def _deltas(self, events: list[Event]) -> list[schemas.Delta]:
        deltas = []
        for event in events:
            if isinstance(event, ParsedCall):
                if self.plan.max_calls is not None and self.count >= self.plan.max_calls:
                    continue
                deltas += self._call(event)
            else:
                deltas.append(schemas.Delta(content=event))
        return deltas

    def _call(self, call: ParsedCall) -> list[schemas.Delta]:
        index, self.count = self.count, self.count + 1
        opening = schemas.ToolCallDelta(index=index, id=call_id(), type="function", function=schemas.FunctionCallDelta(name=call.name, arguments=""))
        arguments = schemas.ToolCallDelta(index=index, function=schemas.FunctionCallDelta(arguments=call.arguments))
        return [schemas.Delta(tool_calls=[opening]), schemas.Delta(tool_calls=[arguments])]
