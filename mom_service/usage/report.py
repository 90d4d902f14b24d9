"""The queries behind the usage API: totals and groups over a time range, latency percentiles computed in SQL
(`percentile_cont` on PostgreSQL, a ranked query on SQLite): the latencies of a range are never loaded."""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass
from typing import Any, Literal

from sqlalchemy import (
    Table,
    and_,
    case,
    func,
    literal,
    or_,
    select,
)
from sqlalchemy.ext.asyncio import AsyncConnection, AsyncEngine

from mom_service.usage.money import from_pico, usd
from mom_service.usage.schema import calls_table, requests_table

logger = logging.getLogger("mom_service")

GroupBy = Literal["model", "llm", "surface", "key", "day", "hour"]
STATIC_CALLERS = "api_token"  # group_by=key: the group of the requests made with a static API_TOKEN (no key)
_MS_PER = {"day": 86_400_000, "hour": 3_600_000}
_FRACTIONS = (0.50, 0.95)  # the latency percentiles reported: p50 and p95
Percentiles = tuple[float | None, float | None]
_NO_LATENCY: Percentiles = (None, None)


@dataclass(slots=True)
class _Group:
    requests: int = 0
    errors: int = 0
    prompt_tokens: int = 0
    completion_tokens: int = 0
    reasoning_tokens: int = 0
    cached_tokens: int = 0
    cost_pico: int = 0
    priced: int = 0
    saved_pico: int = 0
    saving: int = 0  # rows with a saved cost
    usage_estimated: int = 0  # rows with usage counted by us

    def as_dict(self, latency: Percentiles) -> dict[str, Any]:
        return {
            "requests": self.requests,
            "errors": self.errors,
            "prompt_tokens": self.prompt_tokens,
            "completion_tokens": self.completion_tokens,
            "reasoning_tokens": self.reasoning_tokens,
            "cached_tokens": self.cached_tokens,
            "usage_estimated": self.usage_estimated,
            "cost": usd(from_pico(self.cost_pico)) if self.priced else None,
            "cost_saved": usd(from_pico(self.saved_pico)) if self.saving else 0.0,
            "latency_ms_p50": latency[0],
            "latency_ms_p95": latency[1],
        }


def _group_key(group_by: GroupBy | None, raw: Any) -> str:
    if group_by == "key" and raw is None:
        return STATIC_CALLERS
    if group_by in _MS_PER:
        seconds = int(raw) * _MS_PER[str(group_by)] // 1000
        stamp = time.gmtime(seconds)
        return time.strftime("%Y-%m-%d" if group_by == "day" else "%Y-%m-%dT%H:00:00Z", stamp)
    return str(raw)


def _key(table: Table, group_by: GroupBy | None) -> Any:
    """What the rows are grouped by: a time bucket, the MoM model, the LLM, or one group of all."""
    c = table.c
    if group_by in _MS_PER:
        return c.created_ms // _MS_PER[str(group_by)]
    if group_by == "model":
        return c.mom_model
    if group_by == "llm":
        return c.llm
    if group_by in ("surface", "key"):  # a call's surface and key are its request's
        column = "surface" if group_by == "surface" else "key_id"
        if table is requests_table:
            return c[column]
        r = requests_table.c
        return select(r[column]).where(r.id == c.request_id).scalar_subquery()
    return literal("all")


def _aggregate(table: Table, key: Any, conditions: list[Any], per_call: bool) -> Any:
    """One row per group: the key, then _Group's fields in order."""
    c = table.c
    requests = func.count(func.distinct(c.request_id)) if per_call else func.count()
    # what the cache saved is a request's (its calls were not made): 0 in a per-call report
    saved = (
        (literal(0), literal(0))
        if per_call
        else (func.coalesce(func.sum(c.cost_saved_pico), 0), func.count(c.cost_saved_pico))
    )
    return (
        select(
            key.label("key"),
            requests,
            _count_where(c.status == "error"),
            func.coalesce(func.sum(c.prompt_tokens), 0),
            func.coalesce(func.sum(c.completion_tokens), 0),
            func.coalesce(func.sum(c.reasoning_tokens), 0),
            func.coalesce(func.sum(c.cached_tokens), 0),
            func.coalesce(func.sum(c.cost_pico), 0),
            func.count(c.cost_pico),
            *saved,
            _count_where(c.usage_estimated),
        )
        .where(*conditions)
        .group_by(key)
    )


def _count_where(condition: Any) -> Any:
    return func.coalesce(func.sum(case((condition, 1), else_=0)), 0)


async def _latency_percentiles(
    conn: AsyncConnection, key: Any, latency: Any, conditions: list[Any]
) -> dict[Any, Percentiles]:
    """p50 and p95 of the latencies under each key, by raw key, computed in the database: linear interpolation
    between the closest ranks (numpy's default), rounded to 0.1 ms. Keys without any latency are left out."""
    if conn.dialect.name == "postgresql":
        return await _percentiles_postgresql(conn, key, latency, conditions)
    return await _percentiles_ranked(conn, key, latency, conditions)


async def _percentiles_postgresql(
    conn: AsyncConnection, key: Any, latency: Any, conditions: list[Any]
) -> dict[Any, Percentiles]:
    """percentile_cont: the same interpolation, in one aggregate row per key."""
    query = (
        select(key.label("key"), *(func.percentile_cont(f).within_group(latency) for f in _FRACTIONS))
        .where(*conditions, latency.is_not(None))
        .group_by(key)
    )
    return {raw: (round(p50, 1), round(p95, 1)) for raw, p50, p95 in await conn.execute(query)}


async def _percentiles_ranked(
    conn: AsyncConnection, key: Any, latency: Any, conditions: list[Any]
) -> dict[Any, Percentiles]:
    """Where the database has no percentile function (SQLite): each latency's rank in its key by window functions,
    and only the rows at the ranks the interpolation needs (two per fraction at most); interpolated here."""
    ranked = (
        select(
            key.label("key"),
            latency.label("latency"),
            func.row_number().over(partition_by=key, order_by=latency).label("rank"),
            func.count().over(partition_by=key).label("size"),
        )
        .where(*conditions, latency.is_not(None))
        .subquery()
    )
    r = ranked.c
    # rank (from 1) is the closest below or above the position (from 0): position < rank <= position + 2; the
    # fractions are bound as doubles, so the database computes the very position _interpolate does
    near = [and_(r.rank > (r.size - 1) * f, r.rank <= (r.size - 1) * f + 2) for f in _FRACTIONS]
    found: dict[Any, tuple[int, dict[int, float]]] = {}
    for raw, size, rank, value in await conn.execute(select(r.key, r.size, r.rank, r.latency).where(or_(*near))):
        found.setdefault(raw, (int(size), {}))[1][int(rank)] = float(value)
    return {
        raw: (_interpolate(ranks, size, _FRACTIONS[0]), _interpolate(ranks, size, _FRACTIONS[1]))
        for raw, (size, ranks) in found.items()
    }


def _interpolate(ranks: dict[int, float], size: int, fraction: float) -> float:
    """The value at `fraction` of `size` ordered values, between the two closest ranks (`ranks`: from 1)."""
    position = (size - 1) * fraction
    low = int(position)
    below, above = ranks[low + 1], ranks[min(low + 1, size - 1) + 1]
    return round(below + (above - below) * (position - low), 1)


async def _requests_served(conn: AsyncConnection, table: Table, conditions: list[Any]) -> int:
    """The distinct requests of the calls: one served by several of the named LLMs counts once in the totals."""
    query = select(func.count(func.distinct(table.c.request_id))).where(*conditions)
    return int((await conn.execute(query)).scalar() or 0)


async def usage_report(
    engine: AsyncEngine,
    *,
    start_ms: int,
    end_ms: int,
    model: str | None,
    llm: str | None,
    group_by: GroupBy | None,
    caller: str | None = None,
    key_id: str | None = None,
) -> dict[str, Any]:
    """Totals and groups over [start, end). Per request, unless an LLM is named (filter or grouping): then per
    upstream call of those LLMs, with `requests` counting the distinct requests they served. With `caller`, only
    that caller's requests (and their calls); with `key_id`, only that API key's."""
    per_call = llm is not None or group_by == "llm"
    table = calls_table if per_call else requests_table
    c = table.c
    key = _key(table, group_by)
    conditions = [c.created_ms >= start_ms, c.created_ms < end_ms]
    if model is not None:
        conditions.append(c.mom_model == model)
    if llm is not None:
        conditions.append(c.llm == llm)
    r = requests_table.c
    owned = [r.caller == caller] if caller is not None else []
    if key_id is not None:
        owned.append(r.key_id == key_id)
    for mine in owned:  # a call is its request's
        conditions.append(mine if not per_call else c.request_id.in_(select(r.id).where(mine)))
    async with engine.connect() as conn:
        rows = (await conn.execute(_aggregate(table, key, conditions, per_call))).all()
        latencies = await _latency_percentiles(conn, key, c.latency_ms, conditions)
        overall = (
            latencies
            if group_by is None
            else await _latency_percentiles(conn, literal("all"), c.latency_ms, conditions)
        )
        served = await _requests_served(conn, table, conditions) if per_call else None
    groups = {_group_key(group_by, row[0]): (_Group(*(int(v) for v in row[1:])), row[0]) for row in rows}
    totals = _Group()
    for group, _ in groups.values():
        for field in _Group.__slots__:
            setattr(totals, field, getattr(totals, field) + getattr(group, field))
    if served is not None:
        totals.requests = served
    return {
        "totals": totals.as_dict(overall.get("all", _NO_LATENCY)),
        "groups": [
            {"key": name, **group.as_dict(latencies.get(raw, _NO_LATENCY))}
            for name, (group, raw) in sorted(groups.items())
        ]
        if group_by is not None
        else [],
    }
