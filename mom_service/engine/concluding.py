"""The concluding stage: the concluding LLM streams the answer from the panel's; the next fallback takes over when
one fails before its first token (or its circuit is open); Failed when none answers."""

from __future__ import annotations

import time
from collections.abc import AsyncGenerator
from contextlib import aclosing
from dataclasses import dataclass, field

from mom_service.engine.calls import Calls, ms_since
from mom_service.engine.events import Breakdown, CallReport, ContentDelta, Event, Failed
from mom_service.engine.plan import Concluder, Plan
from mom_service.engine.synthesis import concluding_messages
from mom_service.engine.tracing import Trace
from mom_service.errors import UpstreamFailed
from mom_service.providers.caller import StreamEnd
from mom_service.providers.circuit_breaker import Permit, Result
from mom_service.providers.errors import LLMCallError, is_transient


@dataclass(slots=True)
class Concluded:
    """What the concluding call that answered leaves behind: why it stopped, and its answer as streamed."""

    finish_reason: str | None = None
    pieces: list[str] = field(default_factory=list)


def too_few_answered(plan: Plan, breakdown: Breakdown) -> Failed:
    """The 502 when fewer members answered than `min_successful`, naming each failure."""
    failures = "; ".join(f"{r.name}: {r.error}" for r in breakdown.members if r.status != "ok" and r.asked)
    breakdown.concluding.error = "too few panel members answered"
    message = (
        f"{breakdown.answered} of {breakdown.asked} panel members answered, "
        f"{plan.mom.min_successful} needed ({failures})"
    )
    return Failed(UpstreamFailed(message, code="members_failed"), breakdown)


async def conclude(
    calls: Calls, plan: Plan, breakdown: Breakdown, trace: Trace, concluded: Concluded
) -> AsyncGenerator[Event]:
    """The concluding LLM's answer, streamed; the next fallback when one fails before its first token (or is
    skipped by its circuit); Failed when none answers."""
    answered = [r for r in breakdown.members if r.status != "skipped"]
    for number, candidate in enumerate(plan.concluders):
        last = number + 1 == len(plan.concluders)
        if number:  # the previous one failed before its first token: the next one concludes
            breakdown.concluding_failed.append(breakdown.concluding)
            llm = candidate.llm
            breakdown.concluding = CallReport(
                name=llm.name, model=llm.model, role="concluding", images=candidate.images
            )
        report = breakdown.concluding
        permit = calls.breakers.allow(candidate.llm.name)
        if permit is None:  # its circuit is open: the next one, if any
            report.skipped("circuit_open", calls.breakers.reason(candidate.llm.name))
            trace.generation(report, [], plan.params).finish(report, "")
            if last:
                message = f"The concluding LLM '{candidate.llm.name}' was not asked: {report.error}"
                yield Failed(UpstreamFailed(message, code="concluding_failed"), breakdown)
                return
            continue
        call = concluding_call(calls, plan, candidate, report, permit, answered, trace, concluded)
        try:
            async with aclosing(call) as pieces:
                async for event in pieces:
                    yield event
        except LLMCallError as exc:
            if report.ttft_ms is None and not last:
                continue
            when = "after it began answering" if report.ttft_ms is not None else "before answering"
            message = f"The concluding LLM '{candidate.llm.name}' failed {when}: {exc.message}"
            yield Failed(UpstreamFailed(message, code="concluding_failed"), breakdown)
        return


async def concluding_call(
    calls: Calls,
    plan: Plan,
    candidate: Concluder,
    report: CallReport,
    permit: Permit,
    answered: list[CallReport],
    trace: Trace,
    concluded: Concluded,
) -> AsyncGenerator[Event]:
    """One concluding LLM's streamed answer; raises LLMCallError when it fails (its report says how)."""
    llm = candidate.llm
    messages = concluding_messages(plan.prompt, candidate.conversation, answered)
    started = time.perf_counter()
    report.status, report.sent = "cancelled", True  # until it ends
    generation = trace.generation(report, messages, plan.params)
    pieces: list[str] = []
    verdict: Result = "abandoned"
    try:
        async with aclosing(calls.caller.stream(llm, messages, plan.params)) as stream:
            async for piece in stream:
                if isinstance(piece, StreamEnd):
                    report.usage = piece.usage
                    concluded.finish_reason = piece.finish_reason
                    continue
                if report.ttft_ms is None:
                    report.ttft_ms = ms_since(started)
                    trace.first_token(generation)
                pieces.append(piece)
                yield ContentDelta(piece)
    except LLMCallError as exc:
        verdict = "failure" if is_transient(exc) else "abandoned"
        concluded.finish_reason = None
        calls.failed(llm, report, exc, messages, "".join(pieces))
        raise
    else:
        verdict = "success"
        report.answered("")
        concluded.pieces = pieces
        calls.charge(llm, report, messages, "".join(pieces))
    finally:
        calls.breakers.record(permit, verdict)
        if report.status == "cancelled":  # the request ended while it streamed: what it produced is paid
            report.cancelled("cancelled: the request ended first (the client left, or the service shut down)")
            calls.charge(llm, report, messages, "".join(pieces))
        report.latency_ms = ms_since(started)
        generation.finish(report, "".join(pieces))
