"""Pydantic models of the OpenAI wire format that ``cnllm serve`` speaks (requests validated, responses built)."""

from __future__ import annotations

from typing import Annotated, Any, Literal, Optional, Union

from pydantic import AfterValidator, BaseModel, ConfigDict, Field, model_serializer


def _valid_unicode(text: str) -> str:
    # JSON's \ud800 escapes parse to lone surrogates, which no tokenizer (or JSON encoder) accepts.
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        raise ValueError("text must be valid Unicode (it holds a lone surrogate such as \\ud800)") from None
    return text


Text = Annotated[str, AfterValidator(_valid_unicode)]


class _Request(BaseModel):
    # Clients (LangChain, harnesses) send fields this server does not use; accept and ignore them like OpenAI's SDKs expect.
    # Python's JSON parser reads NaN and Infinity: no sampling parameter may be one.
    model_config = ConfigDict(extra="ignore", allow_inf_nan=False)


class TextPart(BaseModel):
    type: Literal["text"]
    text: Text


class FunctionCall(BaseModel):
    name: Text
    arguments: Text  # a JSON object, as a string


class ToolCall(BaseModel):
    """A call an assistant made: in a request's history, and in an answer's ``message.tool_calls``."""

    model_config = ConfigDict(extra="ignore")
    id: Text
    type: Literal["function"] = "function"
    function: FunctionCall


class ChatMessage(BaseModel):
    model_config = ConfigDict(extra="ignore")
    role: Text
    content: Union[Text, list[TextPart], None] = None
    tool_calls: Optional[list[ToolCall]] = None  # assistant messages
    tool_call_id: Optional[Text] = None  # tool messages: the call this result answers

    def text(self) -> str:
        if isinstance(self.content, list):
            return "".join(part.text for part in self.content)
        return self.content or ""


class StreamOptions(BaseModel):
    include_usage: bool = False


class JSONSchemaFormat(BaseModel):
    model_config = ConfigDict(extra="ignore")
    name: Optional[Text] = None
    description: Optional[Text] = None
    schema_: Optional[dict[str, Any]] = Field(None, alias="schema")  # absent: any JSON object
    strict: Optional[bool] = None  # the grammar always holds the answer to the schema


class ResponseFormat(BaseModel):
    """OpenAI's ``response_format``: free text, any JSON object, or JSON that a given schema accepts."""

    model_config = ConfigDict(extra="ignore")
    type: Literal["text", "json_object", "json_schema"]
    json_schema: Optional[JSONSchemaFormat] = None


# OpenAI's rule for function names; it also keeps a name from breaking the JSON a template writes around it.
FUNCTION_NAME = r"^[A-Za-z0-9_-]{1,64}$"


class FunctionDefinition(BaseModel):
    model_config = ConfigDict(extra="ignore")
    name: str = Field(..., pattern=FUNCTION_NAME)
    description: Optional[Text] = None
    parameters: Optional[dict[str, Any]] = None  # a JSON schema of the arguments object; absent: no arguments
    strict: Optional[bool] = None  # a forced call always follows the schema; an "auto" call is parsed as written


class Tool(BaseModel):
    type: Literal["function"]
    function: FunctionDefinition


class FunctionName(BaseModel):
    name: Text


class NamedToolChoice(BaseModel):
    type: Literal["function"]
    function: FunctionName


class _Sampling(_Request):
    model: Text
    temperature: Optional[float] = Field(None, ge=0, le=2)
    top_p: Optional[float] = Field(None, gt=0, le=1)
    top_k: Optional[int] = Field(None, ge=0, le=2**31 - 1, description="extension: 0 disables top-k")
    repetition_penalty: Optional[float] = Field(None, gt=0, description="extension")
    seed: Optional[int] = None
    stop: Union[Text, list[Text], None] = None
    n: int = Field(1, ge=1)
    stream: bool = False
    stream_options: Optional[StreamOptions] = None
    presence_penalty: float = Field(0.0, ge=-2, le=2)
    frequency_penalty: float = Field(0.0, ge=-2, le=2)
    user: Optional[Text] = None
    response_format: Optional[ResponseFormat] = None


class ChatCompletionRequest(_Sampling):
    messages: list[ChatMessage] = Field(..., min_length=1)
    max_tokens: Optional[int] = Field(None, ge=0)
    max_completion_tokens: Optional[int] = Field(None, ge=0)
    logprobs: bool = False
    tools: Optional[list[Tool]] = None
    tool_choice: Union[Literal["none", "auto", "required"], NamedToolChoice, None] = None
    parallel_tool_calls: Optional[bool] = None


class CompletionRequest(_Sampling):
    prompt: Union[Text, list[Text], list[int], list[list[int]]]
    max_tokens: Optional[int] = Field(16, ge=0)
    echo: bool = False
    logprobs: Optional[int] = Field(None, ge=0, le=20)
    suffix: Optional[Text] = None
    best_of: Optional[int] = Field(None, ge=1)


class EmbeddingRequest(_Request):
    model: Text
    input: Union[Text, list[Text], list[int], list[list[int]]]
    encoding_format: Literal["float", "base64"] = "float"
    dimensions: Optional[int] = None
    user: Optional[Text] = None


class Usage(BaseModel):
    prompt_tokens: int
    completion_tokens: int = 0
    total_tokens: int


def _without_absent_calls(data: dict) -> dict:
    """``tool_calls`` only where there are some: a plain answer keeps the shape it always had."""
    if data.get("tool_calls") is None:
        data.pop("tool_calls", None)
    return data


class AssistantMessage(BaseModel):
    role: Literal["assistant"] = "assistant"
    content: Optional[str]  # None when the answer is only tool calls
    tool_calls: Optional[list[ToolCall]] = None

    @model_serializer(mode="wrap")
    def _serialize(self, handler):
        return _without_absent_calls(handler(self))


class ChatChoice(BaseModel):
    index: int
    message: AssistantMessage
    finish_reason: Optional[str]
    logprobs: None = None


class ChatCompletion(BaseModel):
    id: str
    object: Literal["chat.completion"] = "chat.completion"
    created: int
    model: str
    choices: list[ChatChoice]
    usage: Usage
    system_fingerprint: Optional[str] = None


class FunctionCallDelta(BaseModel):
    name: Optional[str] = None
    arguments: Optional[str] = None

    @model_serializer(mode="wrap")
    def _serialize(self, handler):
        return {key: value for key, value in handler(self).items() if value is not None}


class ToolCallDelta(BaseModel):
    """A piece of a streamed call, as OpenAI streams them: the first names it (index, id, type, function name), later
    ones add to its arguments (only the index repeats)."""

    index: int
    id: Optional[str] = None
    type: Optional[Literal["function"]] = None
    function: FunctionCallDelta

    @model_serializer(mode="wrap")
    def _serialize(self, handler):
        return {key: value for key, value in handler(self).items() if value is not None}


class Delta(BaseModel):
    role: Optional[Literal["assistant"]] = None
    content: Optional[str] = None
    tool_calls: Optional[list[ToolCallDelta]] = None

    @model_serializer(mode="wrap")
    def _serialize(self, handler):
        return _without_absent_calls(handler(self))


class ChunkChoice(BaseModel):
    index: int = 0
    delta: Delta
    finish_reason: Optional[str] = None
    logprobs: None = None


class ChatCompletionChunk(BaseModel):
    id: str
    object: Literal["chat.completion.chunk"] = "chat.completion.chunk"
    created: int
    model: str
    choices: list[ChunkChoice]
    usage: Optional[Usage] = None
    system_fingerprint: Optional[str] = None


class CompletionLogprobs(BaseModel):
    tokens: list[str]
    token_logprobs: list[Optional[float]]
    top_logprobs: list[Optional[dict[str, float]]]
    text_offset: list[int]


class CompletionChoice(BaseModel):
    index: int
    text: str
    finish_reason: Optional[str]
    logprobs: Optional[CompletionLogprobs] = None


class TextCompletion(BaseModel):
    id: str
    object: Literal["text_completion"] = "text_completion"
    created: int
    model: str
    choices: list[CompletionChoice]
    usage: Optional[Usage] = None
    system_fingerprint: Optional[str] = None


class EmbeddingItem(BaseModel):
    object: Literal["embedding"] = "embedding"
    index: int
    embedding: Union[list[float], str]


class EmbeddingResponse(BaseModel):
    object: Literal["list"] = "list"
    data: list[EmbeddingItem]
    model: str
    usage: Usage


class ModelCard(BaseModel):
    id: str
    object: Literal["model"] = "model"
    created: int
    owned_by: str = "cnllm"


class ModelList(BaseModel):
    object: Literal["list"] = "list"
    data: list[ModelCard]


class ErrorBody(BaseModel):
    message: str
    type: str
    param: Optional[str] = None
    code: Optional[Any] = None


class ErrorResponse(BaseModel):
    error: ErrorBody


class TokenizeRequest(_Request):
    """llama-server's ``/tokenize``: special tokens (BOS) are added only when asked; ``<s>`` in the text is parsed as one."""

    content: Text
    add_special: bool = False
    parse_special: bool = True
    with_pieces: bool = False


class TokenPiece(BaseModel):
    id: int
    piece: str  # the token's share of the decoded text: pieces join to it (a multi-byte character belongs to its last byte)


class TokenizeResponse(BaseModel):
    tokens: Union[list[int], list[TokenPiece]]


class DetokenizeRequest(_Request):
    tokens: list[int]


class DetokenizeResponse(BaseModel):
    content: str
