"""The engine: plan the panel, fan out, wait for the members, synthesize, and yield events. No HTTP here."""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncGenerator
from contextlib import aclosing
from dataclasses import dataclass
from typing import Any

from mom_service.config import LLMDefinition, MoMConfig, MoMModelConfig
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
)
from mom_service.llm_calls import LLMCaller, LLMCallError, StreamEnd
from mom_service.synthesis import concluding_messages


@dataclass(slots=True, frozen=True)
class Plan:
    """One request, resolved against the config: who is asked, who concludes, with what."""

    mom: MoMModelConfig
    members: tuple[LLMDefinition, ...]
    concluding: LLMDefinition
    prompt: str
    messages: tuple[dict[str, Any], ...]
    params: dict[str, Any]


def make_plan(config: MoMConfig, mom: MoMModelConfig, messages: list[dict[str, Any]], params: dict[str, Any]) -> Plan:
    return Plan(
        mom=mom,
        members=tuple(config.llm(name) for name in mom.llms_to_query),
        concluding=config.llm(mom.concluding_llm),
        prompt=config.concluding_prompt(mom),
        messages=tuple(messages),
        params=params,
    )


def _ms_since(started: float) -> float:
    return round((time.perf_counter() - started) * 1000, 1)


class Engine:
    def __init__(self, caller: LLMCaller) -> None:
        self.caller = caller

    async def _ask_member(self, plan: Plan, llm: LLMDefinition) -> CallReport:
        report = CallReport(name=llm.name, model=llm.model)
        started = time.perf_counter()
        try:
            result = await self.caller.complete(llm, list(plan.messages), plan.params)
        except LLMCallError as exc:
            report.status = "error"
            report.error = exc.message
        else:
            report.text = result.text
            report.usage = result.usage
        report.latency_ms = _ms_since(started)
        return report

    async def run(self, plan: Plan) -> AsyncGenerator[Event]:
        """Yields MemberFinished as each member settles, PanelDone, ContentDelta..., then Completed or Failed.

        Closing or cancelling the iterator cancels every upstream call still running.
        """
        tasks = {asyncio.create_task(self._ask_member(plan, llm)): i for i, llm in enumerate(plan.members)}
        reports: list[CallReport | None] = [None] * len(plan.members)
        concluding = CallReport(name=plan.concluding.name, model=plan.concluding.model)
        try:
            pending = set(tasks)
            while pending:
                done, pending = await asyncio.wait(pending, return_when=asyncio.FIRST_COMPLETED)
                for task in done:
                    report = task.result()
                    reports[tasks[task]] = report
                    yield MemberFinished(report)
        finally:
            for task in tasks:
                task.cancel()

        settled = [r for r in reports if r is not None]
        yield PanelDone(settled)
        breakdown = Breakdown(members=settled, concluding=concluding)
        if not any(r.status == "ok" for r in settled):
            failures = "; ".join(f"{r.name}: {r.error}" for r in settled)
            concluding.status = "skipped"
            concluding.error = "no panel member answered"
            error = UpstreamFailed(f"All {len(settled)} panel members failed ({failures})", code="members_failed")
            yield Failed(error, breakdown)
            return

        messages = concluding_messages(plan.prompt, plan.messages, settled)
        started = time.perf_counter()
        finish_reason = "stop"
        try:
            async with aclosing(self.caller.stream(plan.concluding, messages, plan.params)) as pieces:
                async for piece in pieces:
                    if isinstance(piece, StreamEnd):
                        concluding.usage = piece.usage
                        finish_reason = piece.finish_reason
                        continue
                    if concluding.ttft_ms is None:
                        concluding.ttft_ms = _ms_since(started)
                    yield ContentDelta(piece)
        except LLMCallError as exc:
            concluding.status = "error"
            concluding.error = exc.message
            concluding.latency_ms = _ms_since(started)
            when = "after it began answering" if concluding.ttft_ms is not None else "before answering"
            error = UpstreamFailed(
                f"The concluding LLM '{plan.concluding.name}' failed {when}: {exc.message}", code="concluding_failed"
            )
            yield Failed(error, breakdown)
            return
        except (asyncio.CancelledError, GeneratorExit):
            concluding.status = "cancelled"
            raise
        concluding.latency_ms = _ms_since(started)
        yield Completed(finish_reason=finish_reason, breakdown=breakdown, usage=breakdown.usage())
