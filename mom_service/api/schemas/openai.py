"""The OpenAI wire models in one place: requests (validated), responses, stream chunks and errors (built lean).

Requests accept unknown fields (clients send many) but only the fields declared here are ever read, and only the
sampling parameters in SAMPLING_PARAMS reach LiteLLM. Responses are plain dicts typed with TypedDicts: they are
built for every chunk, so they stay cheap; the tests validate them against OpenAI's published schemas.
"""

from __future__ import annotations

from dataclasses import dataclass
from decimal import Decimal
from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError
from pydantic_core import ErrorDetails
from typing_extensions import TypedDict

from mom_service.engine.events import Breakdown, CallReport, Usage
from mom_service.errors import InvalidRequest
from mom_service.usage.money import usd

# ---------------------------------------------------------------------------------------------------- requests

MAX_STOP = 4  # stop sequences, as OpenAI allows

SAMPLING_PARAMS = (
    "temperature",
    "top_p",
    "max_tokens",
    "max_completion_tokens",
    "stop",
    "seed",
    "user",
    "presence_penalty",
    "frequency_penalty",
)


class _Open(BaseModel):
    """Unknown fields are accepted (and never read); known ones are validated strictly, as OpenAI's API does: a
    string where a boolean or a number belongs is a 400, not coerced."""

    model_config = ConfigDict(extra="allow", strict=True)


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


class ChatMessage(_Open):
    role: Literal["system", "developer", "user", "assistant"]
    content: str | list[ContentPart]
    name: str | None = Field(default=None, min_length=1, max_length=64)

    def to_upstream(self) -> dict[str, Any]:
        """The message as LiteLLM gets it: only the fields we know, no empty ones."""
        message: dict[str, Any] = {"role": self.role}
        if isinstance(self.content, str):
            message["content"] = self.content
        else:
            message["content"] = [part.to_upstream() for part in self.content]
        if self.name:
            message["name"] = self.name
        return message


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
    presence_penalty: float | None = Field(default=None, ge=-2, le=2)
    frequency_penalty: float | None = Field(default=None, ge=-2, le=2)

    @property
    def include_usage(self) -> bool:
        return bool(self.stream_options and self.stream_options.include_usage)

    def sampling_params(self) -> dict[str, Any]:
        """The allowlisted sampling parameters the client set: all that reaches the panel from the body."""
        params: dict[str, Any] = {}
        for name in SAMPLING_PARAMS:
            value = getattr(self, name)
            if value is not None:
                params[name] = value
        return params

    def upstream_messages(self) -> list[dict[str, Any]]:
        return [m.to_upstream() for m in self.messages]


_TYPE_NAMES = frozenset({"str", "int", "float", "bool", "list", "dict", "none"})


def _param_path(loc: tuple[int | str, ...]) -> str:
    """`messages[0].content[1].text` from pydantic's location, without its union-branch and tag names."""
    path = ""
    skip_tag = False
    for part in loc:
        if isinstance(part, int):
            path += f"[{part}]"
            continue
        if skip_tag:  # a tagged union names the tag before the field
            skip_tag = False
            continue
        if "[" in part or part in _TYPE_NAMES:
            skip_tag = "tagged-union" in part
            continue
        path += f".{part}" if path else part
    return path


@dataclass(frozen=True, slots=True)
class RequestLimits:
    """What one request may hold before it reaches a provider (MOM_MAX_MESSAGES, MOM_MAX_TEXT_CHARS)."""

    max_messages: int = 2000
    max_text_chars: int = 4 * 1024 * 1024


_JSON_TYPES: dict[str, str] = {
    "bool_type": "a boolean",
    "int_type": "an integer",
    "float_type": "a number",
    "string_type": "a string",
    "list_type": "an array",
    "dict_type": "an object",
    "model_type": "an object",
}


_PYTHON_JSON_TYPES: tuple[tuple[type, str], ...] = (
    (bool, "a boolean"),  # (before int: a bool is an int in Python)
    (int, "an integer"),
    (float, "a decimal number"),
    (str, "a string"),
    (list, "an array"),
    (dict, "an object"),
)


def _json_type(value: Any) -> str:
    """What JSON type a decoded value was, as OpenAI's errors name it."""
    return next((name for kind, name in _PYTHON_JSON_TYPES if isinstance(value, kind)), "null")


def _invalid(error: ErrorDetails) -> InvalidRequest:
    """OpenAI's 400 for one validation error, naming the parameter (its own wording for wrong types)."""
    param = _param_path(error["loc"])
    if error["type"] == "missing":
        return InvalidRequest(f"Missing required parameter: '{param}'.", param=param, code="missing_required_parameter")
    expected = _JSON_TYPES.get(error["type"])
    if expected is not None:
        message = f"Invalid type for '{param}': expected {expected}, but got {_json_type(error['input'])} instead."
        return InvalidRequest(message, param=param, code="invalid_type")
    if error["type"] == "too_long" and isinstance(error["input"], list):
        return _array_too_long(param, int((error.get("ctx") or {}).get("max_length", 0)), len(error["input"]))
    return InvalidRequest(f"Invalid value for '{param}': {error['msg']}.", param=param, code="invalid_value")


def _array_too_long(param: str, limit: int, length: int) -> InvalidRequest:
    return InvalidRequest(
        f"Invalid '{param}': array too long. Expected an array with maximum length {limit}, but got an array with "
        f"length {length} instead.",
        param=param,
        code="array_above_max_length",
    )


def text_chars(messages: list[ChatMessage]) -> int:
    """Characters of text in a conversation (images not counted)."""
    total = 0
    for message in messages:
        if isinstance(message.content, str):
            total += len(message.content)
        else:
            total += sum(len(part.text) for part in message.content if isinstance(part, TextPart))
    return total


def parse_chat_request(data: Any, limits: RequestLimits = RequestLimits()) -> ChatCompletionRequest:
    """Validate a decoded body; raise an OpenAI-shaped 400 naming the first wrong parameter. The size of what a
    request may hold is checked first, so an oversized one costs no validation."""
    if not isinstance(data, dict):
        raise InvalidRequest("The request body must be a JSON object.", code="invalid_request_body")
    messages = data.get("messages")
    if isinstance(messages, list) and len(messages) > limits.max_messages:
        raise _array_too_long("messages", limits.max_messages, len(messages))
    try:
        request = ChatCompletionRequest.model_validate(data)
    except ValidationError as exc:
        errors = exc.errors(include_url=False)
        # A union failure lists one error per branch: report the most specific (longest) location, and of those
        # the branch whose type matched (an array too long, rather than "not a string").
        first = max(errors, key=lambda e: (len(e["loc"]), e["type"] not in _JSON_TYPES), default=None)
        if first is None:
            raise InvalidRequest("Invalid request body.") from None
        raise _invalid(first) from None
    if request.n is not None and request.n != 1:
        raise InvalidRequest("Only n=1 is supported: a MoM model gives one answer.", param="n", code="invalid_value")
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
    vision: bool


class ModelObject(TypedDict):
    id: str
    object: Literal["model"]
    created: int
    owned_by: str
    capabilities: Capabilities  # ours, beside the standard fields: does the MoM model accept images


class ModelList(TypedDict):
    object: Literal["list"]
    data: list[ModelObject]


OWNED_BY = "mom-service"


def model_object(name: str, created: int, *, vision: bool) -> ModelObject:
    return {"id": name, "object": "model", "created": created, "owned_by": OWNED_BY, "capabilities": {"vision": vision}}


def usage_dict(usage: Usage, cost: Decimal | None = None) -> dict[str, Any]:
    """OpenAI's CompletionUsage, with our `cost` (USD) beside the standard fields."""
    return {
        "prompt_tokens": usage.prompt_tokens,
        "completion_tokens": usage.completion_tokens,
        "total_tokens": usage.total_tokens,
        "completion_tokens_details": {"reasoning_tokens": usage.reasoning_tokens},
        "prompt_tokens_details": {"cached_tokens": usage.cached_tokens},
        "cost": usd(cost),
    }


def _report_dict(report: CallReport) -> dict[str, Any]:
    return {
        "name": report.name,
        "model": report.model,
        "status": report.status,
        "reason": report.error_type,
        "error": report.error,
        "latency_ms": report.latency_ms,
        "ttft_ms": report.ttft_ms,
        "usage": usage_dict(report.usage, report.cost) if report.usage is not None else None,
        "usage_estimated": report.estimated,
        "cost": usd(report.cost),
        "cached": report.cached,
        "images": report.images,
    }


def breakdown_dict(breakdown: Breakdown) -> dict[str, Any]:
    """The `mom` object: what each member and the concluding call did."""
    return {
        "members": [_report_dict(m) for m in breakdown.members],
        "concluding": _report_dict(breakdown.concluding),
        "concluding_fallbacks": [_report_dict(r) for r in breakdown.concluding_failed],
        "answered": breakdown.answered,
        "asked": breakdown.asked,
        "degraded": breakdown.degraded,
        "cost": usd(breakdown.cost),
        "cost_saved": usd(breakdown.saved) or 0.0,
        "usage_estimated": breakdown.usage_estimated,
        "unpriced": breakdown.unpriced,
        "cache": breakdown.cache,
    }


def completion_body(
    *,
    completion_id: str,
    created: int,
    model: str,
    content: str,
    reasoning_content: str | None,
    finish_reason: str,
    usage: Usage,
    breakdown: Breakdown,
) -> dict[str, Any]:
    """A `chat.completion` (CreateChatCompletionResponse) with the `mom` breakdown beside it."""
    message: dict[str, Any] = {"role": "assistant", "content": content, "refusal": None}
    if reasoning_content is not None:
        message["reasoning_content"] = reasoning_content
    return {
        "id": completion_id,
        "object": "chat.completion",
        "created": created,
        "model": model,
        "choices": [{"index": 0, "message": message, "finish_reason": finish_reason, "logprobs": None}],
        "usage": usage_dict(usage, breakdown.cost),
        "mom": breakdown_dict(breakdown),
    }
