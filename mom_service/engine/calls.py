"""What every upstream call of the engine goes through, and the one place a call's outcome is accounted: its usage
(reported, or our count), its cost, its failure (the reason and scrubbed message a client sees; the whole text
for the log)."""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable, Coroutine
from contextlib import aclosing
from dataclasses import dataclass, field
from typing import Any

from mom_service.config import LLMDefinition
from mom_service.engine.cached import ResponseCache
from mom_service.engine.events import CallReport, Usage
from mom_service.engine.plan import Member
from mom_service.engine.tools import CallAssembler, fragment_deltas
from mom_service.errors import WITH_TRACEBACK
from mom_service.providers.caller import Delta, LLMCaller, StreamEnd
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
        """One call answered whole (a stage's), its `report` filled in place: answered; an empty answer (no text,
        no tool call) failed but paid; a failure (paid when it reached the provider); a bug in an adapter (failed,
        logged). Returns the circuit breaker's verdict; a cancellation is the caller's to settle."""
        report.sent = True
        try:
            result = await self.caller.complete(llm, messages, params, encoded=encoded)
        except Exception as exc:
            return self._failure(llm, report, exc, messages, "")
        report.finish_reason = result.finish_reason
        return self._settle(llm, report, messages, result.text, result.tool_calls, result.usage)

    async def streamed(
        self, member: Member, report: CallReport, pieces: list[str], send: Callable[[str], None]
    ) -> Result:
        """A member's call, streamed: each piece of its text kept in `pieces` (what a cut-off member wrote) and
        passed to `send` as it comes; its `report` filled in place as `whole` fills it, its time to first token
        too, its usage from the stream's last chunk. Its tool calls are put back together from their pieces."""
        llm, messages = member.llm, member.messages
        report.sent = True
        started = time.perf_counter()
        usage: Usage | None = None
        assembler: CallAssembler | None = None
        try:
            async with aclosing(self.caller.stream(llm, messages, member.params, encoded=member.encoded)) as stream:
                async for piece in stream:
                    if type(piece) is str:  # plain text, nearly every piece: the short way
                        if report.ttft_ms is None:
                            report.ttft_ms = ms_since(started)
                        pieces.append(piece)
                        send(piece)
                    elif isinstance(piece, StreamEnd):
                        usage, report.finish_reason = piece.usage, piece.finish_reason
                    elif isinstance(piece, Delta):  # text with more (log probabilities), or tool-call fragments
                        if report.ttft_ms is None:
                            report.ttft_ms = ms_since(started)
                        if piece.text:
                            pieces.append(piece.text)
                            send(piece.text)
                        if piece.tool_calls:
                            assembler = assembler or CallAssembler()
                            for delta in fragment_deltas(piece.tool_calls):
                                assembler.add(delta)
        except Exception as exc:
            return self._failure(llm, report, exc, messages, "".join(pieces))
        calls = assembler.calls() if assembler is not None else None
        return self._settle(llm, report, messages, "".join(pieces), calls, usage)

    def _settle(
        self,
        llm: LLMDefinition,
        report: CallReport,
        messages: list[dict[str, Any]],
        text: str,
        tool_calls: list[dict[str, Any]] | None,
        usage: Usage | None,
    ) -> Result:
        """A call that ended: answered, or (no content and no tool call) failed as empty but paid for."""
        if text.strip() or tool_calls:
            report.answered(text, tool_calls)
        else:
            report.failed("empty_answer", "the LLM answered with no content")
        report.usage = usage
        self.charge(llm, report, messages, text)
        return "success"  # the provider answered: it is up (even when the answer is empty)

    def _failure(
        self, llm: LLMDefinition, report: CallReport, exc: Exception, messages: list[dict[str, Any]], output: str
    ) -> Result:
        """A call that raised: a failure of the call (its verdict: transient or not), or a bug in an adapter (this
        call failed, logged; the request goes on)."""
        if isinstance(exc, LLMCallError):
            self.failed(llm, report, exc, messages, output)
            return "failure" if is_transient(exc) else "abandoned"
        logger.error("%s %s failed unexpectedly", report.role, llm.name, exc_info=exc, extra=WITH_TRACEBACK)
        report.failed("error", f"failed: {type(exc).__name__}")
        return "abandoned"

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
        self,
        llm: LLMDefinition,
        messages: list[dict[str, Any]],
        report: CallReport,
        reason: str,
        started: float,
        streamed: str = "",
        *,
        partial: bool = False,
    ) -> None:
        """A member cancelled before it answered (cut off, or the client left), having `streamed` that much text.
        If its request was sent, it is paid for: its input by our count, its output counted from the text it
        streamed (marked as an estimate: the provider's own figures never came). With `partial`, what it wrote
        is its (partial) answer for the concluding LLM."""
        report.cancelled(reason)
        report.latency_ms = ms_since(started)
        if partial and streamed.strip():
            report.text, report.partial = streamed, True
        if report.sent:
            self.charge(llm, report, messages, streamed)
