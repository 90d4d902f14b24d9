"""The engine's events as an OpenAI Response: one `response` object (`ResponseCollector`), or its SSE stream
(`ResponseStreamEncoder`: `response.created`, `response.in_progress`, each output item added, its parts and deltas,
done, then `response.completed`, `response.incomplete` or `response.failed`, each with its `sequence_number`).

The output: a `reasoning` item whose summary is the members' answers (when the MoM model's thinking context is on),
a `message` item with the synthesis as `output_text`, and a `function_call` item per tool call of the answer (with
`namespace` and the function's own `name` for a function of a namespace tool).
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from decimal import Decimal
from typing import Any

from mom_service.api.encoders.breakdown import breakdown_dict
from mom_service.api.schemas.responses_input import new_id
from mom_service.engine.events import (
    Breakdown,
    Completed,
    ContentDelta,
    Event,
    Failed,
    MemberFinished,
    StageDone,
    ToolCallDelta,
    Usage,
)
from mom_service.engine.synthesis import ThinkingBlocks, thought
from mom_service.engine.tools import CallAssembler
from mom_service.errors import MoMError
from mom_service.usage.money import usd


def response_usage(usage: Usage, cost: Decimal | None = None) -> dict[str, Any]:
    """OpenAI's ResponseUsage (chat's usage under the Responses names), with our `cost` (USD) beside it."""
    return {
        "input_tokens": usage.prompt_tokens,
        "input_tokens_details": {"cached_tokens": usage.cached_tokens, "cache_write_tokens": 0},
        "output_tokens": usage.completion_tokens,
        "output_tokens_details": {"reasoning_tokens": usage.reasoning_tokens},
        "total_tokens": usage.total_tokens,
        "cost": usd(cost),
    }


def failure(error: MoMError) -> dict[str, str]:
    """A Response's `error`: OpenAI's codes for it are few (server_error, rate_limit_exceeded, ...)."""
    return {"code": "rate_limit_exceeded" if error.status_code == 429 else "server_error", "message": error.message}


def reasoning_item(item_id: str, text: str, status: str = "completed") -> dict[str, Any]:
    summary = [{"type": "summary_text", "text": text}] if text else []
    return {"id": item_id, "type": "reasoning", "summary": summary, "status": status}


def message_item(item_id: str, text: str | None, status: str = "completed") -> dict[str, Any]:
    content = [] if text is None else [{"type": "output_text", "text": text, "annotations": [], "logprobs": []}]
    return {"id": item_id, "type": "message", "status": status, "role": "assistant", "content": content}


Namespaces = dict[str, tuple[str, str]]  # a namespace's function's qualified name -> (namespace, name)


def call_item(
    item_id: str, call: dict[str, Any], status: str = "completed", namespaces: Namespaces | None = None
) -> dict[str, Any]:
    function = call["function"]
    item = {"id": item_id, "type": "function_call", "status": status, "call_id": call["id"], "name": function["name"]}
    found = (namespaces or {}).get(function["name"])
    if found is not None:
        item["namespace"], item["name"] = found
    return item | {"arguments": function["arguments"]}


def assistant_message(text: str, calls: list[dict[str, Any]] | None) -> dict[str, Any]:
    """The answer as the next turn's conversation holds it (Chat Completions' assistant message)."""
    message: dict[str, Any] = {"role": "assistant", "content": text or (None if calls else "")}
    if calls:
        message["tool_calls"] = calls
    return message


class ResponseShape:
    """What every state of one Response shares: its id, creation time, model and the request's echoed fields."""

    def __init__(
        self,
        model: str,
        echo: dict[str, Any],
        *,
        thinking: bool,
        namespaces: Namespaces | None = None,
        notices: Sequence[str] = (),
    ) -> None:
        self.id = new_id("resp")
        self.created_at = int(time.time())
        self.model = model
        self.echo = echo
        self.thinking = thinking  # the members' answers go into a reasoning item
        self.namespaces = namespaces or {}  # the request's namespace tools' functions, by qualified name
        self.notices = notices  # the request's notices: at the top of the reasoning

    def body(
        self,
        status: str,
        output: list[dict[str, Any]],
        *,
        completed: Completed | None = None,
        error: MoMError | None = None,
        breakdown: Breakdown | None = None,
    ) -> dict[str, Any]:
        incomplete = completed is not None and completed.finish_reason == "length"
        body: dict[str, Any] = {
            "id": self.id,
            "object": "response",
            "created_at": self.created_at,
            "status": status,
            "completed_at": int(time.time()) if status == "completed" else None,
            "error": failure(error) if error is not None else None,
            "incomplete_details": {"reason": "max_output_tokens"} if incomplete else None,
            "model": self.model,
            "output": output,
            **self.echo,
        }  # `usage` only once known: OpenAI's schema has it an object, never null
        if completed is not None:
            body["usage"] = response_usage(completed.usage, completed.breakdown.cost)
            breakdown = completed.breakdown
        if breakdown is not None:
            body["mom"] = breakdown_dict(breakdown)
        return body

    def final_status(self, completed: Completed) -> str:
        return "incomplete" if completed.finish_reason == "length" else "completed"


class ResponseCollector:
    """Events to one `response` object."""

    def __init__(self, shape: ResponseShape) -> None:
        self.shape = shape
        self._reasoning: list[str] = []
        self._blocks = ThinkingBlocks(shape.notices)
        self._text: list[str] = []
        self._calls = CallAssembler()
        self.response: dict[str, Any] | None = None  # the whole Response, once Completed
        self.assistant: dict[str, Any] | None = None  # the answer as the next turn's conversation holds it

    def feed(self, event: Event) -> dict[str, Any] | None:
        """Returns the body at Completed; raises the error at Failed; otherwise collects."""
        if isinstance(event, ContentDelta):
            self._text.append(event.text)
        elif isinstance(event, ToolCallDelta):
            self._calls.add(event)
        elif isinstance(event, MemberFinished | StageDone):
            if self.shape.thinking:
                self._reasoning.append(self._blocks.of(thought(event)))
        elif isinstance(event, Failed):
            raise event.error
        elif isinstance(event, Completed):
            return self._complete(event)
        return None

    def _complete(self, event: Completed) -> dict[str, Any]:
        status = self.shape.final_status(event)
        text, calls = "".join(self._text), self._calls.calls()
        output = [reasoning_item(new_id("rs"), "".join(self._reasoning))] if self._reasoning else []
        if text or not calls:
            output.append(message_item(new_id("msg"), text, status))
        output += [call_item(new_id("fc"), call, namespaces=self.shape.namespaces) for call in calls or ()]
        self.response = self.shape.body(status, output, completed=event)
        self.assistant = assistant_message(text, calls)
        return self.response
