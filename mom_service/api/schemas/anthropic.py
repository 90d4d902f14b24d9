"""The Anthropic Messages wire models in one place: requests (validated: `POST /v1/messages` and its
`count_tokens`), model objects (`GET /v1/models` with `anthropic-version`: `ModelInfo` and its page). Responses and
stream events are built lean, as plain dicts, by api/encoders/anthropic.py; what a request becomes for the engine is
api/schemas/anthropic_engine.py.

As with OpenAI's models, unknown fields are accepted (clients send many: `cache_control` on any block, `container`
...) but never read; known ones are validated strictly. Anthropic's errors have no `param`: the message names the
field first, in Anthropic's dotted form (`messages.0.content.1.source: Field required`).
"""

from __future__ import annotations

import re
import time
from typing import Annotated, Any, Literal, TypeVar

from pydantic import Field, ValidationError
from typing_extensions import TypedDict

from mom_service.api.schemas.openai import FUNCTION_NAME, RequestLimits, _Open
from mom_service.api.schemas.validation import array_too_long, first_error
from mom_service.engine.structured import schema_problem
from mom_service.errors import InvalidRequest

# ---------------------------------------------------------------------------------------------------- requests

MAX_STOP_SEQUENCES = 4  # the engine's calls are OpenAI's: at most 4 `stop` strings
MIN_THINKING_BUDGET = 1024  # as Anthropic requires of `thinking.budget_tokens`
IMAGE_TYPES = ("image/jpeg", "image/png", "image/gif", "image/webp")
# Server-side features a MoM model cannot honour: refused, never silently dropped.
UNSUPPORTED = {
    "mcp_servers": "the MCP connector (server-side MCP servers) is not supported",
    "container": "containers (code execution) are not supported",
    "output_format": "`output_format` is the structured outputs beta's name: send `output_config.format`",
}
OUTPUT_FORMAT_NAME = "output"  # the name its `response_format` gets (Anthropic's format has none; OpenAI's needs one)
CUSTOM_TOOL = "custom"


class TextBlock(_Open):
    type: Literal["text"]
    text: str


class ImageSource(_Open):
    """`base64` (`media_type`, `data`) or `url` (`url`); what each kind requires is checked after, by name."""

    type: Literal["base64", "url"]
    media_type: Literal["image/jpeg", "image/png", "image/gif", "image/webp"] | None = None
    data: str | None = Field(default=None, min_length=1)
    url: str | None = Field(default=None, min_length=1)


class ImageBlock(_Open):
    type: Literal["image"]
    source: ImageSource


class ToolUseBlock(_Open):
    type: Literal["tool_use"]
    id: str = Field(min_length=1)
    name: str = Field(min_length=1)
    input: dict[str, Any]


class ToolReferenceBlock(_Open):
    """In a `tool_result` (Claude Code's tool search answers with these): the named deferred tool is loaded."""

    type: Literal["tool_reference"]
    tool_name: str = Field(min_length=1)


ResultPart = Annotated[TextBlock | ImageBlock | ToolReferenceBlock, Field(discriminator="type")]


class ToolResultBlock(_Open):
    type: Literal["tool_result"]
    tool_use_id: str = Field(min_length=1)
    content: str | list[ResultPart] | None = None
    is_error: bool | None = None


class ThinkingBlock(_Open):
    type: Literal["thinking"]
    thinking: str
    signature: str


class RedactedThinkingBlock(_Open):
    type: Literal["redacted_thinking"]
    data: str


Block = Annotated[
    TextBlock | ImageBlock | ToolUseBlock | ToolResultBlock | ThinkingBlock | RedactedThinkingBlock,
    Field(discriminator="type"),
]


class Message(_Open):
    """`system` among the messages (as Claude Code sends its environment) is folded into the system prompt."""

    role: Literal["user", "assistant", "system"]
    content: str | list[Block]


class Tool(_Open):
    """A custom tool (`type` absent or `custom`); server tools (`web_search_...`, `bash_...`) are refused by type.
    A tool with `defer_loading: true` reaches the LLMs only once a `tool_reference` block names it."""

    type: str | None = None
    name: str = Field(pattern=FUNCTION_NAME)
    description: str | None = None
    input_schema: dict[str, Any]
    defer_loading: bool | None = None


class ToolChoice(_Open):
    type: Literal["auto", "any", "tool", "none"]
    name: str | None = Field(default=None, min_length=1)  # `tool`
    disable_parallel_tool_use: bool | None = None


class Thinking(_Open):
    """`enabled` (with `budget_tokens`), `adaptive` and `between_tools` ask for the thinking block; `disabled` not."""

    type: Literal["enabled", "disabled", "adaptive", "between_tools"]
    budget_tokens: int | None = None
    display: Literal["summarized", "omitted", "updates"] | None = None

    @property
    def asked(self) -> bool:
        return self.type != "disabled"


class Metadata(_Open):
    user_id: str | None = Field(default=None, max_length=256)


class OutputFormat(_Open):
    """Structured outputs: the answer is JSON valid against `schema` (Chat Completions' `response_format`)."""

    type: Literal["json_schema"]
    json_schema: dict[str, Any] = Field(alias="schema")

    def to_upstream(self) -> dict[str, Any]:
        return {"type": "json_schema", "json_schema": {"name": OUTPUT_FORMAT_NAME, "schema": self.json_schema}}


class OutputConfig(_Open):
    """`format` is honoured; `effort` and the rest are accepted and not read."""

    format: OutputFormat | None = None


class CountTokensRequest(_Open):
    """`POST /v1/messages/count_tokens`: a message request without `max_tokens`."""

    model: str = Field(min_length=1)
    messages: list[Message] = Field(min_length=1)
    system: str | list[TextBlock] | None = None
    stop_sequences: list[str] | None = None
    temperature: float | None = Field(default=None, ge=0, le=1)
    top_p: float | None = Field(default=None, ge=0, le=1)
    top_k: int | None = Field(default=None, ge=0)  # accepted, not forwarded: OpenAI-compatible LLMs refuse it
    tools: list[Tool] | None = None
    tool_choice: ToolChoice | None = None
    thinking: Thinking | None = None
    metadata: Metadata | None = None
    output_config: OutputConfig | None = None
    stream: bool | None = False
    mom: dict[str, Any] | None = None  # the caller's controls (docs/steering.md), read by the engine


class MessagesRequest(CountTokensRequest):
    max_tokens: int = Field(ge=1)


# ------------------------------------------------------------------------------------------------ validation


def dotted(path: str) -> str:
    """Anthropic's spelling of a field's path: `messages.0.content.1` for `messages[0].content[1]`."""
    return re.sub(r"\[(\d+)\]", r".\1", path)


def invalid(param: str, reason: str, code: str = "invalid_value") -> InvalidRequest:
    """A 400 as Anthropic words it: the field's path, then what is wrong."""
    return InvalidRequest(f"{param}: {reason}", param=param, code=code)


def anthropic_error(error: InvalidRequest) -> InvalidRequest:
    """A validation error (named the OpenAI way) named Anthropic's way."""
    if error.param is None:
        return error
    param = dotted(error.param)
    if error.code == "missing_required_parameter":
        return invalid(param, "Field required", error.code)
    reason = error.message
    for prefix in (
        f"Invalid value for '{error.param}': ",
        f"Invalid type for '{error.param}': ",
        f"Invalid '{error.param}': ",
    ):
        reason = reason.removeprefix(prefix)
    return invalid(param, reason.replace(f"'{error.param}'", f"'{param}'"), error.code or "invalid_value")


def _server_tools(data: dict[str, Any]) -> None:
    """A tool with a `type` other than `custom` is one of Anthropic's server or client tools: a 400 naming it."""
    tools = data.get("tools")
    for i, tool in enumerate(tools if isinstance(tools, list) else ()):
        kind = tool.get("type") if isinstance(tool, dict) else None
        if isinstance(kind, str) and kind != CUSTOM_TOOL:
            raise invalid(
                f"tools.{i}.type",
                f"the tool type '{kind}' is not supported: a MoM model takes custom tools only (name, "
                "description, input_schema).",
                "unsupported_tool_type",
            )


def _check_options(request: CountTokensRequest, max_tokens: int | None) -> None:
    names = {tool.name for tool in request.tools or ()}
    choice = request.tool_choice
    if choice is not None and choice.type != "none" and not request.tools:
        raise invalid("tool_choice", "tool_choice may only be specified while providing tools.")
    if choice is not None and choice.type == "tool":
        if choice.name is None:
            raise invalid("tool_choice.name", "Field required", "missing_required_parameter")
        if choice.name not in names:
            raise invalid("tool_choice.name", f"no tool is named '{choice.name}'.")
    stops = request.stop_sequences or []
    if len(stops) > MAX_STOP_SEQUENCES:
        raise anthropic_error(array_too_long("stop_sequences", MAX_STOP_SEQUENCES, len(stops)))
    thinking = request.thinking
    if thinking is not None and thinking.type == "enabled":
        if thinking.budget_tokens is None:
            raise invalid("thinking.enabled.budget_tokens", "Field required", "missing_required_parameter")
        if thinking.budget_tokens < MIN_THINKING_BUDGET:
            raise invalid(
                "thinking.enabled.budget_tokens", f"Input should be greater than or equal to {MIN_THINKING_BUDGET}"
            )
        if max_tokens is not None and max_tokens <= thinking.budget_tokens:
            raise invalid("max_tokens", "`max_tokens` must be greater than `thinking.budget_tokens`.")
    form = request.output_config.format if request.output_config is not None else None
    why = schema_problem(form.json_schema) if form is not None else None
    if why is not None:
        raise invalid("output_config.format.schema", f"Invalid schema: {why}.")


def _check_sources(request: CountTokensRequest) -> None:
    """What each kind of image source requires (`base64`: media_type and data; `url`: url)."""
    for i, message in enumerate(request.messages):
        for j, block in enumerate(message.content if isinstance(message.content, list) else ()):
            images = [(f"messages.{i}.content.{j}", block)] if isinstance(block, ImageBlock) else []
            if isinstance(block, ToolResultBlock) and isinstance(block.content, list):
                images += [
                    (f"messages.{i}.content.{j}.content.{k}", part)
                    for k, part in enumerate(block.content)
                    if isinstance(part, ImageBlock)
                ]
            for where, image in images:
                needed = ("media_type", "data") if image.source.type == "base64" else ("url",)
                for name in needed:
                    if getattr(image.source, name) is None:
                        raise invalid(f"{where}.source.{name}", "Field required", "missing_required_parameter")


R = TypeVar("R", bound=CountTokensRequest)


def parse_request(data: Any, model: type[R], limits: RequestLimits) -> R:
    """Validate a decoded body; raise Anthropic's 400 naming the first wrong field. The size of what a request
    may hold is checked first, so an oversized one costs no validation."""
    if not isinstance(data, dict):
        raise InvalidRequest("The request body must be a JSON object.", code="invalid_request_body")
    messages = data.get("messages")
    if isinstance(messages, list) and len(messages) > limits.max_messages:
        raise anthropic_error(array_too_long("messages", limits.max_messages, len(messages)))
    for name, why in UNSUPPORTED.items():
        if data.get(name) is not None:
            raise invalid(name, f"{why}.", "unsupported_parameter")
    _server_tools(data)
    try:
        request = model.model_validate(data)
    except ValidationError as exc:
        raise anthropic_error(first_error(exc)) from None
    _check_options(request, getattr(request, "max_tokens", None))
    _check_sources(request)
    return request


# --------------------------------------------------------------------------------------------------- models


class AnthropicModel(TypedDict):
    type: Literal["model"]
    id: str
    display_name: str
    created_at: str  # RFC 3339


class AnthropicModelList(TypedDict):
    data: list[AnthropicModel]
    has_more: bool
    first_id: str | None
    last_id: str | None


def rfc3339(unix_seconds: int) -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(unix_seconds))


def anthropic_model(name: str, created: int) -> AnthropicModel:
    return {"type": "model", "id": name, "display_name": name, "created_at": rfc3339(created)}


def anthropic_model_list(names: list[str], created: int) -> AnthropicModelList:
    """Every MoM model on one page (there are few): `has_more` false, the first and last ids."""
    return {
        "data": [anthropic_model(name, created) for name in names],
        "has_more": False,
        "first_id": names[0] if names else None,
        "last_id": names[-1] if names else None,
    }
