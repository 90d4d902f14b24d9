"""What the engine needs of tracing: a trace per request, a generation per upstream call. The engine knows only these
protocols; observability/tracing.py implements them with Langfuse (and the engine is given a tracer, or none)."""

from __future__ import annotations

from typing import Any, Protocol

from mom_service.engine.events import CallReport, RequestOutcome


class Generation(Protocol):
    def finish(self, report: CallReport, output: str) -> None:
        """The call's text (its tool calls are in the report)."""


class Trace(Protocol):
    def generation(self, report: CallReport, messages: Any, params: dict[str, Any]) -> Generation: ...

    def first_token(self, generation: Generation) -> None: ...

    def finish(self, outcome: RequestOutcome, output: str, tool_calls: list[dict[str, Any]] | None = None) -> None:
        """The request's answer: its text and the tool calls it made."""


class _NoGeneration:
    def finish(self, report: CallReport, output: str) -> None:
        return None


NO_GENERATION: Generation = _NoGeneration()


class _NoTrace:
    def generation(self, report: CallReport, messages: Any, params: dict[str, Any]) -> Generation:
        return NO_GENERATION

    def first_token(self, generation: Generation) -> None:
        return None

    def finish(self, outcome: RequestOutcome, output: str, tool_calls: list[dict[str, Any]] | None = None) -> None:
        return None


NO_TRACE: Trace = _NoTrace()


class TraceStarter(Protocol):
    def start(
        self, *, mom_model: str, request_id: str, user: str | None, messages: Any, surface: str = "chat"
    ) -> Trace: ...
