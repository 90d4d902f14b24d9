"""The OpenAI wire models in one place: requests (validated), responses, stream chunks and errors (built lean).

Requests accept unknown fields (clients send many) but only the fields declared here are ever read, and only the
sampling parameters in SAMPLING_PARAMS reach LiteLLM. Responses are plain dicts typed with TypedDicts: they are
built for every chunk, so they stay cheap; the tests validate them against OpenAI's published schemas.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError
from typing_extensions import TypedDict

from mom_service.api.schemas.validation import array_too_long, first_error
from mom_service.config import Level
from mom_service.engine.structured import schema_problem
from mom_service.errors import InvalidRequest

# ---------------------------------------------------------------------------------------------------- requests

MAX_STOP = 4  # stop sequences, as OpenAI allows
MAX_TOP_LOGPROBS = 20

# Sampling goes to every call (members and concluding); the shape of the final answer is the concluding call's
# business only, so a client asking for a short answer does not truncate the panel's reasoning.
SAMPLING_PARAMS = ("temperature", "top_p", "seed", "presence_penalty", "frequency_penalty", "user")
FINAL_PARAMS = (
    "max_tokens",
    "max_completion_tokens",
    "stop",
    "response_format",
    "tool_choice",
    "parallel_tool_calls",
    "logit_bias",
    "logprobs",
    "top_logprobs",
)
TOOL_OPTIONS = ("tool_choice", "parallel_tool_calls")  # meaningless without tools: not sent then
# Recognised OpenAI parameters a MoM model cannot honour: refused, never silently dropped.
UNSUPPORTED = {
    "audio": "audio output is not supported",
    "prediction": "predicted outputs are not supported",
    "web_search_options": "web search is not supported",
    "functions": "the legacy 'functions' parameter is not supported: use 'tools'",
    "function_call": "the legacy 'function_call' parameter is not supported: use 'tool_choice'",
}
FUNCTION_NAME = r"^[A-Za-z0-9_-]{1,64}$"


class _Open(BaseModel):
    """Unknown fields are accepted (and never read); known ones are validated strictly, as OpenAI's API does: a
    string where a boolean or a number belongs is a 400, not coerced."""

    model_config = ConfigDict(extra="allow", strict=True, populate_by_name=True)

    def known(self) -> dict[str, Any]:
        """The declared fields that are set, recursively, by their wire names: never a field the client added
        (those are accepted, and stay here)."""
        out: dict[str, Any] = {}
        for name, info in type(self).model_fields.items():
            value = getattr(self, name)
            if value is None:
                continue
            out[info.alias or name] = value.known() if isinstance(value, _Open) else value
        return out


class TextPart(_Open):
    type: Literal["text"]
    text: str

    def to_upstream(self) -> dict[str, Any]:
        return {"type": "text", "text": self.text}


class ImageURL(_Open):
    url: str = Field(min_length=1)
    detail: Literal["auto", "low", "high"] | None = None


class ImagePart(_Open):
    type: Literal["image_url"]
    image_url: ImageURL

    def to_upstream(self) -> dict[str, Any]:
        image: dict[str, Any] = {"url": self.image_url.url}
        if self.image_url.detail is not None:
            image["detail"] = self.image_url.detail
        return {"type": "image_url", "image_url": image}


ContentPart = Annotated[TextPart | ImagePart, Field(discriminator="type")]


class FunctionCall(_Open):
    name: str = Field(min_length=1)
    arguments: str


class ToolCall(_Open):
    id: str = Field(min_length=1)
    type: Literal["function"]
    function: FunctionCall

    def to_upstream(self) -> dict[str, Any]:
        return {
            "id": self.id,
            "type": "function",
            "function": {"name": self.function.name, "arguments": self.function.arguments},
        }


class ChatMessage(_Open):
    """Any role's message; what each role requires is checked after (`check_roles`), so errors name the field."""

    role: Literal["system", "developer", "user", "assistant", "tool"]
    content: str | list[ContentPart] | None = None
    name: str | None = Field(default=None, min_length=1, max_length=64)
    tool_calls: list[ToolCall] | None = None  # assistant
    tool_call_id: str | None = Field(default=None, min_length=1)  # tool

    def to_upstream(self) -> dict[str, Any]:
        """The message as the engine gets it: only the fields we know, no empty ones."""
        message: dict[str, Any] = {"role": self.role}
        if isinstance(self.content, list):
            message["content"] = [part.to_upstream() for part in self.content]
        else:
            message["content"] = self.content
        if self.name:
            message["name"] = self.name
        if self.tool_calls:
            message["tool_calls"] = [call.to_upstream() for call in self.tool_calls]
        if self.role == "tool":
            message["tool_call_id"] = self.tool_call_id
        return message


class FunctionDefinition(_Open):
    name: str = Field(pattern=FUNCTION_NAME)
    description: str | None = None
    parameters: dict[str, Any] | None = None
    strict: bool | None = None


class Tool(_Open):
    type: str
    function: FunctionDefinition | None = None

    def to_upstream(self) -> dict[str, Any]:
        assert self.function is not None  # (checked: only function tools are accepted)
        return {"type": "function", "function": self.function.known()}


class NamedFunction(_Open):
    name: str = Field(min_length=1)


class NamedToolChoice(_Open):
    type: Literal["function"]
    function: NamedFunction


class JsonSchemaFormat(_Open):
    name: str = Field(pattern=FUNCTION_NAME)
    description: str | None = None
    json_schema: dict[str, Any] | None = Field(default=None, alias="schema")
    strict: bool | None = None


class ResponseFormat(_Open):
    type: Literal["text", "json_object", "json_schema"]
    json_schema: JsonSchemaFormat | None = None

    def to_upstream(self) -> dict[str, Any]:
        if self.type != "json_schema" or self.json_schema is None:
            return {"type": self.type}
        return {"type": "json_schema", "json_schema": self.json_schema.known()}


class StreamOptions(_Open):
    include_usage: bool | None = None


class ChatCompletionRequest(_Open):
    model: str = Field(min_length=1)
    messages: list[ChatMessage] = Field(min_length=1)
    stream: bool | None = False
    stream_options: StreamOptions | None = None
    n: int | None = None
    temperature: float | None = Field(default=None, ge=0, le=2)
    top_p: float | None = Field(default=None, ge=0, le=1)
    max_tokens: int | None = Field(default=None, ge=1)
    max_completion_tokens: int | None = Field(default=None, ge=1)
    stop: str | Annotated[list[str], Field(max_length=MAX_STOP)] | None = None
    seed: int | None = None
    user: str | None = Field(default=None, max_length=256)
    mom: dict[str, Any] | None = None  # the caller's controls (docs/steering.md), read by the engine
    presence_penalty: float | None = Field(default=None, ge=-2, le=2)
    frequency_penalty: float | None = Field(default=None, ge=-2, le=2)
    tools: list[Tool] | None = None
    tool_choice: Literal["none", "auto", "required"] | NamedToolChoice | None = None
    parallel_tool_calls: bool | None = None
    response_format: ResponseFormat | None = None
    logit_bias: dict[str, Annotated[int, Field(ge=-100, le=100)]] | None = None
    logprobs: bool | None = None
    top_logprobs: int | None = Field(default=None, ge=0, le=MAX_TOP_LOGPROBS)
    modalities: list[str] | None = None
    reasoning_effort: Level | None = None  # picks the MoM model's effort tier (engine/tiers.py); never forwarded

    @property
    def include_usage(self) -> bool:
        return bool(self.stream_options and self.stream_options.include_usage)

    def sampling_params(self) -> dict[str, Any]:
        """The allowlisted sampling parameters the client set: they reach every call of the panel."""
        return {name: value for name in SAMPLING_PARAMS if (value := getattr(self, name)) is not None}

    def final_params(self) -> dict[str, Any]:
        """The parameters that shape the final answer: they reach the concluding call only."""
        params: dict[str, Any] = {}
        for name in FINAL_PARAMS:
            value = getattr(self, name)
            if value is None or (name in TOOL_OPTIONS and not self.tools):  # tool options without tools: no-ops
                continue
            if isinstance(value, _Open):
                value = value.to_upstream() if isinstance(value, ResponseFormat) else value.known()
            params[name] = value
        return params

    def upstream_tools(self) -> list[dict[str, Any]] | None:
        return [tool.to_upstream() for tool in self.tools] if self.tools else None

    def upstream_messages(self) -> list[dict[str, Any]]:
        return [m.to_upstream() for m in self.messages]


@dataclass(frozen=True, slots=True)
class RequestLimits:
    """What one request may hold before it reaches a provider (MOM_MAX_MESSAGES, MOM_MAX_TEXT_CHARS)."""

    max_messages: int = 2000
    max_text_chars: int = 4 * 1024 * 1024


def _unsupported(param: str, why: str) -> InvalidRequest:
    return InvalidRequest(f"Unsupported parameter: '{param}': {why}.", param=param, code="unsupported_parameter")


def check_unsupported(data: dict[str, Any]) -> None:
    """Recognised OpenAI parameters a MoM model cannot honour: a 400 naming each, never silently dropped."""
    for name, why in UNSUPPORTED.items():
        if data.get(name) is not None:
            raise _unsupported(name, why)
    modalities = data.get("modalities")
    if isinstance(modalities, list) and "audio" in modalities:
        raise _unsupported("modalities", "audio output is not supported")


def _missing(param: str) -> InvalidRequest:
    return InvalidRequest(f"Missing required parameter: '{param}'.", param=param, code="missing_required_parameter")


def check_messages(messages: list[ChatMessage]) -> None:
    """What each role requires, and that every tool result answers a tool call made earlier in the conversation."""
    called: set[str] = set()
    for i, message in enumerate(messages):
        where = f"messages[{i}]"
        if message.role == "assistant":
            if message.content is None and not message.tool_calls:
                raise _missing(f"{where}.content")
            called.update(call.id for call in message.tool_calls or ())
        elif message.content is None:
            raise _missing(f"{where}.content")
        if message.role != "assistant" and message.tool_calls:
            raise InvalidRequest(
                f"Invalid parameter: only assistant messages may carry 'tool_calls' ({where}).",
                param=f"{where}.tool_calls",
                code="invalid_value",
            )
        only_text = message.role in ("assistant", "tool") and isinstance(message.content, list)
        if only_text and any(not isinstance(part, TextPart) for part in message.content or ()):
            raise InvalidRequest(
                f"Invalid value for '{where}.content': a {message.role} message holds text parts only.",
                param=f"{where}.content",
                code="invalid_value",
            )
        if message.role == "tool":
            if message.tool_call_id is None:
                raise _missing(f"{where}.tool_call_id")
            if message.tool_call_id not in called:
                raise InvalidRequest(
                    "Invalid parameter: messages with role 'tool' must be a response to a preceding message with "
                    f"'tool_calls' (no earlier tool call has the id '{message.tool_call_id}').",
                    param=f"{where}.role",
                    code="invalid_tool_message",
                )


def check_tools(request: ChatCompletionRequest) -> None:
    """Function tools only; a named tool choice names one of them; options that need another one have it."""
    names: set[str] = set()
    for i, tool in enumerate(request.tools or ()):
        if tool.type != "function":
            raise InvalidRequest(
                f"The tool type '{tool.type}' is not supported: a MoM model takes 'function' tools only.",
                param=f"tools[{i}].type",
                code="unsupported_tool_type",
            )
        if tool.function is None:
            raise _missing(f"tools[{i}].function")
        names.add(tool.function.name)
    choice = request.tool_choice
    if choice is not None and not request.tools and choice != "none":
        raise InvalidRequest(
            "Invalid value for 'tool_choice': it is only allowed when 'tools' are specified.",
            param="tool_choice",
            code="invalid_value",
        )
    if isinstance(choice, NamedToolChoice) and choice.function.name not in names:
        raise InvalidRequest(
            f"Invalid value for 'tool_choice': no tool is named '{choice.function.name}'.",
            param="tool_choice",
            code="invalid_value",
        )
    form = request.response_format
    if form is not None and form.type == "json_schema":
        if form.json_schema is None:
            raise _missing("response_format.json_schema")
        why = schema_problem(form.json_schema.json_schema) if form.json_schema.json_schema is not None else None
        if why is not None:
            raise InvalidRequest(
                f"Invalid schema for response_format '{form.json_schema.name}': {why}.",
                param="response_format.json_schema.schema",
                code="invalid_value",
            )
    if request.top_logprobs is not None and not request.logprobs:
        raise InvalidRequest(
            "Invalid value for 'top_logprobs': 'logprobs' must be true to use it.",
            param="top_logprobs",
            code="invalid_value",
        )


def text_chars(messages: list[ChatMessage]) -> int:
    """Characters of text in a conversation (images not counted)."""
    total = 0
    for message in messages:
        if isinstance(message.content, str):
            total += len(message.content)
        elif message.content is not None:
            total += sum(len(part.text) for part in message.content if isinstance(part, TextPart))
        for call in message.tool_calls or ():
            total += len(call.function.arguments)
    return total


def parse_chat_request(data: Any, limits: RequestLimits = RequestLimits()) -> ChatCompletionRequest:
    """Validate a decoded body; raise an OpenAI-shaped 400 naming the first wrong parameter. The size of what a
    request may hold is checked first, so an oversized one costs no validation."""
    if not isinstance(data, dict):
        raise InvalidRequest("The request body must be a JSON object.", code="invalid_request_body")
    messages = data.get("messages")
    if isinstance(messages, list) and len(messages) > limits.max_messages:
        raise array_too_long("messages", limits.max_messages, len(messages))
    try:
        request = ChatCompletionRequest.model_validate(data)
    except ValidationError as exc:
        raise first_error(exc) from None
    if request.n is not None and request.n != 1:
        code = "unsupported_parameter" if request.n > 1 else "invalid_value"
        raise InvalidRequest("Only n=1 is supported: a MoM model gives one answer.", param="n", code=code)
    check_unsupported(data)
    check_messages(request.messages)
    check_tools(request)
    chars = text_chars(request.messages)
    if chars > limits.max_text_chars:
        raise InvalidRequest(
            f"The messages hold {chars} characters of text; at most {limits.max_text_chars} are accepted.",
            param="messages",
            code="request_too_large",
        )
    return request


# --------------------------------------------------------------------------------------------------- responses


class Capabilities(TypedDict):
    vision: bool  # accepts images: at least one panel member can see them
    tools: bool  # takes tools: a concluding LLM (or fallback) can call them
    structured_output: bool  # takes response_format json_schema: a concluding LLM (or fallback) honours it


class Panel(TypedDict):
    members: list[str]  # the names `mom.only` and `mom.exclude` take (a sampled LLM's are NAME#1 ... NAME#N)
    concluding_llm: str
    strategy: str  # what follows the panel's answers unless the request's `mom.strategy` says otherwise
    steerable: bool  # whether a request may steer it (its `mom` field, a directive): config's overrides.enabled


class ModelObject(TypedDict):
    id: str
    object: Literal["model"]
    created: int
    owned_by: str
    capabilities: Capabilities  # ours, beside the standard fields: what the MoM model takes
    tiers: dict[str, Any] | None  # ours: its effort tiers by level (engine/tiers.py), null when it has none
    panel: Panel  # ours: who answers and what a request may steer (the web playground's controls)


class ModelList(TypedDict):
    object: Literal["list"]
    data: list[ModelObject]


OWNED_BY = "mom-service"


def model_object(
    name: str, created: int, capabilities: Capabilities, panel: Panel, tiers: dict[str, Any] | None = None
) -> ModelObject:
    return {
        "id": name,
        "object": "model",
        "created": created,
        "owned_by": OWNED_BY,
        "capabilities": capabilities,
        "tiers": tiers,
        "panel": panel,
    }
