"""The panel: every member asked at once, and the rules that decide when enough have answered (quorum, deadline,
min_successful). A member's report is filled in place as its call ends; a member cut off is settled by the engine."""

from __future__ import annotations

import asyncio
import time
from collections import deque
from collections.abc import AsyncGenerator, Iterator
from functools import partial

from mom_service.cache.keys import member_key
from mom_service.engine.calls import Calls, ms_since
from mom_service.engine.events import Breakdown, CallReport, Event, MemberDelta, MemberFinished, MemberStarted
from mom_service.engine.plan import Member, Plan
from mom_service.engine.tracing import NO_GENERATION, Trace
from mom_service.providers.circuit_breaker import Permit, Result
from mom_service.providers.pricing import ZERO


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


DELTA_WAKE_S = 0.02  # members' text waits at most this long before the waiting loop is woken for it


class MemberTasks:
    """The members' calls in flight: each one's task and index in the plan, the text each has streamed so far, and
    what their tasks send the waiting loop, in order: MemberStarted, MemberDelta..., then the task itself once it
    has ended. One deque and one future to wake the loop: no task, queue or lock per piece.

    A member's start and end wake the loop at once; its text does not: a piece joins the member's MemberDelta not
    yet taken, and the loop is woken for text by one timer, DELTA_WAKE_S after the first piece it has not seen (or
    sooner, by a start or an end). So a member streaming many chunks costs the loop one wake per batch, not one per
    chunk; each member's pieces keep their order, and come before its end."""

    __slots__ = ("_items", "_open", "_timer", "_waiter", "indexes", "streamed")

    def __init__(self, size: int) -> None:
        self.indexes: dict[asyncio.Task[CallReport], int] = {}
        self.streamed: list[list[str]] = [[] for _ in range(size)]  # each member's text, as streamed
        self._items: deque[Sent] = deque()
        self._open: dict[int, MemberDelta] = {}  # by id(report): each member's delta not yet taken
        self._waiter: asyncio.Future[None] | None = None
        self._timer: asyncio.TimerHandle | None = None

    def send(self, item: Sent) -> None:
        self._items.append(item)
        self._wake()

    def delta(self, report: CallReport, text: str) -> None:
        """A piece of a member's answer (its task's per-piece path)."""
        waiting = self._open.get(id(report))
        if waiting is not None:
            waiting.text += text
            return
        item = self._open[id(report)] = MemberDelta(report, text)
        self._items.append(item)
        if self._timer is None and self._waiter is not None:
            self._timer = asyncio.get_running_loop().call_later(DELTA_WAKE_S, self._wake)

    def _wake(self) -> None:
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        waiter = self._waiter
        if waiter is not None and not waiter.done():
            waiter.set_result(None)

    async def wait(self, until: float | None) -> None:
        """Until something was sent (text: within DELTA_WAKE_S), or the loop's time `until` (None: no limit)."""
        if self._items:
            return
        loop = asyncio.get_running_loop()
        waiter = self._waiter = loop.create_future()
        timer = loop.call_at(until, _wake, waiter) if until is not None else None
        try:
            await waiter
        finally:
            self._waiter = None
            if timer is not None:
                timer.cancel()
            if self._timer is not None:
                self._timer.cancel()
                self._timer = None

    def taken(self) -> Iterator[Sent]:
        """What was sent, oldest first, each taken as it is yielded (what comes meanwhile is yielded too)."""
        items = self._items
        while items:
            item = items.popleft()
            if type(item) is MemberDelta:
                del self._open[id(item.report)]
            yield item

    def text(self, index: int) -> str:
        return "".join(self.streamed[index])


Sent = MemberStarted | MemberDelta | asyncio.Task[CallReport]


def _wake(waiter: asyncio.Future[None]) -> None:
    if not waiter.done():
        waiter.set_result(None)


def fan_out(calls: Calls, plan: Plan, members: list[CallReport], trace: Trace) -> MemberTasks:
    """Ask every member that can be asked, at once; the others are skipped (images, open circuits)."""
    tasks = MemberTasks(len(members))
    for index, (member, report) in enumerate(zip(plan.members, members, strict=True)):
        permit = calls.breakers.allow(member.llm.name) if member.skipped is None else None
        if permit is not None:
            asked = ask_member(calls, plan, member, report, permit, trace, tasks, index)
            task = asyncio.create_task(asked)
            task.add_done_callback(tasks.send)
            tasks.indexes[task] = index
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
    """MemberStarted and MemberDelta as members start and write, MemberFinished as each settles, until all have,
    or the quorum or the deadline cuts the rest (with `partial_answers`, what they wrote is their answer)."""
    mom = plan.mom
    loop = asyncio.get_running_loop()
    deadline = loop.time() + mom.member_deadline_ms / 1000 if mom.member_deadline_ms else None
    pending = set(tasks.indexes)
    cut_reason = ""
    overdue = False  # the deadline passed with too few answers: start as soon as there are enough
    answered = 0  # of the members settled so far (a member's report may say ok before its settling is taken)
    while pending:
        await tasks.wait(deadline if not overdue else None)
        settled = False
        for item in tasks.taken():
            if type(item) is MemberDelta or type(item) is MemberStarted:
                yield item
            elif item in pending:
                pending.discard(item)
                settled = True
                report = item.result()
                answered += report.status == "ok"
                yield MemberFinished(report)
        if settled and mom.quorum is not None and answered >= mom.quorum:
            cut_reason = f"cut off: the quorum of {mom.quorum} had answered"
            break
        if deadline is not None and loop.time() >= deadline:
            if answered >= mom.min_successful:
                cut_reason = f"cut off: member_deadline_ms ({mom.member_deadline_ms}) passed"
                break
            overdue = True  # too few answers: wait on, each member within its own timeout
    finished = [task for task in pending if task.done()]  # (finished while the events above were being sent)
    for task in finished:
        yield MemberFinished(members[tasks.indexes[task]])
    pending.difference_update(finished)
    for task in pending:  # members cut off by the quorum or the deadline: cancelled, reported as such
        index = tasks.indexes[task]
        if not task.done():
            task.cancel()
            member = plan.members[index]
            streamed = tasks.text(index)
            calls.cut(
                member.llm, member.messages, members[index], cut_reason, started, streamed, partial=mom.partial_answers
            )
    for item in tasks.taken():  # what the members cut off wrote last, before they are settled
        if type(item) is MemberDelta or type(item) is MemberStarted:
            yield item
    for task in pending:
        yield MemberFinished(members[tasks.indexes[task]])


def cancel_members(
    calls: Calls, plan: Plan, members: list[CallReport], tasks: MemberTasks, reason: str, started: float
) -> None:
    """The request ended with members still running (the client left): cancelled, and settled as such."""
    for task, index in tasks.indexes.items():
        if task.cancel() and members[index].latency_ms is None:
            member = plan.members[index]
            calls.cut(member.llm, member.messages, members[index], reason, started, tasks.text(index))


async def ask_member(
    calls: Calls,
    plan: Plan,
    member: Member,
    report: CallReport,
    permit: Permit,
    trace: Trace,
    tasks: MemberTasks,
    index: int,
) -> CallReport:
    """Ask one member, its answer streamed to `tasks` as it comes (when members stream: `Plan.members_streamed`;
    else asked whole, and its answer sent as one piece, as a cached answer is), filling its `report` in place (the
    engine settles it itself when it cuts it off)."""
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
                tasks.send(MemberStarted(report))
                if stored.text:
                    tasks.delta(report, stored.text)
                return report
        generation = trace.generation(report, member.messages, member.params)
        tasks.send(MemberStarted(report))
        if plan.members_streamed:
            send = partial(tasks.delta, report)
            verdict = await calls.streamed(member, report, tasks.streamed[index], send)
        else:  # asked whole: one read, one parse; its text is one piece
            verdict = await calls.whole(llm, report, member.messages, member.params, member.encoded)
            if report.text:
                tasks.delta(report, report.text)
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
