"""Two serializations of the engine's events: SSE chunks as they come, or one `chat.completion` at the end.

The thinking context is decided here, once, for both: with `think_tags` the members' blocks go into `content`
inside `<think>...</think>`; with `reasoning_content` they go into `reasoning_content` (a stream: as the members
write, api/encoders/thinking.py) and `content` carries only the synthesis.
"""

from __future__ import annotations

import time
import uuid
from collections.abc import Sequence
from typing import Any

import orjson

from mom_service.api.encoders.breakdown import breakdown_dict, usage_dict
from mom_service.api.encoders.thinking import LiveThinking
from mom_service.config import MoMModelConfig
from mom_service.engine.events import (
    Breakdown,
    Completed,
    ContentDelta,
    Event,
    Failed,
    MemberDelta,
    MemberFinished,
    PanelDone,
    StageDone,
    ToolCallDelta,
    Usage,
)
from mom_service.engine.synthesis import THINK_CLOSE, THINK_OPEN, ThinkingBlocks, thought
from mom_service.engine.tools import CallAssembler
from mom_service.errors import MoMError

CONTENT = "content"
REASONING = "reasoning_content"


class ThinkingRouter:
    """Turns events into (field, text) pieces of the answer: where each piece of text goes. `live` (a stream): the
    members' text goes to reasoning_content as they write it; else one block per member, when it ends."""

    __slots__ = ("_blocks", "_live", "_opened", "_tags", "enabled")

    def __init__(
        self, mom: MoMModelConfig, *, json_answer: bool = False, notices: Sequence[str] = (), live: bool = False
    ) -> None:
        self.enabled = mom.include_thinking_context
        self._blocks = ThinkingBlocks(notices)
        # a JSON answer's content is the JSON alone (a client parses it): its thinking goes to reasoning_content
        self._tags = mom.thinking_format == "think_tags" and not json_answer
        self._opened = False
        self._live = LiveThinking(notices) if live and self.to_reasoning else None

    @property
    def to_reasoning(self) -> bool:
        """Whether the member blocks travel as `reasoning_content` (else inside `content`, or nowhere)."""
        return self.enabled and not self._tags

    def pieces(self, event: Event) -> list[tuple[str, str]]:
        if isinstance(event, ContentDelta):
            return [(CONTENT, event.text)]
        if not self.enabled:
            return []
        if self._live is not None:
            if isinstance(event, MemberDelta):
                text = self._live.delta(event)
            elif isinstance(event, MemberFinished | StageDone):
                text = self._live.finished(event)
            else:
                return []
            return [(REASONING, text)] if text else []
        if isinstance(event, MemberFinished | StageDone):
            block = self._blocks.of(thought(event))
            if not self._tags:
                return [(REASONING, block)]
            if not self._opened:
                self._opened = True
                block = THINK_OPEN + block
            return [(CONTENT, block)]
        if isinstance(event, PanelDone) and self._tags and self._opened:
            return [(CONTENT, THINK_CLOSE)]
        return []


def new_completion_id() -> str:
    return f"chatcmpl-{uuid.uuid4().hex}"


class StreamSerializer:
    """Events to SSE bytes. The chunk's constant head is encoded once; each chunk adds only its delta."""

    def __init__(
        self, mom: MoMModelConfig, *, include_usage: bool, json_answer: bool = False, notices: Sequence[str] = ()
    ) -> None:
        self._router = ThinkingRouter(mom, json_answer=json_answer, notices=notices, live=True)
        self._include_usage = include_usage
        self.completion_id = new_completion_id()
        self.created = int(time.time())
        self._head = (
            b'data: {"id":"'
            + self.completion_id.encode()
            + b'","object":"chat.completion.chunk","created":'
            + str(self.created).encode()
            + b',"model":'
            + orjson.dumps(mom.name)
        )
        self._started = False

    @property
    def started(self) -> bool:
        """Whether any chunk has been produced (after that, errors travel as an SSE event)."""
        return self._started

    def _chunk(
        self, delta: dict[str, Any], finish_reason: str | None = None, logprobs: list[dict[str, Any]] | None = None
    ) -> bytes:
        return (
            self._head
            + b',"choices":[{"index":0,"delta":'
            + orjson.dumps(delta)
            + b',"finish_reason":'
            + (orjson.dumps(finish_reason) if finish_reason else b"null")
            + b',"logprobs":'
            + (orjson.dumps({"content": logprobs, "refusal": None}) if logprobs is not None else b"null")
            + b"}]}\n\n"
        )

    def _role_chunk(self) -> bytes:
        self._started = True
        return self._chunk({"role": "assistant", "content": ""})

    def feed(self, event: Event) -> bytes:
        """The bytes this event adds to the stream (possibly none)."""
        if isinstance(event, ContentDelta):  # first: nearly every event is one
            out = b"" if self._started else self._role_chunk()
            return out + self._chunk({CONTENT: event.text}, logprobs=event.logprobs)
        if isinstance(event, Completed):
            out = b"" if self._started else self._role_chunk()
            out += self._chunk({}, event.finish_reason)
            if self._include_usage:
                out += (
                    self._head
                    + b',"choices":[],"usage":'
                    + orjson.dumps(usage_dict(event.usage, event.breakdown.cost))
                    + b',"mom":'
                    + orjson.dumps(breakdown_dict(event.breakdown))
                    + b"}\n\n"
                )
            return out + b"data: [DONE]\n\n"
        if isinstance(event, Failed):
            return self.error(event.error)
        if isinstance(event, ToolCallDelta):
            if self._started:
                return self._chunk({"tool_calls": [tool_call_delta(event)]})
            self._started = True  # the answer opens with a call: the role rides on it, with no text, as OpenAI's
            return self._chunk({"role": "assistant", "content": None, "tool_calls": [tool_call_delta(event)]})
        pieces = self._router.pieces(event)
        if not pieces:
            return b""
        out = b"" if self._started else self._role_chunk()
        for field, text in pieces:
            out += self._chunk({field: text})
        return out

    @staticmethod
    def error(error: MoMError) -> bytes:
        """An error after the stream began: its last event (OpenAI's error object), then `[DONE]`."""
        return b"data: " + error.to_json() + b"\n\ndata: [DONE]\n\n"


class CompletionCollector:
    """Events to one `chat.completion` body."""

    def __init__(self, mom: MoMModelConfig, *, json_answer: bool = False, notices: Sequence[str] = ()) -> None:
        self._mom = mom
        self._router = ThinkingRouter(mom, json_answer=json_answer, notices=notices)
        self._content: list[str] = []
        self._reasoning: list[str] = []
        self._calls = CallAssembler()
        self._logprobs: list[dict[str, Any]] | None = None

    def feed(self, event: Event) -> dict[str, object] | None:
        """Returns the body at Completed; raises the error at Failed; otherwise collects."""
        if isinstance(event, Failed):
            raise event.error
        if isinstance(event, Completed):
            reasoning = "".join(self._reasoning) if self._router.to_reasoning else None
            return completion_body(
                completion_id=new_completion_id(),
                created=int(time.time()),
                model=self._mom.name,
                content="".join(self._content),
                reasoning_content=reasoning,
                finish_reason=event.finish_reason,
                usage=event.usage,
                breakdown=event.breakdown,
                tool_calls=self._calls.calls(),
                logprobs=self._logprobs,
            )
        if isinstance(event, ToolCallDelta):
            self._calls.add(event)
            return None
        if isinstance(event, ContentDelta) and event.logprobs is not None:
            self._logprobs = [*(self._logprobs or []), *event.logprobs]
        for field, text in self._router.pieces(event):
            (self._content if field == CONTENT else self._reasoning).append(text)
        return None


def tool_call_delta(delta: ToolCallDelta) -> dict[str, Any]:
    """A piece of a streamed tool call, as OpenAI streams it: the first with its id, type and name."""
    function: dict[str, Any] = {"arguments": delta.arguments}
    out: dict[str, Any] = {"index": delta.index}
    if delta.id is not None:
        out |= {"id": delta.id, "type": "function"}
    if delta.name is not None:
        function["name"] = delta.name
    out["function"] = function
    return out


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
    tool_calls: list[dict[str, Any]] | None = None,
    logprobs: list[dict[str, Any]] | None = None,
) -> dict[str, Any]:
    """A `chat.completion` (CreateChatCompletionResponse) with the `mom` breakdown beside it. With tool calls and
    no text, `content` is null, as OpenAI answers."""
    message: dict[str, Any] = {"role": "assistant", "content": content or (None if tool_calls else ""), "refusal": None}
    if tool_calls:
        message["tool_calls"] = tool_calls
    if reasoning_content is not None:
        message["reasoning_content"] = reasoning_content
    choice_logprobs = {"content": logprobs, "refusal": None} if logprobs is not None else None
    return {
        "id": completion_id,
        "object": "chat.completion",
        "created": created,
        "model": model,
        "choices": [{"index": 0, "message": message, "finish_reason": finish_reason, "logprobs": choice_logprobs}],
        "usage": usage_dict(usage, breakdown.cost),
        "mom": breakdown_dict(breakdown),
    }
