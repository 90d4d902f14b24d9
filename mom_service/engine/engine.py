"""The engine: where a request's events come from (the panel, a stored answer, or an identical request in flight),
the stages of a real answer (fan out, wait for the panel, conclude, settle), and the one place a request's outcome
is recorded. No HTTP here, and no protocol's shapes: events in, events out."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncGenerator, Callable, Mapping, Sequence
from contextlib import aclosing
from dataclasses import dataclass
from typing import Any

from mom_service.config import MoMConfig
from mom_service.engine.cached import CachedAnswer, ResponseCache, as_hit, cacheable, cached_copy
from mom_service.engine.calls import NOT_ANSWERED, Calls
from mom_service.engine.concluding import Concluded, conclude, prompt_tokens, too_few_answered
from mom_service.engine.cost_cap import capped
from mom_service.engine.events import (
    Breakdown,
    CallReport,
    Completed,
    ContentDelta,
    Event,
    Failed,
    MemberFinished,
    PanelDone,
    RequestOutcome,
    ToolCallDelta,
    Usage,
)
from mom_service.engine.inflight import InFlight
from mom_service.engine.panel import cancel_members, fan_out, new_breakdown, wait_for_panel
from mom_service.engine.plan import DEFAULT_IMAGES, ImagePolicy, Plan, Request
from mom_service.engine.planning import prepare
from mom_service.engine.single_flight import Flight, Flights
from mom_service.engine.steering import Steering
from mom_service.engine.strategies.registry import strategy_of
from mom_service.engine.tally import Tally
from mom_service.engine.tools import as_deltas, vote
from mom_service.engine.tracing import NO_TRACE, Trace, TraceStarter
from mom_service.errors import WITH_TRACEBACK, InternalError
from mom_service.providers.caller import LLMCaller
from mom_service.providers.capabilities import max_output
from mom_service.providers.circuit_breaker import CircuitBreakers
from mom_service.providers.pricing import ZERO

logger = logging.getLogger("mom_service")

Recorder = Callable[[RequestOutcome], None]


@dataclass(frozen=True, slots=True)
class Takes:
    """What a MoM model takes."""

    vision: bool
    tools: bool
    structured_output: bool


class Engine:
    """One per config the app runs (a reload makes the next one): `prepare` a request into a Plan, then `run` it.
    A request holds the engine it started with to its end."""

    def __init__(
        self,
        config: MoMConfig,
        calls: Calls,
        *,
        vision: Mapping[str, bool],
        tools_ok: Mapping[str, bool] | None = None,
        structured_ok: Mapping[str, bool] | None = None,
        reasoning_ok: Mapping[str, bool] | None = None,
        images: ImagePolicy = DEFAULT_IMAGES,
        recorders: Sequence[Recorder] = (),
        tracer: TraceStarter | None = None,
        ceilings: Mapping[str, int] | None = None,
        active: InFlight | None = None,
        flights: Flights | None = None,
    ) -> None:
        self.config = config
        self.calls = calls
        self.vision = vision  # per LLM: can it see images
        self.tools_ok = tools_ok or {}  # per LLM: can it call tools (an LLM not named can)
        self.structured_ok = structured_ok or {}  # per LLM: does it honour response_format (not named: it does)
        self.reasoning_ok = reasoning_ok or {}  # per LLM: does it take reasoning_effort (not named: it does not)
        # per LLM: the tokens an answer may have (its config, else LiteLLM's model info, else the default)
        self.ceilings = ceilings or {d.name: max_output(d, None) for d in config.llm_definitions}
        self.images = images
        self.tracer = tracer
        # requests being answered (their outcome not yet recorded); a reloaded config's engine shares the count
        self.active = active if active is not None else InFlight()
        self._recorders = recorders
        self.flights = (
            flights if flights is not None else Flights()
        )  # identical requests in flight follow one run (shared on a reload too)

    @property
    def recorders(self) -> Sequence[Recorder]:
        return self._recorders

    def add_recorders(self, *recorders: Recorder) -> None:
        """Who is told each request's outcome (usage records, metrics, the request log), once it has ended."""
        self._recorders = (*self._recorders, *recorders)

    def record(self, outcome: RequestOutcome) -> None:
        """An outcome made outside `run` (the evaluation's direct calls to one LLM), told to the same recorders."""
        self._emit(outcome)

    @property
    def caller(self) -> LLMCaller:
        return self.calls.caller

    @property
    def breakers(self) -> CircuitBreakers:
        return self.calls.breakers

    @property
    def cache(self) -> ResponseCache | None:
        return self.calls.cache

    async def prepare(self, request: Request) -> Plan:
        """The plan of a request (404 for an unknown MoM model, 400 for images that cannot be used), under its cost
        cap (400 when it cannot be kept), before any upstream call."""
        return capped(await self._plan(request, download=True), self.calls.prices, self.ceilings)

    async def _plan(self, request: Request, *, download: bool) -> Plan:
        return await prepare(
            request,
            self.config,
            self.vision,
            self.images,
            self.tools_ok,
            download=download,
            reasoning_ok=self.reasoning_ok,
        )

    async def count_tokens(self, request: Request) -> int:
        """Our count of the tokens the concluding LLM would read for this request before the panel's answers (its
        prompt, the conversation, the tools); the request planned as for an answer (404, 400 alike), its images
        checked but not downloaded, and no upstream call."""
        return prompt_tokens(await self._plan(request, download=False))  # a count: no cost cap

    def accepts_images(self, mom: str) -> bool:
        """Whether a MoM model takes images: at least one of its panel members can see them."""
        model = self.config.mom_model(mom)
        return model is not None and any(self.vision[name] for name in model.llms_to_query)

    def takes(self, mom: str) -> Takes:
        """What a MoM model takes: images (a member sees them), tools (a concluding LLM, or fallback, calls them),
        structured output (a concluding LLM, or fallback, honours a response format)."""
        model = self.config.mom_model(mom)
        if model is None:
            return Takes(vision=False, tools=False, structured_output=False)
        concluders = (model.concluding_llm, *model.concluding_fallbacks)
        return Takes(
            vision=self.accepts_images(mom),
            tools=any(self.tools_ok.get(name, True) for name in concluders),
            structured_output=any(self.structured_ok.get(name, True) for name in concluders),
        )

    async def run(self, plan: Plan) -> AsyncGenerator[Event]:
        """Yields MemberStarted, MemberDelta... and MemberFinished as each member starts, writes and settles,
        PanelDone, ContentDelta..., then Completed or Failed.

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
        background = self.calls.background
        if background:
            logger.info("Waiting up to %g s for %d answer(s) being stored in the cache", timeout_s, len(background))
            await asyncio.wait(set(background), timeout=timeout_s)

    # ------------------------------------------------------------------------------------------------ sources

    def _source(self, plan: Plan) -> AsyncGenerator[Event]:
        """Where this request's events come from: the panel itself, a stored answer, or an identical request's."""
        cache = self.calls.cache
        if cache is None or not plan.cache.used:
            return self._answer(plan, None)
        key = cache.answer_key(plan.mom.name, plan.conversation, plan.key_params, owner=plan.cache_owner)
        if not plan.cache.lookup:  # a fresh answer (stored for the next ones); nobody joins it
            return self.flights.start(self._answer(plan, key)).follow()
        running = self.flights.get(key)
        if running is not None:
            return self._follow(plan, running)
        # registered before any await: an identical request from now on follows this one
        return self.flights.start(self._lookup_or_answer(cache, plan, key), key).follow()

    async def _lookup_or_answer(self, cache: ResponseCache, plan: Plan, key: str) -> AsyncGenerator[Event]:
        """A stored answer when there is one, else the panel's (in the flight: identical requests share both)."""
        stored = await cache.get_answer(key)
        source = self._replay(plan, stored) if stored is not None else self._answer(plan, key)
        async with aclosing(source) as events:
            async for event in events:
                yield event

    def _answer(self, plan: Plan, key: str | None) -> AsyncGenerator[Event]:
        """The panel and the synthesis, for real; a whole answer is stored under `key`."""
        tally = Tally(plan, new_breakdown(plan, NOT_ANSWERED), trace=self._trace(plan))
        return self._settled(tally, self._panel(plan, key, tally))

    def _replay(self, plan: Plan, stored: CachedAnswer) -> AsyncGenerator[Event]:
        """A stored answer, as the same events: no upstream call, nothing paid, its cost saved."""
        breakdown = Breakdown(
            members=stored.members,
            concluding=stored.concluding,
            cache="hit",
            turn=stored.turn,
            structured_output=stored.structured_output,
            notices=list(plan.steering.notices),
            overrides=plan.steering.applied,
            tier=plan.tier,
        )
        return self._settled(Tally(plan, breakdown), _replayed(stored, breakdown))

    def _follow(self, plan: Plan, flight: Flight) -> AsyncGenerator[Event]:
        """The events of an identical request's run, as a cache hit: this request pays nothing."""
        first = plan.concluders[0].llm  # until the run says more: no call of this request's own was made
        placeholder = CallReport(
            name=first.name,
            model=first.model,
            role="concluding",
            stage="conclude",
            status="skipped",
            cost=ZERO,
            cached=True,
        )
        steering = plan.steering
        breakdown = Breakdown(
            members=[],
            concluding=placeholder,
            cache="hit",
            notices=list(steering.notices),
            overrides=steering.applied,
            tier=plan.tier,
        )
        tally = Tally(plan, breakdown)
        return self._settled(tally, _followed(flight, plan.steering))

    async def _settled(self, tally: Tally, events: AsyncGenerator[Event]) -> AsyncGenerator[Event]:
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
            (tally.trace or self._trace(tally.plan)).finish(
                outcome, "".join(tally.answer), tally.calls.calls() if tally.calls else None
            )
            self._emit(outcome)

    def _trace(self, plan: Plan) -> Trace:
        if self.tracer is None:
            return NO_TRACE
        return self.tracer.start(
            mom_model=plan.mom.name,
            request_id=plan.request_id,
            user=plan.user,
            messages=list(plan.conversation),
            surface=plan.surface,
        )

    def _emit(self, outcome: RequestOutcome) -> None:
        for record in self._recorders:
            try:
                record(outcome)
            except Exception as exc:  # recording must never break an answer
                logger.error("could not record request %s: %s", outcome.request_id, type(exc).__name__)

    # ------------------------------------------------------------------------------------------- the stages

    async def _panel(self, plan: Plan, key: str | None, tally: Tally) -> AsyncGenerator[Event]:
        """Fan out, wait for the panel, conclude (or let the members' vote decide), settle (cancel what still
        runs); then store the answer. A relay turn skips the panel: the concluding LLM continues the tool loop."""
        calls, breakdown = self.calls, tally.breakdown
        breakdown.turn = plan.turn
        trace = tally.trace or NO_TRACE
        tasks = fan_out(calls, plan, breakdown.members, trace)
        concluded = Concluded()
        try:
            async with aclosing(wait_for_panel(calls, plan, breakdown.members, tasks, tally.started)) as settling:
                async for event in settling:
                    yield event
            if plan.turn != "relay" and breakdown.answered < plan.mom.min_successful:
                yield PanelDone(breakdown.members)
                yield too_few_answered(plan, breakdown)
                return
            agreed = (
                vote(
                    breakdown.members, plan.vote_threshold, parallel=plan.final_params.get("parallel_tool_calls", True)
                )
                if plan.vote_threshold
                else None
            )
            if agreed or plan.strategy == "synthesize":  # the concluding stage itself: no layer between
                yield PanelDone(breakdown.members)
                stages = (
                    self._voted(breakdown, agreed, concluded)
                    if agreed
                    else conclude(calls, plan, breakdown, trace, concluded)
                )
            else:  # the strategy's stages, then its PanelDone and answer
                stages = strategy_of(plan)(calls, plan, breakdown, trace, concluded)
            async with aclosing(stages) as concluding:
                async for event in concluding:
                    yield event
            if concluded.finish_reason is None:  # no concluding LLM answered: Failed was the last event
                return
            yield Completed(finish_reason=concluded.finish_reason, breakdown=breakdown, usage=breakdown.usage())
            if key is not None and plan.cache.store and calls.cache is not None and cacheable(breakdown):
                # reached only when the consumer reads on after Completed: the flight's pump does
                ttl = plan.mom.cache.ttl_seconds
                await calls.cache.put_answer(key, ttl, breakdown, concluded.pieces, concluded.finish_reason)
        finally:  # members still running when the request ended (the client left): cancelled, settled
            cancel_members(calls, plan, breakdown.members, tasks, NOT_ANSWERED, tally.started)

    @staticmethod
    async def _voted(breakdown: Breakdown, agreed: list[dict[str, Any]], concluded: Concluded) -> AsyncGenerator[Event]:
        """Enough members proposed the same tool calls: they are the answer, with no concluding call."""
        breakdown.turn = "vote"
        breakdown.concluding.skipped("vote", "not asked: enough panel members proposed the same tool calls")
        for delta in as_deltas(agreed):
            concluded.pieces.append(
                {"index": delta.index, "id": delta.id, "name": delta.name, "arguments": delta.arguments}
            )
            yield delta
        concluded.finish_reason = "tool_calls"


async def _replayed(stored: CachedAnswer, breakdown: Breakdown) -> AsyncGenerator[Event]:
    for report in stored.members:
        yield MemberFinished(report)
    yield PanelDone(stored.members)
    for piece in stored.pieces:
        yield ContentDelta(piece) if isinstance(piece, str) else ToolCallDelta(**piece)
    yield Completed(finish_reason=stored.finish_reason, breakdown=breakdown, usage=Usage())


def _steered(breakdown: Breakdown, steering: Steering) -> Breakdown:
    """A breakdown from another request's run, with this request's notices and overrides."""
    breakdown.notices, breakdown.overrides = list(steering.notices), steering.applied
    return breakdown


async def _followed(flight: Flight, steering: Steering) -> AsyncGenerator[Event]:
    """A flight's events as a follower shows them: its calls as cache hits (made for another request)."""
    async with aclosing(flight.follow()) as events:
        async for event in events:
            if isinstance(event, MemberFinished):
                yield MemberFinished(cached_copy(event.report))
            elif isinstance(event, PanelDone):
                yield PanelDone([cached_copy(r) for r in event.reports], event.selected)
            elif isinstance(event, Completed):
                hit = _steered(as_hit(event.breakdown), steering)
                yield Completed(finish_reason=event.finish_reason, breakdown=hit, usage=Usage())
            elif isinstance(event, Failed):
                yield Failed(event.error, _steered(as_hit(event.breakdown, answered=False), steering))
            else:  # the answer's pieces, the stages, the members starting and streaming: as they are
                yield event
