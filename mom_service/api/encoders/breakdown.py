"""The `mom` breakdown: what each member and the concluding call did, as every surface shows it beside its own
protocol's fields. Its usage objects use OpenAI's field names, the service's own convention for its additions."""

from __future__ import annotations

from decimal import Decimal
from typing import Any

from mom_service.engine.events import Breakdown, CallReport, Usage
from mom_service.usage.money import usd


def usage_dict(usage: Usage, cost: Decimal | None = None) -> dict[str, Any]:
    """OpenAI's CompletionUsage, with our `cost` (USD) beside the standard fields."""
    return {
        "prompt_tokens": usage.prompt_tokens,
        "completion_tokens": usage.completion_tokens,
        "total_tokens": usage.total_tokens,
        "completion_tokens_details": {"reasoning_tokens": usage.reasoning_tokens},
        "prompt_tokens_details": {"cached_tokens": usage.cached_tokens},
        "cost": usd(cost),
    }


def report_dict(report: CallReport) -> dict[str, Any]:
    return {
        "name": report.name,
        "model": report.model,
        "status": report.status,
        "partial": report.partial,
        "finish_reason": report.finish_reason,
        "reason": report.error_type,
        "error": report.error,
        "latency_ms": report.latency_ms,
        "ttft_ms": report.ttft_ms,
        "usage": usage_dict(report.usage, report.cost) if report.usage is not None else None,
        "usage_estimated": report.estimated,
        "tool_calls": report.tool_calls,
        "cost": usd(report.cost),
        "cached": report.cached,
        "images": report.images,
        "stage": report.stage,
    }


def breakdown_dict(breakdown: Breakdown) -> dict[str, Any]:
    """The `mom` object: what each member and the concluding call did."""
    return {
        "members": [report_dict(m) for m in breakdown.members],
        "concluding": report_dict(breakdown.concluding),
        "concluding_fallbacks": [report_dict(r) for r in breakdown.concluding_failed],
        "answered": breakdown.answered,
        "asked": breakdown.asked,
        "degraded": breakdown.degraded,
        "cost": usd(breakdown.cost),
        "cost_saved": usd(breakdown.saved) or 0.0,
        "usage_estimated": breakdown.usage_estimated,
        "unpriced": breakdown.unpriced,
        "cache": breakdown.cache,
        "turn": breakdown.turn,
        "tier": breakdown.tier,
        "structured_output": breakdown.structured_output,
        "notices": breakdown.notices,
        "overrides": breakdown.overrides or None,
        "strategy": breakdown.strategy,
        "stage_calls": [report_dict(r) for r in breakdown.stage_calls],
        "ranking": breakdown.ranking,
        "selected": breakdown.selected,
        "votes": breakdown.votes,
    }
