"""The engine: plan the panel, fan out, wait for the members, synthesize, and yield events. No HTTP here."""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import AsyncGenerator, Callable
from contextlib import aclosing
from dataclasses import dataclass
from typing import Any

from mom_service.config import LLMDefinition, MoMConfig, MoMModelConfig
from mom_service.cost_calculation import call_cost
from mom_service.errors import UpstreamFailed
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
)
from mom_service.llm_calls import LLMCaller, LLMCallError, StreamEnd
from mom_service.pricing_utils import PriceBook
from mom_service.synthesis import concluding_messages

logger = logging.getLogger("mom_service")

Recorder = Callable[[RequestOutcome], None]


@dataclass(slots=True, frozen=True)
class Plan:
    """One request, resolved against the config: who is asked, who concludes, with what."""

    request_id: str
    mom: MoMModelConfig
    members: tuple[LLMDefinition, ...]
    concluding: LLMDefinition
    prompt: str
    messages: tuple[dict[str, Any], ...]
    params: dict[str, Any]
    stream: bool


def make_plan(
    config: MoMConfig,
    mom: MoMModelConfig,
    messages: list[dict[str, Any]],
    params: dict[str, Any],
    *,
    request_id: str,
    stream: bool,
) -> Plan:
    return Plan(
        request_id=request_id,
        mom=mom,
        members=tuple(config.llm(name) for name in mom.llms_to_query),
        concluding=config.llm(mom.concluding_llm),
        prompt=config.concluding_prompt(mom),
        messages=tuple(messages),
        params=params,
        stream=stream,
    )


def _ms_since(started: float) -> float:
    return round((time.perf_counter() - started) * 1000, 1)


def _ignore(outcome: RequestOutcome) -> None:
    return None


class Engine:
    def __init__(self, caller: LLMCaller, prices: PriceBook, record: Recorder = _ignore) -> None:
        self.caller = caller
        self.prices = prices
        self._record = record

    async def _ask_member(self, plan: Plan, llm: LLMDefinition) -> CallReport:
        report = CallReport(name=llm.name, model=llm.model)
        started = time.perf_counter()
        try:
            result = await self.caller.complete(llm, list(plan.messages), plan.params)
        except LLMCallError as exc:
            report.status = "error"
            report.error = exc.message
            report.error_type = exc.kind
        else:
            report.text = result.text
            report.usage = result.usage
        report.latency_ms = _ms_since(started)
        report.cost = call_cost(report.usage, self.prices.get(llm.name))
        return report

    async def run(self, plan: Plan) -> AsyncGenerator[Event]:
        """Yields MemberFinished as each member settles, PanelDone, ContentDelta..., then Completed or Failed.

        Closing or cancelling the iterator cancels every upstream call still running. However the request ends,
        its outcome (every call, with usage and cost) goes to the recorder, once.
        """
        started_at = time.time()
        started = time.perf_counter()
        members = [
            CallReport(
                name=llm.name,
                model=llm.model,
                status="cancelled",
                error="cancelled before it answered",
                error_type="cancelled",
            )
            for llm in plan.members
        ]
        concluding = CallReport(
            name=plan.concluding.name, model=plan.concluding.model, role="concluding", status="skipped"
        )
        breakdown = Breakdown(members=members, concluding=concluding)
        status: RequestStatus = "cancelled"
        error_code: str | None = None
        ttft_ms: float | None = None
        tasks = {asyncio.create_task(self._ask_member(plan, llm)): i for i, llm in enumerate(plan.members)}
        synthesis: list[str] = []
        messages: list[dict[str, Any]] = []
        concluding_started = 0.0
        try:
            pending = set(tasks)
            while pending:
                done, pending = await asyncio.wait(pending, return_when=asyncio.FIRST_COMPLETED)
                for task in done:
                    report = task.result()
                    members[tasks[task]] = report
                    yield MemberFinished(report)

            yield PanelDone(members)
            if not any(r.status == "ok" for r in members):
                failures = "; ".join(f"{r.name}: {r.error}" for r in members)
                concluding.error = "no panel member answered"
                error = UpstreamFailed(f"All {len(members)} panel members failed ({failures})", code="members_failed")
                status, error_code = "error", error.code
                yield Failed(error, breakdown)
                return

            messages = concluding_messages(plan.prompt, plan.messages, members)
            concluding_started = time.perf_counter()
            concluding.status = "cancelled"
            finish_reason = "stop"
            try:
                async with aclosing(self.caller.stream(plan.concluding, messages, plan.params)) as pieces:
                    async for piece in pieces:
                        if isinstance(piece, StreamEnd):
                            concluding.usage = piece.usage
                            finish_reason = piece.finish_reason
                            continue
                        if concluding.ttft_ms is None:
                            concluding.ttft_ms = _ms_since(concluding_started)
                            ttft_ms = _ms_since(started)
                        synthesis.append(piece)
                        yield ContentDelta(piece)
            except LLMCallError as exc:
                concluding.status = "error"
                concluding.error = exc.message
                concluding.error_type = exc.kind
                concluding.latency_ms = _ms_since(concluding_started)
                concluding.cost = call_cost(concluding.usage, self.prices.get(plan.concluding.name))
                when = "after it began answering" if concluding.ttft_ms is not None else "before answering"
                error = UpstreamFailed(
                    f"The concluding LLM '{plan.concluding.name}' failed {when}: {exc.message}",
                    code="concluding_failed",
                )
                status, error_code = "error", error.code
                yield Failed(error, breakdown)
                return
            concluding.status = "ok"
            concluding.latency_ms = _ms_since(concluding_started)
            concluding.cost = call_cost(concluding.usage, self.prices.get(plan.concluding.name))
            status = "ok"
            yield Completed(finish_reason=finish_reason, breakdown=breakdown, usage=breakdown.usage())
        finally:
            for task in tasks:
                task.cancel()
            if concluding.status == "cancelled":
                self._settle_cancelled_stream(plan.concluding, concluding, concluding_started, messages, synthesis)
            self._emit(
                RequestOutcome(
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
            )

    def _settle_cancelled_stream(
        self,
        llm: LLMDefinition,
        report: CallReport,
        started: float,
        messages: list[dict[str, Any]],
        synthesis: list[str],
    ) -> None:
        """A stream cut off by the client leaving still costs the tokens it produced: count them ourselves."""
        report.error = "cancelled: the client disconnected"
        report.error_type = "cancelled"
        report.latency_ms = _ms_since(started)
        report.usage = self.caller.estimate_usage(llm, messages, "".join(synthesis))
        report.estimated = True
        report.cost = call_cost(report.usage, self.prices.get(llm.name))

    def _emit(self, outcome: RequestOutcome) -> None:
        try:
            self._record(outcome)
        except Exception as exc:  # recording must never break an answer
            logger.error("could not record request %s: %s", outcome.request_id, type(exc).__name__)
