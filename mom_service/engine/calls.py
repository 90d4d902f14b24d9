"""What every upstream call of the engine goes through, and the one place a call's outcome is accounted: its usage
(reported, or our count), its cost, its failure (the reason and scrubbed message a client sees; the whole text
for the log)."""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Coroutine
from dataclasses import dataclass, field
from typing import Any

from mom_service.config import LLMDefinition
from mom_service.engine.cached import ResponseCache
from mom_service.engine.events import CallReport
from mom_service.errors import WITH_TRACEBACK
from mom_service.providers.caller import LLMCaller
from mom_service.providers.circuit_breaker import CircuitBreakers, Result
from mom_service.providers.errors import LLMCallError, is_transient
from mom_service.providers.pricing import PriceBook, call_cost

logger = logging.getLogger("mom_service")

NOT_ANSWERED = "cancelled before it answered"


def ms_since(started: float) -> float:
    return round((time.perf_counter() - started) * 1000, 1)


@dataclass(slots=True)
class Calls:
    """The engine's means of calling LLMs: the caller, the prices, the circuit breakers, the cache (None when off),
    and the background tasks (cache stores nobody waits for)."""

    caller: LLMCaller
    prices: PriceBook
    breakers: CircuitBreakers
    cache: ResponseCache | None = None
    background: set[asyncio.Task[None]] = field(default_factory=set)

    def in_background(self, work: Coroutine[Any, Any, None]) -> None:
        task = asyncio.create_task(work)
        self.background.add(task)
        task.add_done_callback(self.background.discard)

    async def whole(
        self,
        llm: LLMDefinition,
        report: CallReport,
        messages: list[dict[str, Any]],
        params: dict[str, Any],
        encoded: bytes | None = None,
    ) -> Result:
        """One call answered whole (a member's, a stage's), its `report` filled in place: answered; an empty answer
        (no text, no tool call) failed but paid; a failure (paid when it reached the provider); a bug in an adapter
        (failed, logged). Returns the circuit breaker's verdict; a cancellation is the caller's to settle."""
        report.sent = True
        try:
            result = await self.caller.complete(llm, messages, params, encoded=encoded)
        except LLMCallError as exc:
            self.failed(llm, report, exc, messages, "")
            return "failure" if is_transient(exc) else "abandoned"
        except Exception as exc:  # a bug in an adapter: this call failed, the request goes on
            logger.error("%s %s failed unexpectedly", report.role, llm.name, exc_info=exc, extra=WITH_TRACEBACK)
            report.failed("error", f"failed: {type(exc).__name__}")
            return "abandoned"
        if result.text.strip() or result.tool_calls:
            report.answered(result.text, result.tool_calls)
        else:  # no content and no tool call: not an answer, but paid for
            report.failed("empty_answer", "the LLM answered with no content")
        report.usage = result.usage
        self.charge(llm, report, messages, result.text)
        return "success"  # the provider answered: it is up (even when the answer is empty)

    def charge(self, llm: LLMDefinition, report: CallReport, messages: list[dict[str, Any]], output: str) -> None:
        """A call's usage and cost: as its provider reported it, else our count (marked as an estimate)."""
        if report.usage is None:
            report.usage = self.caller.estimate_usage(llm, messages, output)
            report.estimated = True
        report.cost = call_cost(report.usage, self.prices.get(llm.name))

    def failed(
        self, llm: LLMDefinition, report: CallReport, exc: LLMCallError, messages: list[dict[str, Any]], output: str
    ) -> None:
        """A call failed: the client sees its reason and scrubbed message, the log its whole (redacted) text. If its
        request reached the provider (a timeout, a stream cut short), what it consumed is charged (our estimate)."""
        logger.warning("%s %s failed (%s): %s", report.role, llm.name, exc.kind, exc.detail)
        report.failed(exc.kind, exc.message)
        if exc.reached or report.usage is not None:
            self.charge(llm, report, messages, output)

    def cut(
        self, llm: LLMDefinition, messages: list[dict[str, Any]], report: CallReport, reason: str, started: float
    ) -> None:
        """A member cancelled before it answered (cut off, or the client left). If its request was sent, its input
        is paid for: counted (our estimate: a whole call's output is never seen, so none is counted)."""
        report.cancelled(reason)
        report.latency_ms = ms_since(started)
        if report.sent:
            self.charge(llm, report, messages, "")
