"""layers: Mixture-of-Agents. `layers: N` rounds (default 2): from the second on, every member gets the conversation
with the previous round's answers as references and answers again, under the panel rules (quorum, deadline,
min_successful) each round; the concluding LLM synthesizes the last round."""

from __future__ import annotations

import dataclasses
import time
from collections.abc import AsyncGenerator
from contextlib import aclosing
from decimal import Decimal
from typing import Any

from mom_service.engine.calls import NOT_ANSWERED, Calls
from mom_service.engine.concluding import Concluded, conclude, too_few_answered
from mom_service.engine.cost_cap import Reservation, reservation
from mom_service.engine.events import Breakdown, Event, PanelDone, StageStarted
from mom_service.engine.panel import cancel_members, fan_out, member_reports, wait_for_panel
from mom_service.engine.plan import Member, Plan
from mom_service.engine.strategies.prompts import references
from mom_service.engine.tracing import Trace
from mom_service.providers.pricing import ZERO


def _round(plan: Plan, note: dict[str, Any], spent: Decimal, prices: Any) -> Plan:
    """The plan of a round: every member asked again with the references; under a cost cap, each within what is
    left once the ones before it are reserved (else skipped, `cost_cap`)."""
    members: list[Member] = []
    reserved = spent
    for member in plan.members:
        if member.skipped is not None:
            members.append(member)
            continue
        messages = [*member.messages, note]
        params = member.params
        ceiling = params.get("max_tokens")  # (set on every member's call under a cap)
        price = prices.get(member.llm.name)
        place = reservation(plan, member.llm.model, ceiling, messages, reserved, price) if ceiling else Reservation()
        if place.refused is not None:
            members.append(Member(member.llm, [], skipped=place.refused, skipped_kind="cost_cap"))
            continue
        if place.max_tokens is not None:
            params = {**params, "max_tokens": place.max_tokens}
            reserved += place.worst
        members.append(dataclasses.replace(member, messages=messages, encoded=None, params=params))
    return dataclasses.replace(plan, members=tuple(members))


async def layers(
    calls: Calls, plan: Plan, breakdown: Breakdown, trace: Trace, concluded: Concluded
) -> AsyncGenerator[Event]:
    for number in range(2, plan.mom.layers + 1):
        yield StageStarted(f"round-{number}")
        note = references(breakdown.members)
        again = _round(plan, note, breakdown.cost or ZERO, calls.prices)
        reports = member_reports(again, NOT_ANSWERED, f"round-{number}")
        breakdown.stage_calls.extend(breakdown.members)  # the rounds before: calls of the request all the same
        breakdown.members = reports
        started = time.perf_counter()
        tasks = fan_out(calls, again, reports, trace)
        try:
            async with aclosing(wait_for_panel(calls, again, reports, tasks, started)) as settling:
                async for event in settling:
                    yield event
        finally:
            cancel_members(calls, again, reports, tasks, NOT_ANSWERED, started)
        if breakdown.answered < plan.mom.min_successful:
            yield PanelDone(breakdown.members)
            yield too_few_answered(plan, breakdown)
            return
    yield PanelDone(breakdown.members)
    async with aclosing(conclude(calls, plan, breakdown, trace, concluded)) as events:
        async for event in events:
            yield event
