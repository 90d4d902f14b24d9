"""A wire model's validation errors as the 400 every surface answers: the first wrong parameter named as the client
wrote it (`messages[0].content[1].text`), in OpenAI's words for wrong types and arrays too long."""

from __future__ import annotations

from collections.abc import Sequence
from datetime import UTC, datetime
from typing import Any

from pydantic import ValidationError
from pydantic_core import ErrorDetails

from mom_service.errors import InvalidRequest

MAX_UNIX_S = 253402300800  # 10000-01-01
_TYPE_NAMES = frozenset({"str", "int", "float", "bool", "list", "dict", "none"})


def param_path(loc: tuple[int | str, ...]) -> str:
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


def invalid(error: ErrorDetails) -> InvalidRequest:
    """OpenAI's 400 for one validation error, naming the parameter (its own wording for wrong types)."""
    param = param_path(error["loc"])
    if error["type"] == "missing":
        return InvalidRequest(f"Missing required parameter: '{param}'.", param=param, code="missing_required_parameter")
    expected = _JSON_TYPES.get(error["type"])
    if expected is not None:
        message = f"Invalid type for '{param}': expected {expected}, but got {_json_type(error['input'])} instead."
        return InvalidRequest(message, param=param, code="invalid_type")
    if error["type"] == "too_long" and isinstance(error["input"], list):
        return array_too_long(param, int((error.get("ctx") or {}).get("max_length", 0)), len(error["input"]))
    return InvalidRequest(f"Invalid value for '{param}': {error['msg']}.", param=param, code="invalid_value")


def array_too_long(param: str, limit: int, length: int) -> InvalidRequest:
    return InvalidRequest(
        f"Invalid '{param}': array too long. Expected an array with maximum length {limit}, but got an array with "
        f"length {length} instead.",
        param=param,
        code="array_above_max_length",
    )


def first_error(exc: ValidationError) -> InvalidRequest:
    """The 400 for a model that did not validate. A union failure lists one error per branch: the most specific
    (longest) location is reported, and of those the branch whose type matched (an array too long, rather than
    "not a string")."""
    errors = exc.errors(include_url=False)
    first = max(errors, key=lambda e: (len(e["loc"]), e["type"] not in _JSON_TYPES), default=None)
    return InvalidRequest("Invalid request body.") if first is None else invalid(first)


def conversation_chars(messages: Sequence[dict[str, Any]]) -> int:
    """Characters of text in an engine conversation (OpenAI's shapes; images not counted): what MOM_MAX_TEXT_CHARS
    bounds, whatever surface the conversation came in by."""
    total = 0
    for message in messages:
        content = message.get("content")
        if isinstance(content, str):
            total += len(content)
        elif isinstance(content, list):
            total += sum(len(part.get("text", "")) for part in content)
        total += sum(len(call["function"]["arguments"]) for call in message.get("tool_calls") or ())
    return total


def parse_time(value: str, param: str) -> float:
    """Unix seconds, or ISO 8601 (a time without offset is UTC)."""
    text = value.strip()
    try:
        seconds = float(text)
    except ValueError:
        pass
    else:
        if not 0 <= seconds < MAX_UNIX_S:
            raise InvalidRequest(
                f"Invalid value for '{param}': {value} is not a time in unix seconds.",
                param=param,
                code="invalid_value",
            )
        return seconds
    try:
        parsed = datetime.fromisoformat(text.replace("z", "Z"))
    except ValueError:
        raise InvalidRequest(
            f"Invalid value for '{param}': '{value}' is neither ISO 8601 nor unix seconds.",
            param=param,
            code="invalid_value",
        ) from None
    if parsed.tzinfo is None:
        parsed = parsed.replace(tzinfo=UTC)
    return parsed.timestamp()
