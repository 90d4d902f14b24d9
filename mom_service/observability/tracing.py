"""Langfuse traces: one trace per request (named after the MoM model), one generation per upstream call.

The only module that imports langfuse. Off (a no-op) when the keys are unset. Spans are exported by the SDK's
background thread, so a Langfuse host that is slow, down or refusing never slows or fails an answer; every call
into the SDK is guarded, so a tracing bug cannot break a request either.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import threading
from datetime import UTC, datetime
from typing import Any

from mom_service.engine.events import CallReport, RequestOutcome
from mom_service.engine.tracing import NO_GENERATION, NO_TRACE, Generation, Trace
from mom_service.settings import Settings
from mom_service.usage.money import usd

logger = logging.getLogger("mom_service")
# Each export to Langfuse gives up after this long (in the SDK's background thread; never in a request), and at
# shutdown the buffered traces are waited for this long at most: with a Langfuse host that hangs, the process
# still exits within a few seconds (OpenTelemetry's own exit handler then waits for the export in progress).
EXPORT_TIMEOUT_S = 3
FLUSH_BOUND_S = 3.0


def _guard(action: str, call: Any, *args: Any, **kwargs: Any) -> Any:
    try:
        return call(*args, **kwargs)
    except Exception as exc:
        logger.warning("tracing: %s failed (%s)", action, type(exc).__name__)
        return None


def _usage_details(report: CallReport) -> dict[str, int] | None:
    usage = report.usage
    if usage is None:
        return None
    return {
        "input": usage.prompt_tokens,
        "output": usage.completion_tokens,
        "total": usage.total_tokens,
        "reasoning": usage.reasoning_tokens,
        "cached": usage.cached_tokens,
    }


def _output(text: str, tool_calls: list[dict[str, Any]] | None) -> Any:
    """An answer as Langfuse shows it: the text, or an assistant message when it calls tools."""
    if not tool_calls:
        return text
    return {"role": "assistant", "content": text or None, "tool_calls": tool_calls}


def _tool_names(params: dict[str, Any]) -> list[str] | None:
    tools = params.get("tools")
    if not isinstance(tools, list):
        return None
    return [str(t.get("function", {}).get("name")) for t in tools if isinstance(t, dict)]


class _LangfuseGeneration:
    def __init__(self, observation: Any) -> None:
        self.observation = observation

    def finish(self, report: CallReport, output: str) -> None:
        level = "DEFAULT"
        if report.status == "error":
            level = "ERROR"
        elif report.status in ("skipped", "cancelled"):
            level = "WARNING"
        cost = usd(report.cost)
        _guard(
            "updating a generation",
            self.observation.update,
            output=_output(output, report.tool_calls) if report.status == "ok" or output else None,
            level=level,
            status_message=f"{report.status}: {report.error}" if report.error else None,
            usage_details=_usage_details(report),
            cost_details={"total": cost} if cost is not None else None,
            metadata={"status": report.status, "latency_ms": report.latency_ms, "ttft_ms": report.ttft_ms},
        )
        _guard("ending a generation", self.observation.end)


class _LangfuseTrace:
    def __init__(self, client: Any, propagate: Any, outcome_name: str, user: str | None, request_id: str, root: Any):
        self.client = client
        self.propagate = propagate
        self.root = root
        self.attributes: dict[str, Any] = {
            "trace_name": outcome_name,
            "user_id": user,
            "tags": [outcome_name],
            "metadata": {"request_id": request_id, "mom_model": outcome_name},
        }

    def generation(self, report: CallReport, messages: Any, params: dict[str, Any]) -> Generation:
        def start() -> Any:
            with self.propagate(**self.attributes):
                return self.root.start_observation(
                    name=report.name,
                    as_type="generation",
                    model=report.model,
                    input=messages,
                    model_parameters={k: v for k, v in params.items() if isinstance(v, str | int | float | bool)},
                    metadata={"role": report.role, "stage": report.stage, "tools": _tool_names(params)},
                )

        observation = _guard("starting a generation", start)
        return _LangfuseGeneration(observation) if observation is not None else NO_GENERATION

    def first_token(self, generation: Generation) -> None:
        if isinstance(generation, _LangfuseGeneration):
            now = datetime.now(UTC)
            _guard("marking the first token", generation.observation.update, completion_start_time=now)

    def finish(self, outcome: RequestOutcome, output: str, tool_calls: list[dict[str, Any]] | None = None) -> None:
        breakdown = outcome.breakdown
        _guard(
            "ending a trace",
            self._finish,
            outcome,
            _output(output, tool_calls),
            {
                "status": outcome.status,
                "error": outcome.error_code,
                "turn": breakdown.turn,
                "tier": breakdown.tier,
                "answered": breakdown.answered,
                "asked": breakdown.asked,
                "cost": usd(breakdown.cost),
                "latency_ms": outcome.latency_ms,
                "ttft_ms": outcome.ttft_ms,
                "overrides": outcome.overrides or None,
                "notices": breakdown.notices or None,
            },
        )

    def _finish(self, outcome: RequestOutcome, output: Any, summary: dict[str, Any]) -> None:
        self.root.update(
            output=output,
            level="ERROR" if outcome.status == "error" else "DEFAULT",
            status_message=outcome.error_code,
            metadata=summary,
        )
        self.root.end()


class Tracer:
    """Starts traces; `enabled` is False (and every trace a no-op) when the Langfuse keys are unset."""

    def __init__(self, settings: Settings) -> None:
        self.host = settings.langfuse_host or settings.langfuse_base_url or "https://cloud.langfuse.com"
        self.enabled = bool(settings.langfuse_public_key and settings.langfuse_secret_key)
        self._client: Any = None
        self._propagate: Any = None
        if self.enabled:
            from langfuse import Langfuse, propagate_attributes

            self._client = Langfuse(
                public_key=settings.langfuse_public_key,
                secret_key=settings.langfuse_secret_key,
                base_url=self.host,
                timeout=EXPORT_TIMEOUT_S,
            )
            self._propagate = propagate_attributes

    def start(
        self, *, mom_model: str, request_id: str, user: str | None, messages: Any, surface: str = "chat"
    ) -> Trace:
        if not self.enabled:
            return NO_TRACE

        def start_root() -> Any:
            attributes = {
                "trace_name": mom_model,
                "user_id": user,
                "tags": [mom_model, surface],
                "metadata": {"request_id": request_id, "mom_model": mom_model, "surface": surface},
            }
            with self._propagate(**attributes):
                # a trace of its own, never a child of whatever HTTP span the server may have open
                trace_context = {"trace_id": self._client.create_trace_id()}
                return self._client.start_observation(
                    trace_context=trace_context, name=mom_model, as_type="span", input=messages
                )

        root = _guard("starting a trace", start_root)
        if root is None:
            return NO_TRACE
        return _LangfuseTrace(self._client, self._propagate, mom_model, user, request_id, root)

    def shutdown(self) -> None:
        """Flush what is buffered (each export bounded by the SDK's timeout) and stop the exporter."""
        if self._client is not None:
            _guard("flushing traces", self._client.shutdown)

    async def close(self, bound_s: float = FLUSH_BOUND_S) -> None:
        """`shutdown` in a daemon thread, waited for `bound_s` at most: a Langfuse host that hangs costs the
        process's exit that long, not the SDK's timeout once per pending export (nor a thread joined at exit)."""
        if self._client is None:
            return
        loop = asyncio.get_running_loop()
        done = asyncio.Event()

        def flush() -> None:
            try:
                self.shutdown()
            finally:
                with contextlib.suppress(RuntimeError):  # the loop is already closed: nobody waits any more
                    loop.call_soon_threadsafe(done.set)

        threading.Thread(target=flush, name="mom-trace-flush", daemon=True).start()
        try:
            await asyncio.wait_for(done.wait(), bound_s)
        except TimeoutError:
            logger.warning("tracing: traces not flushed within %g s (Langfuse does not answer): dropped", bound_s)
