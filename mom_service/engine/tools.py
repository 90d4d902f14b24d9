"""Tools in a panel's conversation: which turn a request is, what a member that cannot call tools reads instead
(the tools and the tool history as text), how proposals are compared for a vote, and how a streamed call is put
back together. Pure functions."""

from __future__ import annotations

from collections import Counter
from collections.abc import Sequence
from typing import Any

import orjson

from mom_service.engine.events import CallReport, ToolCallDelta


def ends_with_tool_results(messages: Sequence[dict[str, Any]]) -> bool:
    """Whether the conversation's last message is a tool result: an agent ran the calls and comes back."""
    return bool(messages) and messages[-1].get("role") == "tool"


def has_tool_history(messages: Sequence[dict[str, Any]]) -> bool:
    return any(m.get("role") == "tool" or m.get("tool_calls") for m in messages)


def describe_tools(tools: Sequence[dict[str, Any]]) -> str:
    """The tools as text, for an LLM that cannot call them: it is told what exists and answers in prose."""
    lines = [
        "The user's application offers these tools (functions). You cannot call them yourself: say in your answer "
        "which you would call, with which arguments (as JSON), and why."
    ]
    for tool in tools:
        function = tool.get("function") or {}
        parameters = orjson.dumps(function.get("parameters") or {}).decode()
        lines.append(f"- {function.get('name')}: {function.get('description') or ''} Parameters: {parameters}")
    return "\n".join(lines)


def history_as_text(messages: Sequence[dict[str, Any]]) -> list[dict[str, Any]]:
    """The conversation with its tool calls and tool results written out as text (for an LLM without tools)."""
    out: list[dict[str, Any]] = []
    for message in messages:
        if message.get("role") == "tool":
            out.append(
                {
                    "role": "user",
                    "content": f"[tool result for call {message.get('tool_call_id')}]\n{_text(message.get('content'))}",
                }
            )
        elif message.get("tool_calls"):
            calls = "\n".join(
                f"[tool call {c.get('id')}] {c['function']['name']}({c['function']['arguments']})"
                for c in message["tool_calls"]
            )
            text = _text(message.get("content"))
            out.append({"role": "assistant", "content": f"{text}\n{calls}".strip()})
        else:
            out.append(message)
    return out


def _text(content: Any) -> str:
    if isinstance(content, list):
        return "\n".join(p.get("text", "") for p in content if isinstance(p, dict))
    return content if isinstance(content, str) else ""


def proposal_calls(report: CallReport) -> str:
    """A member's proposed calls as JSON (name and arguments, in order), for the concluding LLM and the thinking
    context; "" when it proposed none."""
    if not report.tool_calls:
        return ""
    calls = [{"name": c["function"]["name"], "arguments": _arguments(c)} for c in report.tool_calls]
    return orjson.dumps(calls).decode()


def _arguments(call: dict[str, Any]) -> Any:
    raw = call["function"].get("arguments") or "{}"
    try:
        return orjson.loads(raw)
    except orjson.JSONDecodeError:
        return raw


def _canonical(calls: Sequence[dict[str, Any]]) -> tuple[tuple[str, str], ...]:
    """The same calls whatever their ids, order, or the keys' order and spacing in their arguments."""
    return tuple(
        sorted(
            (c["function"]["name"], orjson.dumps(_arguments(c), option=orjson.OPT_SORT_KEYS).decode()) for c in calls
        )
    )


def vote(members: Sequence[CallReport], threshold: int, *, parallel: bool = True) -> list[dict[str, Any]] | None:
    """The calls that at least `threshold` members proposed alike (the first such member's, ids included), or None.
    Without `parallel` (the client said `parallel_tool_calls: false`), only a proposal of one call can win."""
    proposals = [
        (_canonical(m.tool_calls), m)
        for m in members
        if m.status == "ok" and m.tool_calls and (parallel or len(m.tool_calls) == 1)
    ]
    if not proposals:
        return None
    counts = Counter(key for key, _ in proposals)
    key, count = counts.most_common(1)[0]
    if count < threshold:
        return None
    winner = next(m for k, m in proposals if k == key)
    return winner.tool_calls


def as_deltas(calls: Sequence[dict[str, Any]]) -> list[ToolCallDelta]:
    """Whole calls as the events of a streamed answer: one piece each."""
    return [
        ToolCallDelta(index=i, id=c["id"], name=c["function"]["name"], arguments=c["function"]["arguments"])
        for i, c in enumerate(calls)
    ]


def fragment_deltas(fragments: Sequence[dict[str, Any]]) -> list[ToolCallDelta]:
    """Tool-call fragments as OpenAI streams them (`index`, then `id`, `function.name`, `function.arguments`
    pieces) as the engine's events."""
    deltas = []
    for fragment in fragments:
        function = fragment.get("function") or {}
        deltas.append(
            ToolCallDelta(
                index=int(fragment.get("index") or 0),
                arguments=function.get("arguments") or "",
                id=fragment.get("id"),
                name=function.get("name"),
            )
        )
    return deltas


class CallAssembler:
    """A streamed answer's tool calls put back together from their pieces."""

    def __init__(self) -> None:
        self._calls: dict[int, dict[str, Any]] = {}

    def add(self, delta: ToolCallDelta) -> None:
        call = self._calls.setdefault(
            delta.index, {"id": "", "type": "function", "function": {"name": "", "arguments": ""}}
        )
        if delta.id:
            call["id"] = delta.id
        if delta.name:
            call["function"]["name"] += delta.name
        call["function"]["arguments"] += delta.arguments

    def calls(self) -> list[dict[str, Any]] | None:
        return [self._calls[i] for i in sorted(self._calls)] or None
