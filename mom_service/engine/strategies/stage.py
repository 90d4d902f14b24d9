"""One call of a strategy's stage (a ranking, a judgement): asked whole, not streamed, through the circuit
breaker; under a cost cap with its output ceiling from what is left (or not made); accounted like any call."""

from __future__ import annotations

import asyncio
import time
from decimal import Decimal
from typing import Any

from mom_service.engine.calls import NOT_ANSWERED, Calls, ms_since
from mom_service.engine.cost_cap import STAGE_CEILING, reservation
from mom_service.engine.events import CallReport, Role
from mom_service.engine.plan import Concluder, Plan
from mom_service.engine.tracing import NO_GENERATION, Trace
from mom_service.providers.circuit_breaker import Result
from mom_service.providers.pricing import ZERO


def stage_report(who: Concluder, role: Role, stage: str) -> CallReport:
    """A stage call before it is made: not answered yet."""
    report = CallReport(name=who.llm.name, model=who.llm.model, role=role, stage=stage, images=who.images)
    report.cancelled(NOT_ANSWERED)
    return report


def stage_params(plan: Plan, who: Concluder) -> dict[str, Any]:
    """A stage call's parameters: the request's sampling, its role's reasoning effort (no tools, no format)."""
    params = dict(plan.params)
    if who.effort is not None:
        params["reasoning_effort"] = who.effort
    return params


def reserve(
    calls: Calls, plan: Plan, who: Concluder, report: CallReport, messages: list[dict[str, Any]], spent: Decimal
) -> tuple[dict[str, Any] | None, Decimal]:
    """Under a cost cap: the call's parameters with its output ceiling from what is left after `spent`, and its
    worst case (to reserve before the next call made at the same time); None when too little is left (the report
    says so). Without a cap: its parameters, and nothing reserved."""
    params = stage_params(plan, who)
    ceiling = who.ceiling or STAGE_CEILING
    place = reservation(plan, who.llm.model, ceiling, messages, spent, calls.prices.get(who.llm.name))
    if place.refused is not None:
        report.skipped("cost_cap", place.refused)
        return None, ZERO
    if place.max_tokens is None:
        return params, ZERO
    return {**params, "max_tokens": place.max_tokens}, place.worst


async def ask(
    calls: Calls,
    who: Concluder,
    report: CallReport,
    messages: list[dict[str, Any]],
    params: dict[str, Any],
    trace: Trace,
) -> CallReport:
    """One stage call, its `report` filled in place: answered, failed, skipped by its open circuit, or cancelled
    (the request ended first: what it read is paid, as our estimate)."""
    llm = who.llm
    permit = calls.breakers.allow(llm.name)
    if permit is None:
        report.skipped("circuit_open", calls.breakers.reason(llm.name))
        trace.generation(report, [], params).finish(report, "")
        return report
    started = time.perf_counter()
    verdict: Result = "abandoned"
    generation = NO_GENERATION
    try:
        generation = trace.generation(report, messages, params)
        verdict = await calls.whole(llm, report, messages, params)
    except asyncio.CancelledError:
        calls.cut(llm, messages, report, "cancelled: the request ended first", started)
        generation.finish(report, "")
        raise
    finally:
        calls.breakers.record(permit, verdict)
    report.latency_ms = ms_since(started)
    generation.finish(report, report.text)
    return report
