"""A finished request as rows: one for the request, one per upstream call it made (our own UUID keys, so an insert
repeated by a retried flush changes nothing)."""

from __future__ import annotations

import logging
import uuid
from typing import Any

import orjson

from mom_service.engine.events import CallReport, RequestOutcome
from mom_service.usage.money import to_pico

logger = logging.getLogger("mom_service")


def _call_row(request: RequestOutcome, report: CallReport, created_ms: int) -> dict[str, Any]:
    usage = report.usage
    return {
        "id": str(uuid.uuid4()),
        "request_id": request.request_id,
        "created_ms": created_ms,
        "mom_model": request.mom_model,
        "llm": report.name,
        "model": report.model,
        "role": report.role,
        "stage": report.stage,
        "status": report.status,
        "error_type": report.error_type,
        "error": report.error[:300] if report.error else None,
        "prompt_tokens": usage.prompt_tokens if usage else 0,
        "completion_tokens": usage.completion_tokens if usage else 0,
        "reasoning_tokens": usage.reasoning_tokens if usage else 0,
        "cached_tokens": usage.cached_tokens if usage else 0,
        "usage_estimated": report.estimated,
        "cost_pico": to_pico(report.cost),
        "latency_ms": report.latency_ms,
        "ttft_ms": report.ttft_ms,
        "cached": report.cached,
    }


def rows_for(outcome: RequestOutcome) -> tuple[dict[str, Any], list[dict[str, Any]]]:
    """One row for the request and one per upstream call it made (calls never started are not rows)."""
    created_ms = int(outcome.started_at * 1000)
    breakdown = outcome.breakdown
    usage = breakdown.usage()
    calls = [
        _call_row(outcome, report, created_ms)
        for report in breakdown.calls
        if report.status != "skipped"
        and not report.cached  # served from the cache: no upstream call was made
        and not (report.status == "cancelled" and report.latency_ms is None)
    ]
    request = {
        "id": outcome.request_id,
        "created_ms": created_ms,
        "mom_model": outcome.mom_model,
        "stream": outcome.stream,
        "status": outcome.status,
        "error_type": outcome.error_code,
        "prompt_tokens": usage.prompt_tokens,
        "completion_tokens": usage.completion_tokens,
        "reasoning_tokens": usage.reasoning_tokens,
        "cached_tokens": usage.cached_tokens,
        "cost_pico": to_pico(breakdown.cost),
        "latency_ms": outcome.latency_ms,
        "ttft_ms": outcome.ttft_ms,
        "cache_hit": breakdown.cache == "hit",
        "members_asked": breakdown.asked,  # as the answer's `mom.asked` and the request log count them
        "members_ok": breakdown.answered,
        "cost_saved_pico": to_pico(breakdown.saved),
        "usage_estimated": any(report.estimated for report in breakdown.calls),
        "turn": breakdown.turn,
        "surface": outcome.surface,
        "overrides": orjson.dumps(outcome.overrides).decode() if outcome.overrides else None,
        "caller": outcome.caller or None,
        "key_id": outcome.key.id if outcome.key is not None else None,
    }
    return request, calls


Batch = tuple[dict[str, Any], list[dict[str, Any]]]
