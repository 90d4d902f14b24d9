"""The panel: every member asked at once, and the rules that decide when enough have answered (quorum, deadline,
min_successful). A member's report is filled in place as its call ends; a member cut off is settled by the engine."""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncGenerator

from mom_service.cache.keys import member_key
from mom_service.engine.calls import Calls, ms_since
from mom_service.engine.events import Breakdown, CallReport, Event, MemberFinished, MemberStarted
from mom_service.engine.plan import Member, Plan
from mom_service.engine.tracing import NO_GENERATION, Trace
from mom_service.providers.circuit_breaker import Permit, Result
from mom_service.providers.pricing import ZERO

MemberTasks = dict[asyncio.Task[CallReport], int]  # each member's call, and its index in the plan


def member_reports(plan: Plan, not_answered: str, stage: str = "answer") -> list[CallReport]:
    """The members' calls of a round before they are made: not answered yet, or skipped."""
    members = []
    for member in plan.members:
        report = CallReport(name=member.llm.name, model=member.llm.model, cost=ZERO, stage=stage)
        if member.skipped is not None:
            report.skipped(member.skipped_kind, member.skipped)
        else:
            report.cancelled(not_answered)
            report.images = "sent" if plan.has_images else None
        members.append(report)
    return members


def new_breakdown(plan: Plan, not_answered: str) -> Breakdown:
    """Every call of the plan before it is made: members not answered yet (or skipped), nobody concluding."""
    members = member_reports(plan, not_answered)
    first = plan.concluders[0]
    concluding = CallReport(
        name=first.llm.name,
        model=first.llm.model,
        role="concluding",
        stage="conclude",
        status="skipped",
        images=first.images,
    )
    concluding.cost = ZERO
    steering = plan.steering
    return Breakdown(
        members=members,
        concluding=concluding,
        notices=list(steering.notices),
        overrides=steering.applied,
        tier=plan.tier,
        strategy=plan.strategy,
    )


def fan_out(calls: Calls, plan: Plan, members: list[CallReport], trace: Trace) -> MemberTasks:
    """Ask every member that can be asked, at once; the others are skipped (images, open circuits)."""
    tasks: MemberTasks = {}
    for index, (member, report) in enumerate(zip(plan.members, members, strict=True)):
        permit = calls.breakers.allow(member.llm.name) if member.skipped is None else None
        if permit is not None:
            tasks[asyncio.create_task(ask_member(calls, plan, member, report, permit, trace))] = index
            continue
        if member.skipped is None:  # its circuit is open: not asked this time
            report.skipped("circuit_open", calls.breakers.reason(member.llm.name))
            report.images = None
        if report.error_type != "relay":  # a relay turn's members are not part of it: no generation each time
            trace.generation(report, [], plan.params).finish(report, "")
    return tasks


async def wait_for_panel(
    calls: Calls, plan: Plan, members: list[CallReport], tasks: MemberTasks, started: float
) -> AsyncGenerator[Event]:
    """MemberStarted for each member asked (its call is on its way), then MemberFinished as each member settles,
    until all have, or the quorum or the deadline cuts the rest."""
    for index in tasks.values():
        yield MemberStarted(members[index])
    mom = plan.mom
    loop = asyncio.get_running_loop()
    deadline = loop.time() + mom.member_deadline_ms / 1000 if mom.member_deadline_ms else None
    pending = set(tasks)
    cut_reason = ""
    overdue = False  # the deadline passed with too few answers: start as soon as there are enough
    while pending:
        wait_s = max(deadline - loop.time(), 0) if deadline is not None and not overdue else None
        done, pending = await asyncio.wait(pending, timeout=wait_s, return_when=asyncio.FIRST_COMPLETED)
        for task in done:
            yield MemberFinished(task.result())
        answers = sum(1 for r in members if r.status == "ok")
        if mom.quorum is not None and answers >= mom.quorum:
            cut_reason = f"cut off: the quorum of {mom.quorum} had answered"
            break
        if deadline is not None and loop.time() >= deadline:
            if answers >= mom.min_successful:
                cut_reason = f"cut off: member_deadline_ms ({mom.member_deadline_ms}) passed"
                break
            overdue = True  # too few answers: wait on, each member within its own timeout
    for task in pending:  # members cut off by the quorum or the deadline: cancelled, reported as such
        index = tasks[task]
        if not task.done():  # (one may have finished while the events above were being sent)
            task.cancel()
            member = plan.members[index]
            calls.cut(member.llm, member.messages, members[index], cut_reason, started)
        yield MemberFinished(members[index])


def cancel_members(
    calls: Calls, plan: Plan, members: list[CallReport], tasks: MemberTasks, reason: str, started: float
) -> None:
    """The request ended with members still running (the client left): cancelled, and settled as such."""
    for task, index in tasks.items():
        if task.cancel() and members[index].latency_ms is None:
            member = plan.members[index]
            calls.cut(member.llm, member.messages, members[index], reason, started)


async def ask_member(
    calls: Calls, plan: Plan, member: Member, report: CallReport, permit: Permit, trace: Trace
) -> CallReport:
    """Ask one member, filling its `report` in place (the engine settles it itself when it cuts it off)."""
    llm = member.llm
    started = time.perf_counter()
    verdict: Result = "abandoned"  # for the circuit breaker; the permit always goes back, however this ends
    generation = NO_GENERATION
    cache = calls.cache if plan.cache.used else None
    key = ""
    try:
        if cache is not None:
            key = member_key(llm, member.messages, member.params, owner=plan.cache_owner, encoded=member.encoded)
            stored = await cache.get_member(key) if plan.cache.lookup else None
            if stored is not None:  # this member gave this answer to this input: not asked again
                report.from_cache(stored.text, stored.saved, stored.tool_calls)
                report.latency_ms = ms_since(started)
                return report
        generation = trace.generation(report, member.messages, member.params)
        verdict = await calls.whole(llm, report, member.messages, member.params, member.encoded)
    except asyncio.CancelledError:
        generation.finish(report, "")
        raise
    finally:
        calls.breakers.record(permit, verdict)
    report.latency_ms = ms_since(started)
    generation.finish(report, report.text)
    if cache is not None and plan.cache.store and report.status == "ok":
        # in the background: storing never delays the answer
        calls.in_background(cache.put_member(key, plan.mom.cache.ttl_seconds, report))
    return report
