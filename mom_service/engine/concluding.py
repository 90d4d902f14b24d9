"""The concluding stage: the concluding LLM streams the answer (text, tool calls, or both) from the panel's, or, for
a tool loop's next step (a relay turn), from the conversation alone. The next fallback takes over when one fails
before its first token (or its circuit is open); Failed when none answers. A requested JSON answer is checked:
streamed, the breakdown says whether it is valid; whole, an invalid one gets one corrective retry, then a 502."""

from __future__ import annotations

import logging
import time
from collections.abc import AsyncGenerator
from contextlib import aclosing
from dataclasses import dataclass, field
from typing import Any

from mom_service.engine import structured
from mom_service.engine.cached import Piece
from mom_service.engine.calls import Calls, ms_since
from mom_service.engine.cost_cap import Room, room
from mom_service.engine.events import Breakdown, CallReport, ContentDelta, Event, Failed, ToolCallDelta
from mom_service.engine.plan import Concluder, Plan
from mom_service.engine.planning import INSTRUCTION_HEAD
from mom_service.engine.synthesis import concluding_messages
from mom_service.engine.tools import CallAssembler, fragment_deltas
from mom_service.engine.tracing import Trace
from mom_service.errors import UpstreamFailed
from mom_service.providers.caller import Delta, StreamEnd
from mom_service.providers.circuit_breaker import Permit, Result
from mom_service.providers.errors import LLMCallError, is_transient
from mom_service.providers.pricing import ZERO
from mom_service.providers.tokens import count_request

logger = logging.getLogger("mom_service")


@dataclass(slots=True)
class Concluded:
    """What the concluding call that answered leaves behind: why it stopped, and its answer as streamed."""

    finish_reason: str | None = None
    pieces: list[Piece] = field(default_factory=list)


def too_few_answered(plan: Plan, breakdown: Breakdown) -> Failed:
    """The 502 when fewer members answered than `min_successful`, naming each failure."""
    failures = "; ".join(f"{r.name}: {r.error}" for r in breakdown.members if r.status != "ok" and r.asked)
    breakdown.concluding.error = "too few panel members answered"
    message = (
        f"{breakdown.answered} of {breakdown.asked} panel members answered, "
        f"{plan.mom.min_successful} needed ({failures})"
    )
    return Failed(UpstreamFailed(message, code="members_failed"), breakdown)


def _messages(plan: Plan, candidate: Concluder, breakdown: Breakdown) -> list[dict[str, Any]]:
    if plan.turn == "relay":  # the agent's loop goes on: the conversation as it is, with the tools
        instruction = plan.steering.instruction
        told = [{"role": "system", "content": f"{INSTRUCTION_HEAD}\n{instruction}"}] if instruction else []
        return [*told, *candidate.conversation]
    answered = [r for r in breakdown.members if r.status != "skipped"]
    return concluding_messages(plan.prompt, candidate.conversation, answered, breakdown.ranking)


async def conclude(
    calls: Calls, plan: Plan, breakdown: Breakdown, trace: Trace, concluded: Concluded
) -> AsyncGenerator[Event]:
    """The concluding LLM's answer; the next fallback when one fails before its first token (or is skipped by
    its circuit); Failed when none answers."""
    for number, candidate in enumerate(plan.concluders):
        last = number + 1 == len(plan.concluders)
        if number:  # the previous one failed before its first token: the next one concludes
            breakdown.concluding_failed.append(breakdown.concluding)
            breakdown.concluding = _report(candidate)
        report = breakdown.concluding
        messages = _messages(plan, candidate, breakdown)
        space = _room(calls, plan, candidate, breakdown, messages)
        permit = calls.breakers.allow(candidate.llm.name) if space is None or space.refused is None else None
        if permit is None:  # too little left under the cost cap, or its circuit is open: the next one, if any
            if space is not None and space.refused is not None:
                report.skipped("cost_cap", space.refused)
            else:
                report.skipped("circuit_open", calls.breakers.reason(candidate.llm.name))
            trace.generation(report, [], plan.params).finish(report, "")
            if last:
                message = f"The concluding LLM '{candidate.llm.name}' was not asked: {report.error}"
                yield Failed(UpstreamFailed(message, code="concluding_failed"), breakdown)
                return
            continue
        params = _params(plan, candidate, space)
        form = plan.response_format
        answer = (
            concluding_call(calls, plan, candidate, report, messages, params, trace, concluded, permit)
            if form is None or plan.stream  # streamed as it comes (no layer between: this is the per-chunk path)
            else _checked(calls, plan, candidate, breakdown, messages, params, form, trace, concluded, permit)
        )
        try:
            async with aclosing(answer) as events:
                async for event in events:
                    yield event
            if form is not None and plan.stream and concluded.finish_reason not in (None, "tool_calls"):
                answered = text_of(concluded.pieces)
                breakdown.structured_output = "valid" if structured.problem(form, answered) is None else "invalid"
        except LLMCallError as exc:
            report = breakdown.concluding
            if report.ttft_ms is None and not last:
                continue
            when = "after it began answering" if report.ttft_ms is not None else "before answering"
            message = f"The concluding LLM '{candidate.llm.name}' failed {when}: {exc.message}"
            yield Failed(UpstreamFailed(message, code="concluding_failed"), breakdown)
        return


def prompt_tokens(plan: Plan) -> int:
    """Our count of what the (first) concluding LLM reads for this plan before the panel's answers: the concluding
    prompt (none on a relay turn), the conversation in its shapes, and the tools (as their JSON)."""
    candidate = plan.concluders[0]
    messages = list(candidate.conversation)
    if plan.turn != "relay":
        messages.insert(0, {"role": "system", "content": plan.prompt})
    return count_request(candidate.llm.model, messages, plan.tools)


def _room(
    calls: Calls, plan: Plan, candidate: Concluder, breakdown: Breakdown, messages: list[dict[str, Any]]
) -> Room | None:
    """Under a cost cap, what is left for this concluding call (None without a cap)."""
    return room(plan, candidate, messages, breakdown.cost or ZERO, calls.prices.get(candidate.llm.name))


def _params(plan: Plan, candidate: Concluder, space: Room | None) -> dict[str, Any]:
    """The concluding call's parameters (with its reasoning effort); under a cost cap, its output ceiling from what
    is left."""
    params = plan.params_of(candidate)
    return params if space is None else {**params, "max_tokens": space.tokens}


def _report(candidate: Concluder) -> CallReport:
    llm = candidate.llm
    return CallReport(name=llm.name, model=llm.model, role="concluding", stage="conclude", images=candidate.images)


async def _checked(
    calls: Calls,
    plan: Plan,
    candidate: Concluder,
    breakdown: Breakdown,
    messages: list[dict[str, Any]],
    params: dict[str, Any],
    form: dict[str, Any],
    trace: Trace,
    concluded: Concluded,
    permit: Permit,
) -> AsyncGenerator[Event]:
    """A whole JSON answer, held until it is checked; an invalid one is asked again once, with why (under a cost
    cap, with what is left)."""
    call = concluding_call(calls, plan, candidate, breakdown.concluding, messages, params, trace, concluded, permit)
    refused = ""
    for attempt in range(2):
        async with aclosing(call) as events:
            held = [event async for event in events]
        answer = text_of(concluded.pieces)
        called = concluded.finish_reason == "tool_calls"  # tool calls, not the answer: nothing to check
        why = structured.problem(form, answer) if not called else None
        if why is None:
            breakdown.structured_output = None if called else "valid"
            for event in held:
                yield event
            return
        logger.warning("concluding LLM %s did not answer the JSON asked for (%s)", candidate.llm.name, why.summary)
        breakdown.concluding.failed("invalid_structured_output", f"not the JSON asked for: {why.summary}"[:300])
        if attempt:
            break
        messages = [*messages, *structured.correction(form, answer, why.detail)]
        space = _room(calls, plan, candidate, breakdown, messages)
        if space is not None and space.refused is not None:
            refused = f" (no corrective retry: {space.refused})"
            break
        retry = calls.breakers.allow(candidate.llm.name)
        if retry is None:
            break
        breakdown.concluding_failed.append(breakdown.concluding)
        breakdown.concluding = _report(candidate)
        params = _params(plan, candidate, space)
        call = concluding_call(calls, plan, candidate, breakdown.concluding, messages, params, trace, concluded, retry)
    breakdown.structured_output = "invalid"
    concluded.finish_reason = None
    detail = why.detail if why is not None else "no answer"
    message = f"The concluding LLM '{candidate.llm.name}' did not answer the JSON asked for: {detail}{refused}"
    yield Failed(UpstreamFailed(message, code="invalid_structured_output"), breakdown)


async def concluding_call(
    calls: Calls,
    plan: Plan,
    candidate: Concluder,
    report: CallReport,
    messages: list[dict[str, Any]],
    params: dict[str, Any],
    trace: Trace,
    concluded: Concluded,
    permit: Permit,
) -> AsyncGenerator[Event]:
    """One concluding LLM's streamed answer; raises LLMCallError when it fails (its report says how)."""
    llm = candidate.llm
    started = time.perf_counter()
    report.status, report.sent = "cancelled", True  # until it ends
    generation = trace.generation(report, messages, params)
    concluded.pieces, concluded.finish_reason = [], None
    pieces = concluded.pieces  # the answer as streamed: its text, and its tool-call fragments
    assembler = CallAssembler()
    verdict: Result = "abandoned"
    try:
        async with aclosing(calls.caller.stream(llm, messages, params)) as stream:
            async for piece in stream:
                if isinstance(piece, StreamEnd):
                    report.usage = piece.usage
                    concluded.finish_reason = report.finish_reason = piece.finish_reason
                    continue
                if report.ttft_ms is None:
                    report.ttft_ms = ms_since(started)
                    trace.first_token(generation)
                if isinstance(piece, str):  # plain text, nearly every chunk: the short way
                    pieces.append(piece)
                    yield ContentDelta(piece)
                    continue
                for event in _events(piece, assembler):
                    pieces.append(event.text if isinstance(event, ContentDelta) else _piece(event))
                    yield event
    except LLMCallError as exc:
        verdict = "failure" if is_transient(exc) else "abandoned"
        concluded.finish_reason = None
        calls.failed(llm, report, exc, messages, text_of(pieces))
        raise
    else:
        verdict = "success"
        report.answered("", assembler.calls())
        calls.charge(llm, report, messages, text_of(pieces))
    finally:
        calls.breakers.record(permit, verdict)
        if report.status == "cancelled":  # the request ended while it streamed: what it produced is paid
            report.cancelled("cancelled: the request ended first (the client left, or the service shut down)")
            calls.charge(llm, report, messages, text_of(pieces))
        report.latency_ms = ms_since(started)
        generation.finish(report, text_of(pieces))


def text_of(pieces: list[Piece]) -> str:
    """An answer's text, without its tool calls."""
    try:
        return "".join(pieces)  # type: ignore[arg-type]  # text alone, nearly always: joined at C speed
    except TypeError:  # tool-call pieces among them
        return "".join(p for p in pieces if isinstance(p, str))


def _events(piece: Delta, assembler: CallAssembler) -> list[ContentDelta | ToolCallDelta]:
    """A streamed piece with more than text as the engine's events: its text (and logprobs), then a ToolCallDelta
    per tool-call fragment."""
    events: list[ContentDelta | ToolCallDelta] = []
    if piece.text or piece.logprobs:
        events.append(ContentDelta(piece.text, piece.logprobs))
    for delta in fragment_deltas(piece.tool_calls or ()):
        assembler.add(delta)
        events.append(delta)
    return events


def _piece(delta: ToolCallDelta) -> dict[str, Any]:
    return {"index": delta.index, "id": delta.id, "name": delta.name, "arguments": delta.arguments}
