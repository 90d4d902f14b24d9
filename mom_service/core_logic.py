"""The engine: plan the panel, fan out, wait for the members, synthesize, and yield events. No HTTP here."""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import AsyncGenerator, Callable, Coroutine, Mapping, Sequence
from contextlib import aclosing
from dataclasses import dataclass
from typing import Any, Literal

from mom_service.cache import CachedAnswer, ResponseCache, cacheable, cached_copy, member_key
from mom_service.circuit_breaker import CircuitBreakers, Permit, Result
from mom_service.config import LLMDefinition, MoMConfig, MoMModelConfig
from mom_service.cost_calculation import ZERO, call_cost
from mom_service.errors import InvalidRequest, UpstreamFailed
from mom_service.events import (
    Breakdown,
    CallReport,
    Completed,
    ContentDelta,
    Event,
    Failed,
    MemberFinished,
    PanelDone,
    RequestOutcome,
    RequestStatus,
    Usage,
)
from mom_service.inflight import InFlight
from mom_service.llm_calls import LLMCaller, LLMCallError, StreamEnd, is_transient
from mom_service.multimodal_utils import RULES, family, sanitize
from mom_service.pricing_utils import PriceBook
from mom_service.single_flight import Flight
from mom_service.synthesis import concluding_messages
from mom_service.tracing import NO_GENERATION, NO_TRACE, Trace, Tracer

logger = logging.getLogger("mom_service")

Recorder = Callable[[RequestOutcome], None]
NOT_ANSWERED = "cancelled before it answered"


@dataclass(slots=True, frozen=True)
class Member:
    """A panel member as this request asks it: the conversation in its provider's shapes, or why it is skipped."""

    llm: LLMDefinition
    messages: list[dict[str, Any]]
    skipped: str | None = None


@dataclass(slots=True, frozen=True)
class Concluder:
    """A concluding LLM as this request would ask it: the conversation in its shapes, images or placeholders."""

    llm: LLMDefinition
    conversation: tuple[dict[str, Any], ...]
    images: Literal["sent", "placeholders"] | None


@dataclass(slots=True, frozen=True)
class CachePolicy:
    """What the request lets the cache do (`Cache-Control: no-cache` skips the lookup, `no-store` the storing)."""

    lookup: bool = True
    store: bool = True

    @property
    def used(self) -> bool:
        return self.lookup or self.store


NO_CACHE = CachePolicy(lookup=False, store=False)


@dataclass(slots=True, frozen=True)
class Plan:
    """One request, resolved against the config: who is asked, who concludes, with what."""

    request_id: str
    mom: MoMModelConfig
    members: tuple[Member, ...]
    concluders: tuple[Concluder, ...]  # the concluding LLM, then its fallbacks, in the order they are tried
    has_images: bool
    prompt: str
    params: dict[str, Any]
    stream: bool
    user: str | None = None
    conversation: tuple[dict[str, Any], ...] = ()  # as the client sent it (for the trace)
    cache: CachePolicy = NO_CACHE  # what the cache may do for this request (NO_CACHE when the model's is off)


def make_plan(
    config: MoMConfig,
    mom: MoMModelConfig,
    messages: list[dict[str, Any]],
    params: dict[str, Any],
    *,
    vision: Mapping[str, bool],
    has_images: bool,
    request_id: str,
    stream: bool,
    user: str | None = None,
    cache: CachePolicy | None = None,
) -> Plan:
    """Who is asked: with images, only the members that can see them (400 when none can)."""
    members = []
    for name in mom.llms_to_query:
        llm = config.llm(name)
        if has_images and not vision[name]:
            members.append(Member(llm, [], skipped="cannot see images (multimodal: false, or not in LiteLLM's info)"))
        else:
            members.append(Member(llm, sanitize(messages, RULES[family(llm)], vision=True)))
    if not any(m.skipped is None for m in members):
        raise InvalidRequest(
            f"The MoM model '{mom.name}' cannot answer a request with images: none of its panel members "
            f"({', '.join(mom.llms_to_query)}) can see images.",
            param="messages",
            code="images_not_supported",
        )

    def concluder(name: str) -> Concluder:
        llm = config.llm(name)
        sees = vision[llm.name]
        images: Literal["sent", "placeholders"] | None = ("sent" if sees else "placeholders") if has_images else None
        return Concluder(llm, tuple(sanitize(messages, RULES[family(llm)], vision=sees)), images)

    return Plan(
        request_id=request_id,
        mom=mom,
        members=tuple(members),
        concluders=tuple(concluder(name) for name in (mom.concluding_llm, *mom.concluding_fallbacks)),
        has_images=has_images,
        prompt=config.concluding_prompt(mom),
        params=params,
        stream=stream,
        user=user,
        conversation=tuple(messages),
        cache=cache if cache is not None and mom.cache.enabled else NO_CACHE,
    )


def _as_hit(breakdown: Breakdown, *, answered: bool = True) -> Breakdown:
    """An identical request's breakdown, as this request (which followed it and called nothing) shows it; when
    no answer came of it, it is not a hit and saved nothing."""
    hit = Breakdown(
        members=[cached_copy(r) for r in breakdown.members],
        concluding=cached_copy(breakdown.concluding),
        cache="hit" if answered else "miss",
    )
    if not answered:
        for report in hit.calls:
            report.saved = None
    return hit


def _outcome(
    plan: Plan,
    status: RequestStatus,
    error_code: str | None,
    started_at: float,
    started: float,
    ttft_ms: float | None,
    breakdown: Breakdown,
) -> RequestOutcome:
    return RequestOutcome(
        request_id=plan.request_id,
        mom_model=plan.mom.name,
        stream=plan.stream,
        status=status,
        error_code=error_code,
        started_at=started_at,
        latency_ms=_ms_since(started),
        ttft_ms=ttft_ms,
        breakdown=breakdown,
    )


def _ms_since(started: float) -> float:
    return round((time.perf_counter() - started) * 1000, 1)


class Engine:
    def __init__(
        self,
        caller: LLMCaller,
        prices: PriceBook,
        recorders: Sequence[Recorder] = (),
        tracer: Tracer | None = None,
        breakers: CircuitBreakers | None = None,
        cache: ResponseCache | None = None,
    ) -> None:
        self.caller = caller
        self.prices = prices
        self._recorders = recorders
        self.tracer = tracer
        self.breakers = breakers or CircuitBreakers((), failures=0)
        self.active = InFlight()  # requests being answered (their outcome not yet recorded)
        self.cache = cache
        self._flights: dict[str, Flight] = {}  # answers being produced, by cache key: identical requests follow
        self._background: set[asyncio.Task[None]] = set()  # cache stores that nobody waits for

    async def _ask_member(
        self, plan: Plan, member: Member, report: CallReport, permit: Permit, trace: Trace
    ) -> CallReport:
        """Ask one member, filling its `report` in place (the engine settles it itself when it cuts it off)."""
        llm = member.llm
        started = time.perf_counter()
        verdict: Result = "abandoned"  # for the circuit breaker; the permit always goes back, however this ends
        cache = self.cache if plan.cache.used else None
        key = member_key(llm, member.messages, plan.params) if cache is not None else ""
        if cache is not None and plan.cache.lookup:
            stored = await cache.get_member(key)
            if stored is not None:  # this member gave this answer to this input: not asked again
                self.breakers.record(permit, verdict)
                report.status, report.error, report.error_type = "ok", None, None
                report.text, report.cached, report.cost, report.saved = stored[0], True, ZERO, stored[1]
                report.latency_ms = _ms_since(started)
                return report
        try:
            generation = trace.generation(report, member.messages, plan.params)
            try:
                result = await self.caller.complete(llm, member.messages, plan.params)
            except LLMCallError as exc:
                report.status, report.error, report.error_type = "error", exc.message, exc.kind
                verdict = "failure" if is_transient(exc) else "abandoned"
            except asyncio.CancelledError:
                if report.latency_ms is None:
                    report.latency_ms = _ms_since(started)
                generation.finish(report, "")
                raise
            except Exception as exc:  # a bug in an adapter: this member failed, the request goes on
                logger.error("panel member %s failed unexpectedly: %s", llm.name, type(exc).__name__)
                report.status, report.error, report.error_type = "error", f"failed: {type(exc).__name__}", "error"
            else:
                report.status, report.error, report.error_type = "ok", None, None
                report.text = result.text
                report.usage = result.usage
                if report.usage is None:  # a server that reports no usage: counted by us
                    report.usage = self.caller.estimate_usage(llm, member.messages, result.text)
                    report.estimated = True
                verdict = "success"
        finally:
            self.breakers.record(permit, verdict)
        report.latency_ms = _ms_since(started)
        report.cost = call_cost(report.usage, self.prices.get(llm.name))
        generation.finish(report, report.text)
        if cache is not None and plan.cache.store and report.status == "ok":
            # in the background: storing never delays the answer
            self._in_background(cache.put_member(key, plan.mom.cache.ttl_seconds, report))
        return report

    def _settle_cut_member(self, member: Member, report: CallReport, reason: str, started: float) -> None:
        """A member cancelled before it answered (cut off, or the client left): its input was sent and is paid
        for, so it is counted (our estimate: a whole call's output is never seen, so none is counted)."""
        report.status, report.error, report.error_type = "cancelled", reason, "cancelled"
        report.latency_ms = _ms_since(started)
        report.usage = self.caller.estimate_usage(member.llm, member.messages, "")
        report.estimated = True
        report.cost = call_cost(report.usage, self.prices.get(member.llm.name))

    async def run(self, plan: Plan) -> AsyncGenerator[Event]:
        """Yields MemberFinished as each member settles, PanelDone, ContentDelta..., then Completed or Failed.

        Closing or cancelling the iterator cancels every upstream call still running (that no identical request
        still follows). However the request ends, its outcome goes to the recorders, once.

        With the cache: a stored answer is replayed (no upstream call); else an identical request in flight is
        followed; else this request's run becomes the flight others follow, and its answer is stored.
        """
        async with aclosing(await self._source(plan)) as events:
            async for event in events:
                yield event

    async def _source(self, plan: Plan) -> AsyncGenerator[Event]:
        """Where this request's events come from: the panel itself, a stored answer, or an identical request's."""
        cache = self.cache
        if cache is None or not plan.cache.used:
            return self._answer(plan, None)
        key = cache.answer_key(plan.mom.name, plan.conversation, plan.params)
        if plan.cache.lookup:
            stored = await cache.get_answer(key)
            if stored is not None:
                return self._replay(plan, stored)
            running = self._flights.get(key)  # (a flight leaves the map as it ends)
            if running is not None:
                return self._follow(plan, running)
        flight = Flight(self._answer(plan, key), on_done=lambda: self._land(key, flight))
        if plan.cache.lookup:
            self._flights[key] = flight
        return flight.follow()

    def _in_background(self, work: Coroutine[Any, Any, None]) -> None:
        task = asyncio.create_task(work)
        self._background.add(task)
        task.add_done_callback(self._background.discard)

    def _land(self, key: str, flight: Flight) -> None:
        if self._flights.get(key) is flight:
            del self._flights[key]

    async def _replay(self, plan: Plan, stored: CachedAnswer) -> AsyncGenerator[Event]:
        """A stored answer, as the same events: no upstream call, nothing paid, its cost saved."""
        breakdown = Breakdown(members=stored.members, concluding=stored.concluding, cache="hit")
        status: RequestStatus = "cancelled"
        started_at, started = time.time(), time.perf_counter()
        ttft_ms: float | None = None
        self.active.enter()
        try:
            for report in stored.members:
                yield MemberFinished(report)
            yield PanelDone(stored.members)
            for piece in stored.pieces:
                if ttft_ms is None:
                    ttft_ms = _ms_since(started)
                yield ContentDelta(piece)
            status = "ok"
            yield Completed(finish_reason=stored.finish_reason, breakdown=breakdown, usage=Usage())
        finally:
            self.active.leave()
            self._finish_hit(plan, breakdown, status, None, started_at, started, ttft_ms, "".join(stored.pieces))

    async def _follow(self, plan: Plan, flight: Flight) -> AsyncGenerator[Event]:
        """The events of an identical request's run, as a cache hit: this request pays nothing."""
        first = plan.concluders[0].llm  # until the run says more: no call of this request's own was made
        placeholder = CallReport(
            name=first.name, model=first.model, role="concluding", status="skipped", cost=ZERO, cached=True
        )
        breakdown = Breakdown(members=[], concluding=placeholder, cache="hit")
        status: RequestStatus = "cancelled"
        error_code: str | None = None
        started_at, started = time.time(), time.perf_counter()
        ttft_ms: float | None = None
        pieces: list[str] = []
        self.active.enter()
        try:
            async with aclosing(flight.follow()) as events:
                async for event in events:
                    if isinstance(event, MemberFinished):
                        yield MemberFinished(cached_copy(event.report))
                    elif isinstance(event, PanelDone):
                        yield PanelDone([cached_copy(r) for r in event.reports])
                    elif isinstance(event, ContentDelta):
                        if ttft_ms is None:
                            ttft_ms = _ms_since(started)
                        pieces.append(event.text)
                        yield event
                    elif isinstance(event, Completed):
                        breakdown = _as_hit(event.breakdown)
                        status = "ok"
                        yield Completed(finish_reason=event.finish_reason, breakdown=breakdown, usage=Usage())
                    else:
                        breakdown = _as_hit(event.breakdown, answered=False)
                        status, error_code = "error", event.error.code
                        yield Failed(event.error, breakdown)
        finally:
            self.active.leave()
            self._finish_hit(plan, breakdown, status, error_code, started_at, started, ttft_ms, "".join(pieces))

    def _finish_hit(
        self,
        plan: Plan,
        breakdown: Breakdown,
        status: RequestStatus,
        error_code: str | None,
        started_at: float,
        started: float,
        ttft_ms: float | None,
        answer: str,
    ) -> None:
        outcome = _outcome(plan, status, error_code, started_at, started, ttft_ms, breakdown)
        self._trace(plan).finish(outcome, answer)
        self._emit(outcome)

    def _trace(self, plan: Plan) -> Trace:
        if self.tracer is None:
            return NO_TRACE
        return self.tracer.start(
            mom_model=plan.mom.name, request_id=plan.request_id, user=plan.user, messages=list(plan.conversation)
        )

    async def _answer(self, plan: Plan, key: str | None) -> AsyncGenerator[Event]:
        """The panel and the synthesis, for real (see `run`); a whole answer is stored under `key`."""
        started_at = time.time()
        started = time.perf_counter()
        members = [
            CallReport(
                name=m.llm.name,
                model=m.llm.model,
                status="skipped" if m.skipped else "cancelled",
                error=m.skipped or NOT_ANSWERED,
                error_type="cannot_see_images" if m.skipped else "cancelled",
                cost=ZERO,  # no usage, nothing to pay
                images="sent" if plan.has_images and not m.skipped else None,
            )
            for m in plan.members
        ]
        concluding = CallReport(
            name=plan.concluders[0].llm.name,
            model=plan.concluders[0].llm.model,
            role="concluding",
            status="skipped",
            images=plan.concluders[0].images,
            cost=ZERO,
        )
        breakdown = Breakdown(members=members, concluding=concluding)
        status: RequestStatus = "cancelled"
        error_code: str | None = None
        ttft_ms: float | None = None
        trace = self._trace(plan)
        self.active.enter()
        tasks: dict[asyncio.Task[CallReport], int] = {}
        for i, (member, report) in enumerate(zip(plan.members, members, strict=True)):
            permit = self.breakers.allow(member.llm.name) if member.skipped is None else None
            if permit is not None:
                tasks[asyncio.create_task(self._ask_member(plan, member, report, permit, trace))] = i
                continue
            if member.skipped is None:  # its circuit is open: not asked this time
                report.status, report.error_type, report.images = "skipped", "circuit_open", None
                report.error = self.breakers.reason(member.llm.name)
            trace.generation(report, [], plan.params).finish(report, "")
        concluding_generation = NO_GENERATION
        synthesis: list[str] = []
        messages: list[dict[str, Any]] = []
        concluding_llm = plan.concluders[0].llm
        concluding_permit: Permit | None = None
        concluding_started = 0.0
        try:
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
                if not task.done():  # (one may have finished while the events above were being sent)
                    task.cancel()
                    index = tasks[task]
                    self._settle_cut_member(plan.members[index], members[index], cut_reason, started)
                yield MemberFinished(members[tasks[task]])

            yield PanelDone(members)
            if breakdown.answered < plan.mom.min_successful:
                failures = "; ".join(f"{r.name}: {r.error}" for r in members if r.status != "ok" and r.asked)
                concluding.error = "too few panel members answered"
                error = UpstreamFailed(
                    f"{breakdown.answered} of {breakdown.asked} panel members answered, "
                    f"{plan.mom.min_successful} needed ({failures})",
                    code="members_failed",
                )
                status, error_code = "error", error.code
                yield Failed(error, breakdown)
                return

            answered = [r for r in members if r.status != "skipped"]
            candidates = plan.concluders
            finish_reason = "stop"
            for number, candidate in enumerate(candidates):
                if number:  # the previous one failed before its first token: the next one concludes
                    breakdown.concluding_failed.append(concluding)
                    concluding = CallReport(
                        name=candidate.llm.name, model=candidate.llm.model, role="concluding", images=candidate.images
                    )
                    breakdown.concluding = concluding
                concluding_llm = candidate.llm
                concluding_permit = self.breakers.allow(concluding_llm.name)
                if concluding_permit is None:  # its circuit is open: the next one, if any
                    concluding.status, concluding.error_type = "skipped", "circuit_open"
                    concluding.error = self.breakers.reason(concluding_llm.name)
                    concluding.cost = ZERO
                    trace.generation(concluding, [], plan.params).finish(concluding, "")
                    if number + 1 < len(candidates):
                        continue
                    error = UpstreamFailed(
                        f"The concluding LLM '{concluding_llm.name}' was not asked: {concluding.error}",
                        code="concluding_failed",
                    )
                    status, error_code = "error", error.code
                    yield Failed(error, breakdown)
                    return
                messages = concluding_messages(plan.prompt, candidate.conversation, answered)
                concluding_started = time.perf_counter()
                concluding.status = "cancelled"
                concluding_generation = trace.generation(concluding, messages, plan.params)
                try:
                    async with aclosing(self.caller.stream(concluding_llm, messages, plan.params)) as pieces:
                        async for piece in pieces:
                            if isinstance(piece, StreamEnd):
                                concluding.usage = piece.usage
                                finish_reason = piece.finish_reason
                                continue
                            if concluding.ttft_ms is None:
                                concluding.ttft_ms = _ms_since(concluding_started)
                                ttft_ms = _ms_since(started)
                                trace.first_token(concluding_generation)
                            synthesis.append(piece)
                            yield ContentDelta(piece)
                except LLMCallError as exc:
                    self.breakers.record(concluding_permit, "failure" if is_transient(exc) else "abandoned")
                    concluding_permit = None
                    concluding.status = "error"
                    concluding.error = exc.message
                    concluding.error_type = exc.kind
                    concluding.latency_ms = _ms_since(concluding_started)
                    concluding.cost = call_cost(concluding.usage, self.prices.get(concluding_llm.name))
                    concluding_generation.finish(concluding, "")
                    concluding_generation = NO_GENERATION
                    if concluding.ttft_ms is None and number + 1 < len(candidates):
                        continue
                    when = "after it began answering" if concluding.ttft_ms is not None else "before answering"
                    error = UpstreamFailed(
                        f"The concluding LLM '{concluding_llm.name}' failed {when}: {exc.message}",
                        code="concluding_failed",
                    )
                    status, error_code = "error", error.code
                    yield Failed(error, breakdown)
                    return
                break
            if concluding_permit is not None:
                self.breakers.record(concluding_permit, "success")
                concluding_permit = None
            concluding.status = "ok"
            concluding.latency_ms = _ms_since(concluding_started)
            if concluding.usage is None:  # a server that reports no usage, streamed: counted by us
                concluding.usage = self.caller.estimate_usage(concluding_llm, messages, "".join(synthesis))
                concluding.estimated = True
            concluding.cost = call_cost(concluding.usage, self.prices.get(concluding_llm.name))
            status = "ok"
            yield Completed(finish_reason=finish_reason, breakdown=breakdown, usage=breakdown.usage())
            if key is not None and plan.cache.store and self.cache is not None and cacheable(breakdown):
                # reached only when the consumer reads on after Completed: the flight's pump does
                ttl = plan.mom.cache.ttl_seconds
                await self.cache.put_answer(key, ttl, breakdown, synthesis, finish_reason)
        finally:
            self.active.leave()
            for task, index in tasks.items():  # still running when the request ended (the client left)
                if task.cancel() and members[index].usage is None:
                    self._settle_cut_member(plan.members[index], members[index], NOT_ANSWERED, started)
            if concluding_permit is not None:
                self.breakers.record(concluding_permit, "abandoned")
            if concluding.status == "cancelled":
                self._settle_cancelled_stream(concluding_llm, concluding, concluding_started, messages, synthesis)
            answer = "".join(synthesis)
            concluding_generation.finish(concluding, answer)
            outcome = _outcome(plan, status, error_code, started_at, started, ttft_ms, breakdown)
            trace.finish(outcome, answer)
            self._emit(outcome)

    def _settle_cancelled_stream(
        self,
        llm: LLMDefinition,
        report: CallReport,
        started: float,
        messages: list[dict[str, Any]],
        synthesis: list[str],
    ) -> None:
        """A stream cut off by the client leaving still costs the tokens it produced: count them ourselves."""
        report.error = "cancelled: the request ended first (the client left, or the service shut down)"
        report.error_type = "cancelled"
        report.latency_ms = _ms_since(started)
        report.usage = self.caller.estimate_usage(llm, messages, "".join(synthesis))
        report.estimated = True
        report.cost = call_cost(report.usage, self.prices.get(llm.name))

    def _emit(self, outcome: RequestOutcome) -> None:
        for record in self._recorders:
            try:
                record(outcome)
            except Exception as exc:  # recording must never break an answer
                logger.error("could not record request %s: %s", outcome.request_id, type(exc).__name__)
