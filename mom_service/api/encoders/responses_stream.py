"""The engine's events as a Responses SSE stream, every event OpenAI sends for these items, in its order, each
framed `event: <type>` + `data: <json>` with a running `sequence_number`:

    response.created, response.in_progress (nothing is sent before the answer's first piece, as on the chat surface,
        so a failure before it is answered with its HTTP status)
    reasoning (thinking context on): output_item.added, reasoning_summary_part.added, reasoning_summary_text.delta
        (one per member's block), reasoning_summary_text.done, reasoning_summary_part.done, output_item.done
    message: output_item.added, content_part.added, output_text.delta..., output_text.done, content_part.done,
        output_item.done
    function_call (each): output_item.added (empty arguments), function_call_arguments.delta..., .done,
        output_item.done
    response.completed (response.incomplete when cut by max_output_tokens), or response.failed

The text deltas are the hot path: their constant head is encoded once per message item.
"""

from __future__ import annotations

from typing import Any

import orjson

from mom_service.api.encoders.responses import (
    ResponseShape,
    assistant_message,
    call_item,
    message_item,
    reasoning_item,
)
from mom_service.api.schemas.responses_input import new_id
from mom_service.engine.events import (
    Completed,
    ContentDelta,
    Event,
    Failed,
    MemberFinished,
    PanelDone,
    StageDone,
    ToolCallDelta,
)
from mom_service.engine.synthesis import ThinkingBlocks, thought
from mom_service.errors import MoMError

_SUMMARY_PART = {"type": "summary_text", "text": ""}
_TEXT_PART = {"type": "output_text", "text": "", "annotations": [], "logprobs": []}


class _Open:
    """The output item being streamed: its kind, id, index and what it holds so far."""

    __slots__ = ("call", "index", "item_id", "kind", "pieces")

    def __init__(self, kind: str, item_id: str, index: int, call: dict[str, Any] | None = None) -> None:
        self.kind, self.item_id, self.index, self.call = kind, item_id, index, call
        self.pieces: list[str] = []


class ResponseStreamEncoder:
    """Events to Responses SSE bytes."""

    def __init__(self, shape: ResponseShape) -> None:
        self.shape = shape
        self._blocks = ThinkingBlocks(shape.notices)
        self._seq = 0
        self._started = False
        self._output: list[dict[str, Any]] = []  # the items done, in order
        self._open: _Open | None = None
        self._text_head = b""  # the current message's output_text.delta fields but the delta
        self._text: list[str] = []  # the answer's text, all message items
        self._calls: list[dict[str, Any]] = []  # the answer's tool calls (chat's shape)
        self.response: dict[str, Any] | None = None  # the whole Response, once Completed
        self.assistant: dict[str, Any] | None = None  # the answer as the next turn's conversation holds it

    @property
    def started(self) -> bool:
        return self._started

    def _frame(self, kind: str, fields: bytes) -> bytes:
        """One SSE event; `fields` is the JSON object's members after `type`, before `sequence_number`."""
        seq = self._seq
        self._seq += 1
        head = b"event: " + kind.encode() + b'\ndata: {"type":"' + kind.encode() + b'",'
        return head + fields + b',"sequence_number":' + str(seq).encode() + b"}\n\n"

    def _event(self, kind: str, **fields: Any) -> bytes:
        return self._frame(kind, orjson.dumps(fields)[1:-1])

    def _begin(self) -> bytes:
        if self._started:
            return b""
        self._started = True
        snapshot = self.shape.body("in_progress", [])
        return self._event("response.created", response=snapshot) + self._event(
            "response.in_progress", response=snapshot
        )

    def feed(self, event: Event) -> bytes:
        """The bytes this event adds to the stream (possibly none)."""
        if isinstance(event, ContentDelta):  # first: nearly every event is one
            out = b"" if self._open is not None and self._open.kind == "message" else self._switch("message")
            self._open.pieces.append(event.text)  # type: ignore[union-attr]
            return out + self._frame("response.output_text.delta", self._text_head + orjson.dumps(event.text))
        if isinstance(event, ToolCallDelta):
            return self._call_piece(event)
        if isinstance(event, MemberFinished | StageDone):
            if not self.shape.thinking:
                return b""
            out = b"" if self._open is not None and self._open.kind == "reasoning" else self._switch("reasoning")
            block = self._blocks.of(thought(event))
            self._open.pieces.append(block)  # type: ignore[union-attr]
            return out + self._event(
                "response.reasoning_summary_text.delta", **self._at(), summary_index=0, delta=block
            )
        if isinstance(event, PanelDone):
            return self._close() if self._open is not None and self._open.kind == "reasoning" else b""
        if isinstance(event, Completed):
            return self._complete(event)
        if isinstance(event, Failed):
            return self.error(event.error)
        return b""

    def _at(self) -> dict[str, Any]:
        assert self._open is not None
        return {"item_id": self._open.item_id, "output_index": self._open.index}

    def _switch(self, kind: str, call: dict[str, Any] | None = None) -> bytes:
        """Close the item being streamed (if any) and open one of `kind`."""
        out = self._begin() + self._close()
        prefix = {"reasoning": "rs", "message": "msg", "function_call": "fc"}[kind]
        opened = self._open = _Open(kind, new_id(prefix), len(self._output), call)
        if kind == "reasoning":
            item = reasoning_item(opened.item_id, "", "in_progress")
            out += self._event("response.output_item.added", output_index=opened.index, item=item)
            return out + self._event(
                "response.reasoning_summary_part.added", **self._at(), summary_index=0, part=_SUMMARY_PART
            )
        if kind == "message":
            item = message_item(opened.item_id, None, "in_progress")
            out += self._event("response.output_item.added", output_index=opened.index, item=item)
            self._text_head = (
                b'"item_id":"' + opened.item_id.encode() + b'","output_index":' + str(opened.index).encode()
            ) + b',"content_index":0,"logprobs":[],"delta":'
            return out + self._event("response.content_part.added", **self._at(), content_index=0, part=_TEXT_PART)
        assert call is not None
        item = call_item(opened.item_id, call, "in_progress", self.shape.namespaces)
        return out + self._event("response.output_item.added", output_index=opened.index, item=item)

    def _close(self, status: str = "completed") -> bytes:
        """The events that finish the item being streamed."""
        opened, self._open = self._open, None
        if opened is None:
            return b""
        text = "".join(opened.pieces)
        at = {"item_id": opened.item_id, "output_index": opened.index}
        if opened.kind == "reasoning":
            item = reasoning_item(opened.item_id, text)
            part = {"type": "summary_text", "text": text}
            out = self._event("response.reasoning_summary_text.done", **at, summary_index=0, text=text)
            out += self._event("response.reasoning_summary_part.done", **at, summary_index=0, part=part)
        elif opened.kind == "message":
            self._text.append(text)
            item = message_item(opened.item_id, text, status)
            part = item["content"][0]
            out = self._event("response.output_text.done", **at, content_index=0, text=text, logprobs=[])
            out += self._event("response.content_part.done", **at, content_index=0, part=part)
        else:
            assert opened.call is not None
            opened.call["function"]["arguments"] = text
            self._calls.append(opened.call)
            item = call_item(opened.item_id, opened.call, namespaces=self.shape.namespaces)
            out = self._event("response.function_call_arguments.done", **at, name=item["name"], arguments=text)
        self._output.append(item)
        return out + self._event("response.output_item.done", output_index=opened.index, item=item)

    def _call_piece(self, delta: ToolCallDelta) -> bytes:
        out = b""
        opened = self._open
        if (
            opened is None
            or opened.kind != "function_call"
            or opened.call is None
            or opened.call["index"] != delta.index
        ):
            call = {"id": delta.id or "", "type": "function", "index": delta.index}
            call["function"] = {"name": delta.name or "", "arguments": ""}
            out = self._switch("function_call", call)
        elif delta.name:
            opened.call["function"]["name"] += delta.name
        if delta.arguments:
            assert self._open is not None
            self._open.pieces.append(delta.arguments)
            out += self._event("response.function_call_arguments.delta", **self._at(), delta=delta.arguments)
        return out

    def _complete(self, event: Completed) -> bytes:
        status = self.shape.final_status(event)
        out = self._begin() + self._close(status)
        if not self._output or all(item["type"] == "reasoning" for item in self._output):
            out += self._switch("message") + self._close(status)  # an answer always has its message
        calls = [{k: v for k, v in call.items() if k != "index"} for call in self._calls]
        self.response = self.shape.body(status, self._output, completed=event)
        self.assistant = assistant_message("".join(self._text), calls or None)
        kind = "response.incomplete" if status == "incomplete" else "response.completed"
        return out + self._event(kind, response=self.response)

    def error(self, error: MoMError) -> bytes:
        """The stream's last event when it fails after it began: `response.failed`, with the items done so far.
        (Its sequence number is the next one; it is not counted, so an error prepared in advance does not shift the
        numbers of the events sent before it.)"""
        failed = self.shape.body("failed", list(self._output), error=error)
        frame = self._event("response.failed", response=failed)
        self._seq -= 1
        return frame
