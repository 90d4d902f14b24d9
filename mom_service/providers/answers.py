"""What an LLM answered, read the same way on both call paths: a whole answer's text, tool calls, usage and
finish_reason; a stream's chunks as pieces (text, or a Delta with more), its finish_reason and usage. The lean
path's JSON (dicts) and LiteLLM's response objects are read alike."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from mom_service.providers.tokens import Usage


@dataclass(slots=True)
class StreamEnd:
    """The last item of a stream: why it ended, and the usage when the provider reported it."""

    finish_reason: str
    usage: Usage | None


@dataclass(slots=True)
class Delta:
    """A streamed piece that is more than text (most are plain `str`): tool-call fragments as OpenAI streams them
    (`index`, then `id`, `function.name`, `function.arguments` fragments), and the tokens' log probabilities."""

    text: str = ""
    tool_calls: list[dict[str, Any]] | None = None
    logprobs: list[dict[str, Any]] | None = None


@dataclass(slots=True)
class CallResult:
    text: str
    usage: Usage | None
    tool_calls: list[dict[str, Any]] | None = None  # OpenAI's shape: {"id", "type": "function", "function": {...}}
    finish_reason: str | None = None  # as the provider said it (length: cut short by the output token limit)


def litellm_finished(stream: Any, finish_reason: str | None) -> bool:
    """Whether a LiteLLM stream reached its end. LiteLLM gives every stream a last chunk with a finish_reason, making
    one up ("stop") when the provider sent none (its OpenAI path raises instead): its own record of what the
    provider sent decides, where this LiteLLM keeps one."""
    if getattr(stream, "is_mock", False) or not hasattr(stream, "received_finish_reason"):
        return finish_reason is not None  # (a mock_response stream, as the demo config's, records none)
    return bool(
        stream.received_finish_reason
        or getattr(stream, "intermittent_finish_reason", None)
        or getattr(stream, "received_any_finish_reason", False)
    )


def field_of(obj: Any, name: str) -> Any:
    """A field of LiteLLM's response objects, or of the lean path's JSON (dicts)."""
    return obj.get(name) if isinstance(obj, dict) else getattr(obj, name, None)


def as_dict(obj: Any) -> dict[str, Any]:
    """LiteLLM's pydantic objects as the JSON the lean path reads (dicts pass as they are)."""
    if isinstance(obj, dict):
        return obj
    dumped: dict[str, Any] = obj.model_dump(exclude_none=True)
    return dumped


def chunk_parts(chunk: Any) -> tuple[str | None, str | None, Any, Delta | None]:
    """(content, finish_reason, raw usage, a Delta when the chunk carries more than text) of one streamed chunk,
    LiteLLM's object or the lean path's JSON."""
    choices = field_of(chunk, "choices")
    if not choices:
        return None, None, field_of(chunk, "usage"), None
    choice = choices[0]
    delta = field_of(choice, "delta")
    content = field_of(delta, "content")
    calls = field_of(delta, "tool_calls")
    logprobs = field_of(choice, "logprobs")
    extra = None
    if calls or logprobs:
        tokens = field_of(logprobs, "content") if logprobs else None
        extra = Delta(
            text=content or "",
            tool_calls=[as_dict(c) for c in calls] if calls else None,
            logprobs=[as_dict(t) for t in tokens] if tokens else None,
        )
    return content, field_of(choice, "finish_reason"), field_of(chunk, "usage"), extra


@dataclass(slots=True)
class Reading:
    """What a stream said so far besides its pieces: why it ended, its usage, whether a piece of answer came."""

    finish_reason: str | None = None
    usage: Usage | None = None
    answered: bool = False  # text or tool calls came: the stream was not empty

    def take(self, chunk: Any) -> str | Delta | None:
        """The piece a chunk carries (None: none), its finish_reason and usage noted."""
        content, finished, raw_usage, extra = chunk_parts(chunk)
        if finished:
            self.finish_reason = finished
        if raw_usage:
            self.usage = usage_from(raw_usage)
        piece = extra if extra is not None else content or None
        self.answered = self.answered or piece is not None
        return piece


def litellm_reported_usage(stream: Any) -> bool:
    """Whether the provider's chunks carried usage: asked for it, LiteLLM counts it itself when a server sends none
    (llama.cpp's), and gives that count as if reported. (A mock stream, or a LiteLLM that keeps no chunks: trusted.)"""
    chunks = getattr(stream, "chunks", None)
    if getattr(stream, "is_mock", False) or not isinstance(chunks, list):
        return True
    return any(getattr(chunk, "usage", None) is not None for chunk in chunks)


def tool_calls_of(message: Any) -> list[dict[str, Any]] | None:
    """A whole answer's tool calls, in OpenAI's shape."""
    calls = field_of(message, "tool_calls")
    if not calls:
        return None
    out = []
    for call in calls:
        function = as_dict(field_of(call, "function") or {})
        out.append(
            {
                "id": field_of(call, "id"),
                "type": "function",
                "function": {"name": function.get("name"), "arguments": function.get("arguments") or "{}"},
            }
        )
    return out


def usage_from(raw: Any) -> Usage | None:
    """Usage as the provider reported it (None when it did not: the engine then counts it itself)."""
    if raw is None:
        return None
    details = field_of(raw, "completion_tokens_details")
    prompt_details = field_of(raw, "prompt_tokens_details")
    return Usage(
        prompt_tokens=int(field_of(raw, "prompt_tokens") or 0),
        completion_tokens=int(field_of(raw, "completion_tokens") or 0),
        reasoning_tokens=int(field_of(details, "reasoning_tokens") or 0) if details is not None else 0,
        cached_tokens=int(field_of(prompt_details, "cached_tokens") or 0) if prompt_details is not None else 0,
    )
