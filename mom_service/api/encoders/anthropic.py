"""The engine's events as Anthropic's Messages API answers: one `message` body, or its SSE stream
(`message_start`, per content block `content_block_start` / deltas / `content_block_stop`, `message_delta`,
`message_stop`; `ping` while the panel works; `event: error` when it fails after it began).

The content blocks, in order: the members' answers as a `thinking` block (when the MoM model shows its thinking
context or the client asks for `thinking`), signed so that the block can be checked when a client sends it back;
the concluding LLM's text; its tool calls as `tool_use` blocks. The `mom` breakdown rides beside Anthropic's
fields: on the message, and on the stream's `message_delta`.
"""

from __future__ import annotations

import uuid
from collections.abc import Callable, Sequence
from typing import Any

import orjson

from mom_service.api.encoders.breakdown import breakdown_dict
from mom_service.engine.events import (
    Completed,
    ContentDelta,
    Event,
    Failed,
    MemberFinished,
    PanelDone,
    StageDone,
    ToolCallDelta,
    Usage,
)
from mom_service.engine.synthesis import ThinkingBlocks, thought
from mom_service.engine.tools import CallAssembler
from mom_service.errors import MoMError

Sign = Callable[[str], str]  # a thinking block's text -> its signature

STOP_REASONS = {"stop": "end_turn", "length": "max_tokens", "tool_calls": "tool_use", "content_filter": "refusal"}
INVALID_ARGUMENTS = "_invalid_arguments"  # a tool call's arguments that are not a JSON object, kept under this key


def stop_reason(finish_reason: str) -> str:
    return STOP_REASONS.get(finish_reason, "end_turn")


def new_message_id() -> str:
    return f"msg_{uuid.uuid4().hex}"


def new_tool_use_id() -> str:
    """For a tool call whose LLM gave it no id (the upstream id is kept otherwise: the client sends it back)."""
    return f"toolu_{uuid.uuid4().hex[:24]}"


def usage_object(usage: Usage) -> dict[str, int]:
    """Anthropic's usage of the whole ensemble (every member and the concluding call, as Chat Completions reports
    it): `input_tokens` not read from a provider's cache, those read from it, and the output tokens."""
    return {
        "input_tokens": max(usage.prompt_tokens - usage.cached_tokens, 0),
        "output_tokens": usage.completion_tokens,
        "cache_creation_input_tokens": 0,
        "cache_read_input_tokens": usage.cached_tokens,
    }


def tool_input(arguments: str) -> dict[str, Any]:
    """A tool call's arguments as `input` (an object); arguments that are not a JSON object are kept as text."""
    try:
        value = orjson.loads(arguments or "{}")
    except orjson.JSONDecodeError:
        value = None
    return value if isinstance(value, dict) else {INVALID_ARGUMENTS: arguments}


class MessageCollector:
    """Events to one `message` body."""

    def __init__(self, model: str, *, thinking: bool, sign: Sign, notices: Sequence[str] = ()) -> None:
        self._model = model
        self._thinking: list[str] | None = [] if thinking else None
        self._blocks = ThinkingBlocks(notices)
        self._sign = sign
        self._text: list[str] = []
        self._calls = CallAssembler()

    def feed(self, event: Event) -> dict[str, Any] | None:
        """The body at Completed; raises the error at Failed; otherwise collects and returns None."""
        if isinstance(event, ContentDelta):
            self._text.append(event.text)
        elif isinstance(event, ToolCallDelta):
            self._calls.add(event)
        elif isinstance(event, MemberFinished | StageDone):
            if self._thinking is not None:
                self._thinking.append(self._blocks.of(thought(event)))
        elif isinstance(event, Failed):
            raise event.error
        elif isinstance(event, Completed):
            return self._body(event)
        return None

    def _body(self, event: Completed) -> dict[str, Any]:
        content: list[dict[str, Any]] = []
        if self._thinking:
            thinking = "".join(self._thinking)
            content.append({"type": "thinking", "thinking": thinking, "signature": self._sign(thinking)})
        text = "".join(self._text)
        if text:
            content.append({"type": "text", "text": text})
        for call in self._calls.calls() or ():
            function = call["function"]
            content.append(
                {
                    "type": "tool_use",
                    "id": call["id"] or new_tool_use_id(),
                    "name": function["name"],
                    "input": tool_input(function["arguments"]),
                }
            )
        return {
            "id": new_message_id(),
            "type": "message",
            "role": "assistant",
            "model": self._model,
            "content": content,
            "stop_reason": stop_reason(event.finish_reason),
            "stop_sequence": None,
            "usage": usage_object(event.usage),
            "mom": breakdown_dict(event.breakdown),
        }


def _frame(kind: bytes, data: bytes) -> bytes:
    return b"event: " + kind + b"\ndata: " + data + b"\n\n"


def _delta(index: int, delta: dict[str, Any]) -> dict[str, Any]:
    return {"type": "content_block_delta", "index": index, "delta": delta}


PING = _frame(b"ping", b'{"type":"ping"}')
MESSAGE_STOP = _frame(b"message_stop", b'{"type":"message_stop"}')
TEXT = "text"
THINKING = "thinking"


class MessageStreamEncoder:
    """Events to Anthropic's SSE events. Each open block's delta head is encoded once; a delta adds its text."""

    def __init__(self, model: str, *, thinking: bool, sign: Sign, notices: Sequence[str] = ()) -> None:
        self._model = model
        self._show_thinking = thinking
        self._blocks = ThinkingBlocks(notices)
        self._sign = sign
        self._started = False
        self._index = -1  # the open block's index (blocks are numbered from 0, in order)
        self._open: str | int | None = None  # TEXT, THINKING, a tool call's index in the answer, or None
        self._head = b""  # the open block's `content_block_delta` frame up to its delta's value
        self._thinking: list[str] = []

    @property
    def started(self) -> bool:
        """Whether `message_start` has been produced (after that, errors travel as an `error` event)."""
        return self._started

    def _start(self) -> bytes:
        if self._started:
            return b""
        self._started = True
        message: dict[str, Any] = {
            "id": new_message_id(),
            "type": "message",
            "role": "assistant",
            "model": self._model,
            "content": [],
            "stop_reason": None,
            "stop_sequence": None,
            "usage": usage_object(Usage()),
        }
        return _frame(b"message_start", orjson.dumps({"type": "message_start", "message": message}))

    def feed(self, event: Event) -> bytes:
        """The bytes this event adds to the stream (possibly none)."""
        if isinstance(event, ContentDelta):  # first: nearly every event is one
            if not event.text:
                return b""
            out = b"" if self._open == TEXT else self._block(TEXT, {"type": "text", "text": ""})
            return out + self._head + orjson.dumps(event.text) + b"}}\n\n"
        if isinstance(event, ToolCallDelta):
            out = b""
            if self._open != event.index:
                block = {"type": "tool_use", "id": event.id or new_tool_use_id(), "name": event.name or "", "input": {}}
                out = self._block(event.index, block)
            if event.arguments:
                out += self._head + orjson.dumps(event.arguments) + b"}}\n\n"
            return out
        if isinstance(event, MemberFinished | StageDone):
            if not self._show_thinking:  # the panel is working: a ping keeps the connection alive
                if isinstance(event, MemberFinished) and event.report.status != "ok" and not self._started:
                    return b""  # nothing is sent before a member answers: a panel that all fails is an HTTP error
                return self._start() + PING
            text = self._blocks.of(thought(event))
            self._thinking.append(text)
            out = b"" if self._open == THINKING else self._block(THINKING, {"type": "thinking", "thinking": ""})
            return out + self._head + orjson.dumps(text) + b"}}\n\n"
        if isinstance(event, PanelDone):
            return self._close() if self._open == THINKING else b""
        if isinstance(event, Completed):
            return self._start() + self._close() + self._end(event)
        if isinstance(event, Failed):
            return self.error(event.error)
        return b""

    def _block(self, key: str | int, block: dict[str, Any]) -> bytes:
        """Close the open block, open the next one."""
        out = self._start() + self._close()
        self._index += 1
        self._open = key
        if key == THINKING:
            block["signature"] = ""
        index = str(self._index).encode()
        start = {"type": "content_block_start", "index": self._index, "content_block": block}
        delta_type, field = {TEXT: (b"text_delta", b"text"), THINKING: (b"thinking_delta", b"thinking")}.get(
            key if isinstance(key, str) else "", (b"input_json_delta", b"partial_json")
        )
        self._head = (
            b'event: content_block_delta\ndata: {"type":"content_block_delta","index":'
            + index
            + b',"delta":{"type":"'
            + delta_type
            + b'","'
            + field
            + b'":'
        )
        return out + _frame(b"content_block_start", orjson.dumps(start))

    def _close(self) -> bytes:
        if self._open is None:
            return b""
        out = b""
        if self._open == THINKING:
            signature = self._sign("".join(self._thinking))
            delta = {"type": "signature_delta", "signature": signature}
            out = _frame(b"content_block_delta", orjson.dumps(_delta(self._index, delta)))
        self._open = None
        stop = {"type": "content_block_stop", "index": self._index}
        return out + _frame(b"content_block_stop", orjson.dumps(stop))

    def _end(self, event: Completed) -> bytes:
        delta = {
            "type": "message_delta",
            "delta": {"stop_reason": stop_reason(event.finish_reason), "stop_sequence": None},
            "usage": usage_object(event.usage),
            "mom": breakdown_dict(event.breakdown),
        }
        return _frame(b"message_delta", orjson.dumps(delta)) + MESSAGE_STOP

    @staticmethod
    def error(error: MoMError) -> bytes:
        """An error after the stream began: its last event, in Anthropic's shape."""
        return _frame(b"error", orjson.dumps(error.to_anthropic_dict()))
