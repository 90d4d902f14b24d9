"""A request's outcome while it is decided (the Tally the engine keeps for each request): how it ends, its first
token, its answer, its tool calls; made into the RequestOutcome that is recorded once."""

from __future__ import annotations

import time
from dataclasses import dataclass, field

from mom_service.engine.calls import ms_since
from mom_service.engine.events import (
    Breakdown,
    Completed,
    ContentDelta,
    Event,
    Failed,
    RequestOutcome,
    RequestStatus,
    ToolCallDelta,
)
from mom_service.engine.plan import Plan
from mom_service.engine.tools import CallAssembler
from mom_service.engine.tracing import Trace


@dataclass(slots=True)
class Tally:
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
    calls: CallAssembler | None = None  # the answer's tool calls, when it makes any

    def see(self, event: Event) -> None:
        if isinstance(event, ContentDelta):  # first: nearly every event is one
            if self.ttft_ms is None:
                self.ttft_ms = ms_since(self.started)
            self.answer.append(event.text)
        elif isinstance(event, ToolCallDelta):
            if self.ttft_ms is None:
                self.ttft_ms = ms_since(self.started)
            if self.calls is None:
                self.calls = CallAssembler()
            self.calls.add(event)
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
            latency_ms=ms_since(self.started),
            ttft_ms=self.ttft_ms,
            breakdown=self.breakdown,
            surface=self.plan.surface,
            overrides=self.plan.steering.applied,
            caller=self.plan.caller,
            key=self.plan.key,
        )
