"""The engine: plan the panel, fan out, wait for the members, synthesize, and yield events. No HTTP here."""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import AsyncGenerator, Callable, Coroutine, Mapping, Sequence
from contextlib import aclosing
from dataclasses import dataclass, field
from typing import Any, Literal

import orjson

from mom_service.cache import CachedAnswer, ResponseCache, cacheable, cached_copy, member_key
from mom_service.circuit_breaker import CircuitBreakers, Permit, Result
from mom_service.config import LLMDefinition, MoMConfig, MoMModelConfig
from mom_service.cost_calculation import ZERO, call_cost
from mom_service.errors import InternalError, InvalidRequest, UpstreamFailed
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
from mom_service.multimodal_utils import NOTHING_DOWNLOADED, RULES, Family, family, sanitize
from mom_service.pricing_utils import PriceBook
from mom_service.redaction import KEEP_TRACEBACK
from mom_service.single_flight import Flight
from mom_service.synthesis import concluding_messages
from mom_service.tracing import NO_GENERATION, NO_TRACE, Trace, Tracer

logger = logging.getLogger("mom_service")

Recorder = Callable[[RequestOutcome], None]
NOT_ANSWERED = "cancelled before it answered"
WITH_TRACEBACK = {KEEP_TRACEBACK: True}  # `extra` of the log line of an unexpected error: its traceback is kept


@dataclass(slots=True, frozen=True)
class Member:
    """A panel member as this request asks it: the conversation in its provider's shapes, or why it is skipped."""

    llm: LLMDefinition
    messages: list[dict[str, Any]]
    skipped: str | None = None
    encoded: bytes | None = None  # `messages` serialized once, shared by the members that get the same ones


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
    cache_owner: str = ""  # whose cached answers it may see: the caller's identity, or "" when shared by everyone


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
    downloaded: Mapping[str, str] = NOTHING_DOWNLOADED,
    caller: str = "",
) -> Plan:
    """Who is asked: with images, only the members that can see them (400 when none can). The conversation is put
    in each provider family's shapes once, and serialized once, for all the LLMs that get the same shapes."""
    shaped: dict[tuple[Family, bool], list[dict[str, Any]]] = {}

    def conversation(llm: LLMDefinition, sees: bool) -> list[dict[str, Any]]:
        key = (family(llm), sees)
        if key not in shaped:
            shaped[key] = sanitize(messages, RULES[key[0]], vision=sees, downloaded=downloaded)
        return shaped[key]

    encoded: dict[int, bytes] = {}
    members = []
    for name in mom.llms_to_query:
        llm = config.llm(name)
        if has_images and not vision[name]:
            members.append(Member(llm, [], skipped="cannot see images (multimodal: false, or not in LiteLLM's info)"))
            continue
        shapes = conversation(llm, True)
        if id(shapes) not in encoded:
            encoded[id(shapes)] = orjson.dumps(shapes, option=orjson.OPT_SORT_KEYS)
        members.append(Member(llm, shapes, encoded=encoded[id(shapes)]))
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
        return Concluder(llm, tuple(conversation(llm, sees)), images)

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
        cache_owner="" if mom.cache.scope == "global" else caller,
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


def _ms_since(started: float) -> float:
    return round((time.perf_counter() - started) * 1000, 1)


@dataclass(slots=True)
class _Tally:
    """One request's outcome while it is decided: how it ends, its first token, its answer. Recorded once."""

    plan: Plan
    breakdown: Breakdown
    trace: Trace | None = None  # the run's own trace; None for an answer from the cache (one is made at the end)
    started_at: float = field(default_factory=time.time)
    started: float = field(default_factory=time.perf_counter)
    status: RequestStatus = "cancelled"  # until it ends otherwise (else the client left, or the service stopped)
    error_code: str | None = None
    ttft_ms: float | None = None
    answer: list[str] = field(default_factory=list)

    def see(self, event: Event) -> None:
        if isinstance(event, ContentDelta):
            if self.ttft_ms is None:
                self.ttft_ms = _ms_since(self.started)
            self.answer.append(event.text)
        elif isinstance(event, Completed):
            self.status, self.breakdown = "ok", event.breakdown
        elif isinstance(event, Failed):
            self.status, self.error_code, self.breakdown = "error", event.error.code, event.breakdown

    def outcome(self) -> RequestOutcome:
        return RequestOutcome(
            request_id=self.plan.request_id,
            mom_model=self.plan.mom.name,
            stream=self.plan.stream,
            status=self.status,
            error_code=self.error_code,
            started_at=self.started_at,
            latency_ms=_ms_since(self.started),
            ttft_ms=self.ttft_ms,
            breakdown=self.breakdown,
        )


@dataclass(slots=True)
class _Concluded:
    """What the concluding call that answered leaves behind: why it stopped, and its answer as streamed."""

    finish_reason: str | None = None
    pieces: list[str] = field(default_factory=list)


MemberTasks = dict[asyncio.Task[CallReport], int]  # each member's call, and its index in the plan


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

    async def run(self, plan: Plan) -> AsyncGenerator[Event]:
        """Yields MemberFinished as each member settles, PanelDone, ContentDelta..., then Completed or Failed.

        Closing or cancelling the iterator cancels every upstream call still running (that no identical request
        still follows). However the request ends, its outcome goes to the recorders, once; an unexpected exception
        ends it with Failed (`internal_error`).

        With the cache: an identical request in flight is followed; else this request's run becomes the flight
        others follow (joined before any await, the cache lookup included), which replays a stored answer (no
        upstream call) or runs the panel and stores its answer.
        """
        async with aclosing(self._source(plan)) as events:
            async for event in events:
                yield event

    async def aclose(self, timeout_s: float) -> None:
        """At shutdown: wait (at most `timeout_s`) for the cache stores still running in the background."""
        if self._background:
            logger.info(
                "Waiting up to %g s for %d answer(s) being stored in the cache", timeout_s, len(self._background)
            )
            await asyncio.wait(set(self._background), timeout=timeout_s)

    # ------------------------------------------------------------------------------------------------ sources

    def _source(self, plan: Plan) -> AsyncGenerator[Event]:
        """Where this request's events come from: the panel itself, a stored answer, or an identical request's."""
        cache = self.cache
        if cache is None or not plan.cache.used:
            return self._answer(plan, None)
        key = cache.answer_key(plan.mom.name, plan.conversation, plan.params, owner=plan.cache_owner)
        if not plan.cache.lookup:  # a fresh answer (stored for the next ones); nobody joins it
            return Flight(self._answer(plan, key)).follow()
        running = self._flights.get(key)
        if running is not None:
            return self._follow(plan, running)
        flight = Flight(self._lookup_or_answer(cache, plan, key), on_done=lambda: self._land(key, flight))
        self._flights[key] = flight  # before any await: an identical request from now on follows this one
        return flight.follow()

    async def _lookup_or_answer(self, cache: ResponseCache, plan: Plan, key: str) -> AsyncGenerator[Event]:
        """A stored answer when there is one, else the panel's (in the flight: identical requests share both)."""
        stored = await cache.get_answer(key)
        source = self._replay(plan, stored) if stored is not None else self._answer(plan, key)
        async with aclosing(source) as events:
            async for event in events:
                yield event

    def _land(self, key: str, flight: Flight) -> None:
        if self._flights.get(key) is flight:
            del self._flights[key]

    def _in_background(self, work: Coroutine[Any, Any, None]) -> None:
        task = asyncio.create_task(work)
        self._background.add(task)
        task.add_done_callback(self._background.discard)

    def _answer(self, plan: Plan, key: str | None) -> AsyncGenerator[Event]:
        """The panel and the synthesis, for real; a whole answer is stored under `key`."""
        tally = _Tally(plan, self._new_breakdown(plan), trace=self._trace(plan))
        return self._settled(tally, self._panel(plan, key, tally))

    def _replay(self, plan: Plan, stored: CachedAnswer) -> AsyncGenerator[Event]:
        """A stored answer, as the same events: no upstream call, nothing paid, its cost saved."""
        breakdown = Breakdown(members=stored.members, concluding=stored.concluding, cache="hit")
        return self._settled(_Tally(plan, breakdown), _replayed(stored, breakdown))

    def _follow(self, plan: Plan, flight: Flight) -> AsyncGenerator[Event]:
        """The events of an identical request's run, as a cache hit: this request pays nothing."""
        first = plan.concluders[0].llm  # until the run says more: no call of this request's own was made
        placeholder = CallReport(
            name=first.name, model=first.model, role="concluding", status="skipped", cost=ZERO, cached=True
        )
        tally = _Tally(plan, Breakdown(members=[], concluding=placeholder, cache="hit"))
        return self._settled(tally, _followed(flight))

    async def _settled(self, tally: _Tally, events: AsyncGenerator[Event]) -> AsyncGenerator[Event]:
        """Every source's events pass here: the request counts as active while they run, an unexpected exception
        becomes Failed (`internal_error`, logged once with its traceback, never shown to the client), and however
        the request ends, its outcome is recorded once (usage records, metrics, request log, trace)."""
        self.active.enter()
        try:
            async with aclosing(events):
                async for event in events:
                    tally.see(event)
                    yield event
        except Exception as exc:
            logger.error(
                "request %s failed on an unexpected error", tally.plan.request_id, exc_info=exc, extra=WITH_TRACEBACK
            )
            failed = Failed(InternalError("The service failed while answering this request."), tally.breakdown)
            tally.see(failed)
            yield failed
        finally:
            self.active.leave()
            outcome = tally.outcome()
            (tally.trace or self._trace(tally.plan)).finish(outcome, "".join(tally.answer))
            self._emit(outcome)

    def _trace(self, plan: Plan) -> Trace:
        if self.tracer is None:
            return NO_TRACE
        return self.tracer.start(
            mom_model=plan.mom.name, request_id=plan.request_id, user=plan.user, messages=list(plan.conversation)
        )

    def _emit(self, outcome: RequestOutcome) -> None:
        for record in self._recorders:
            try:
                record(outcome)
            except Exception as exc:  # recording must never break an answer
                logger.error("could not record request %s: %s", outcome.request_id, type(exc).__name__)

    # -------------------------------------------------------------------------------------------- the panel

    @staticmethod
    def _new_breakdown(plan: Plan) -> Breakdown:
        """Every call of the plan before it is made: members not answered yet (or skipped), nobody concluding."""
        members = []
        for member in plan.members:
            report = CallReport(name=member.llm.name, model=member.llm.model, cost=ZERO)
            if member.skipped is not None:
                report.skipped("cannot_see_images", member.skipped)
            else:
                report.cancelled(NOT_ANSWERED)
                report.images = "sent" if plan.has_images else None
            members.append(report)
        first = plan.concluders[0]
        concluding = CallReport(
            name=first.llm.name, model=first.llm.model, role="concluding", status="skipped", images=first.images
        )
        concluding.cost = ZERO
        return Breakdown(members=members, concluding=concluding)

    async def _panel(self, plan: Plan, key: str | None, tally: _Tally) -> AsyncGenerator[Event]:
        """The stages: fan out, wait for the panel, conclude, settle (cancel what still runs); store the answer."""
        breakdown = tally.breakdown
        trace = tally.trace or NO_TRACE
        tasks = self._fan_out(plan, breakdown.members, trace)
        try:
            async with aclosing(self._wait_for_panel(plan, breakdown.members, tasks, tally.started)) as settled:
                async for event in settled:
                    yield event
            yield PanelDone(breakdown.members)
            if breakdown.answered < plan.mom.min_successful:
                yield _too_few_answered(plan, breakdown)
                return
            concluded = _Concluded()
            async with aclosing(self._conclude(plan, breakdown, trace, concluded)) as concluding:
                async for event in concluding:
                    yield event
            if concluded.finish_reason is None:  # no concluding LLM answered: Failed was the last event
                return
            yield Completed(finish_reason=concluded.finish_reason, breakdown=breakdown, usage=breakdown.usage())
            if key is not None and plan.cache.store and self.cache is not None and cacheable(breakdown):
                # reached only when the consumer reads on after Completed: the flight's pump does
                ttl = plan.mom.cache.ttl_seconds
                await self.cache.put_answer(key, ttl, breakdown, concluded.pieces, concluded.finish_reason)
        finally:
            for task, index in tasks.items():  # still running when the request ended (the client left)
                if task.cancel() and breakdown.members[index].latency_ms is None:
                    self._settle_cut_member(plan.members[index], breakdown.members[index], NOT_ANSWERED, tally.started)

    def _fan_out(self, plan: Plan, members: list[CallReport], trace: Trace) -> MemberTasks:
        """Ask every member that can be asked, at once; the others are skipped (images, open circuits)."""
        tasks: MemberTasks = {}
        for index, (member, report) in enumerate(zip(plan.members, members, strict=True)):
            permit = self.breakers.allow(member.llm.name) if member.skipped is None else None
            if permit is not None:
                tasks[asyncio.create_task(self._ask_member(plan, member, report, permit, trace))] = index
                continue
            if member.skipped is None:  # its circuit is open: not asked this time
                report.skipped("circuit_open", self.breakers.reason(member.llm.name))
                report.images = None
            trace.generation(report, [], plan.params).finish(report, "")
        return tasks

    async def _wait_for_panel(
        self, plan: Plan, members: list[CallReport], tasks: MemberTasks, started: float
    ) -> AsyncGenerator[Event]:
        """MemberFinished as each member settles, until all have, or the quorum or the deadline cuts the rest."""
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
                self._settle_cut_member(plan.members[index], members[index], cut_reason, started)
            yield MemberFinished(members[index])

    async def _ask_member(
        self, plan: Plan, member: Member, report: CallReport, permit: Permit, trace: Trace
    ) -> CallReport:
        """Ask one member, filling its `report` in place (the engine settles it itself when it cuts it off)."""
        llm = member.llm
        started = time.perf_counter()
        verdict: Result = "abandoned"  # for the circuit breaker; the permit always goes back, however this ends
        generation = NO_GENERATION
        cache = self.cache if plan.cache.used else None
        key = ""
        try:
            if cache is not None:
                key = member_key(llm, member.messages, plan.params, owner=plan.cache_owner, encoded=member.encoded)
                stored = await cache.get_member(key) if plan.cache.lookup else None
                if stored is not None:  # this member gave this answer to this input: not asked again
                    report.from_cache(*stored)
                    report.latency_ms = _ms_since(started)
                    return report
            generation = trace.generation(report, member.messages, plan.params)
            report.sent = True
            result = await self.caller.complete(llm, member.messages, plan.params, encoded=member.encoded)
        except LLMCallError as exc:
            verdict = "failure" if is_transient(exc) else "abandoned"
            self._call_failed(llm, report, exc, member.messages, "")
        except asyncio.CancelledError:
            generation.finish(report, "")
            raise
        except Exception as exc:  # a bug in an adapter: this member failed, the request goes on
            logger.error("panel member %s failed unexpectedly", llm.name, exc_info=exc, extra=WITH_TRACEBACK)
            report.failed("error", f"failed: {type(exc).__name__}")
        else:
            verdict = "success"  # the provider answered: it is up (even when the answer is empty)
            if result.text.strip():
                report.answered(result.text)
            else:  # no content (and no tool call): not an answer, but paid for
                report.failed("empty_answer", "the LLM answered with no content")
            report.usage = result.usage
            self._charge(llm, report, member.messages, result.text)
        finally:
            self.breakers.record(permit, verdict)
        report.latency_ms = _ms_since(started)
        generation.finish(report, report.text)
        if cache is not None and plan.cache.store and report.status == "ok":
            # in the background: storing never delays the answer
            self._in_background(cache.put_member(key, plan.mom.cache.ttl_seconds, report))
        return report

    def _settle_cut_member(self, member: Member, report: CallReport, reason: str, started: float) -> None:
        """A member cancelled before it answered (cut off, or the client left). If its request was sent, its input
        is paid for: counted (our estimate: a whole call's output is never seen, so none is counted)."""
        report.cancelled(reason)
        report.latency_ms = _ms_since(started)
        if report.sent:
            self._charge(member.llm, report, member.messages, "")

    async def _conclude(
        self, plan: Plan, breakdown: Breakdown, trace: Trace, concluded: _Concluded
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
            permit = self.breakers.allow(candidate.llm.name)
            if permit is None:  # its circuit is open: the next one, if any
                report.skipped("circuit_open", self.breakers.reason(candidate.llm.name))
                trace.generation(report, [], plan.params).finish(report, "")
                if last:
                    message = f"The concluding LLM '{candidate.llm.name}' was not asked: {report.error}"
                    yield Failed(UpstreamFailed(message, code="concluding_failed"), breakdown)
                    return
                continue
            call = self._concluding_call(plan, candidate, report, permit, answered, trace, concluded)
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

    async def _concluding_call(
        self,
        plan: Plan,
        candidate: Concluder,
        report: CallReport,
        permit: Permit,
        answered: list[CallReport],
        trace: Trace,
        concluded: _Concluded,
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
            async with aclosing(self.caller.stream(llm, messages, plan.params)) as stream:
                async for piece in stream:
                    if isinstance(piece, StreamEnd):
                        report.usage = piece.usage
                        concluded.finish_reason = piece.finish_reason
                        continue
                    if report.ttft_ms is None:
                        report.ttft_ms = _ms_since(started)
                        trace.first_token(generation)
                    pieces.append(piece)
                    yield ContentDelta(piece)
        except LLMCallError as exc:
            verdict = "failure" if is_transient(exc) else "abandoned"
            concluded.finish_reason = None
            self._call_failed(llm, report, exc, messages, "".join(pieces))
            raise
        else:
            verdict = "success"
            report.answered("")
            concluded.pieces = pieces
            self._charge(llm, report, messages, "".join(pieces))
        finally:
            self.breakers.record(permit, verdict)
            if report.status == "cancelled":  # the request ended while it streamed: what it produced is paid
                report.cancelled("cancelled: the request ended first (the client left, or the service shut down)")
                self._charge(llm, report, messages, "".join(pieces))
            report.latency_ms = _ms_since(started)
            generation.finish(report, "".join(pieces))

    # ---------------------------------------------------------------------------------------------- accounting

    def _call_failed(
        self, llm: LLMDefinition, report: CallReport, exc: LLMCallError, messages: list[dict[str, Any]], output: str
    ) -> None:
        """A call failed: the client sees its reason and scrubbed message, the log its whole (redacted) text. If its
        request reached the provider (a timeout, a stream cut short), what it consumed is charged (our estimate)."""
        logger.warning("%s %s failed (%s): %s", report.role, llm.name, exc.kind, exc.detail)
        report.failed(exc.kind, exc.message)
        if exc.reached or report.usage is not None:
            self._charge(llm, report, messages, output)

    def _charge(self, llm: LLMDefinition, report: CallReport, messages: list[dict[str, Any]], output: str) -> None:
        """A call's usage and cost: as its provider reported it, else our count (marked as an estimate)."""
        if report.usage is None:
            report.usage = self.caller.estimate_usage(llm, messages, output)
            report.estimated = True
        report.cost = call_cost(report.usage, self.prices.get(llm.name))


def _too_few_answered(plan: Plan, breakdown: Breakdown) -> Failed:
    failures = "; ".join(f"{r.name}: {r.error}" for r in breakdown.members if r.status != "ok" and r.asked)
    breakdown.concluding.error = "too few panel members answered"
    message = (
        f"{breakdown.answered} of {breakdown.asked} panel members answered, "
        f"{plan.mom.min_successful} needed ({failures})"
    )
    return Failed(UpstreamFailed(message, code="members_failed"), breakdown)


async def _replayed(stored: CachedAnswer, breakdown: Breakdown) -> AsyncGenerator[Event]:
    for report in stored.members:
        yield MemberFinished(report)
    yield PanelDone(stored.members)
    for piece in stored.pieces:
        yield ContentDelta(piece)
    yield Completed(finish_reason=stored.finish_reason, breakdown=breakdown, usage=Usage())


async def _followed(flight: Flight) -> AsyncGenerator[Event]:
    """A flight's events as a follower shows them: its calls as cache hits (made for another request)."""
    async with aclosing(flight.follow()) as events:
        async for event in events:
            if isinstance(event, MemberFinished):
                yield MemberFinished(cached_copy(event.report))
            elif isinstance(event, PanelDone):
                yield PanelDone([cached_copy(r) for r in event.reports])
            elif isinstance(event, ContentDelta):
                yield event
            elif isinstance(event, Completed):
                yield Completed(finish_reason=event.finish_reason, breakdown=_as_hit(event.breakdown), usage=Usage())
            else:
                yield Failed(event.error, _as_hit(event.breakdown, answered=False))
