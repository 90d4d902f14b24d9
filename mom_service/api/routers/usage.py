"""`/v1/metrics/usage`: usage and cost over a time range, with filters and grouping. An API key reads its own
requests only; a static API_TOKEN reads everyone's (docs/keys.md)."""

from __future__ import annotations

import logging
import time
from datetime import UTC, datetime
from typing import Any, cast, get_args

from fastapi import APIRouter

from mom_service.api.auth import Identified
from mom_service.api.schemas.validation import parse_time
from mom_service.api.state import AppState, StateDep
from mom_service.errors import InvalidRequest, ServiceUnavailable
from mom_service.usage.database import UsageUnavailable
from mom_service.usage.keys import KeyStoreUnavailable
from mom_service.usage.report import STATIC_CALLERS, GroupBy

logger = logging.getLogger("mom_service")
router = APIRouter(prefix="/v1")

DEFAULT_PERIOD_S = 24 * 3600
MAX_RANGE_DAYS = 366  # a longer range is refused: a year of records per query at most


def check_range(start_s: float, end_s: float) -> None:
    """At most MAX_RANGE_DAYS from 'start' to 'end'."""
    if end_s - start_s > MAX_RANGE_DAYS * 86_400:
        raise InvalidRequest(
            f"Invalid value for 'start': the range from 'start' to 'end' is longer than {MAX_RANGE_DAYS} days; "
            f"ask for at most {MAX_RANGE_DAYS} days at once.",
            param="start",
            code="invalid_value",
        )


async def _named(state: AppState, groups: list[dict[str, Any]]) -> None:
    """Each group of a report by key with its key's name (null for the static API_TOKEN callers' group)."""
    names = await state.keys.store.names([g["key"] for g in groups if g["key"] != STATIC_CALLERS])
    for group in groups:
        group["name"] = names.get(group["key"])


def iso(seconds: float) -> str:
    return datetime.fromtimestamp(seconds, UTC).isoformat().replace("+00:00", "Z")


@router.get("/metrics/usage")
async def usage(
    state: StateDep,
    caller: Identified,
    start: str | None = None,
    end: str | None = None,
    model: str | None = None,
    llm: str | None = None,
    group_by: str | None = None,
) -> dict[str, Any]:
    key_id = caller.key.id if caller.key is not None else None
    return await usage_report(state, start=start, end=end, model=model, llm=llm, group_by=group_by, key_id=key_id)


async def usage_report(
    state: AppState,
    *,
    start: str | None = None,
    end: str | None = None,
    model: str | None = None,
    llm: str | None = None,
    group_by: str | None = None,
    caller: str | None = None,
    key_id: str | None = None,
) -> dict[str, Any]:
    """The usage report of the query's parameters (the usage API's, and the MCP server's `usage` tool's): `caller`
    limits it to that caller's requests, `key_id` to that API key's. Grouped by key, each group has its key's name."""
    end_s = parse_time(end, "end") if end is not None else time.time()
    start_s = parse_time(start, "start") if start is not None else end_s - DEFAULT_PERIOD_S
    if end_s < start_s:
        raise InvalidRequest("'end' is before 'start'.", param="end", code="invalid_value")
    check_range(start_s, end_s)
    allowed = get_args(GroupBy)
    if group_by is not None and group_by not in allowed:
        raise InvalidRequest(
            f"Invalid value for 'group_by': '{group_by}'; use one of {', '.join(allowed)}.",
            param="group_by",
            code="invalid_value",
        )
    try:
        report = await state.usage.report(
            start_ms=int(start_s * 1000),
            end_ms=int(end_s * 1000),
            model=model,
            llm=llm,
            group_by=cast(GroupBy | None, group_by),  # checked against GroupBy's values above
            caller=caller,
            key_id=key_id,
        )
        if group_by == "key":
            await _named(state, report["groups"])
    except (UsageUnavailable, KeyStoreUnavailable) as exc:
        logger.error("usage query failed: %s", exc)
        raise ServiceUnavailable(
            "The usage database is not answering; try again later.", code="usage_database_unavailable"
        ) from None
    return {"period": {"start": iso(start_s), "end": iso(end_s)}, **report}
