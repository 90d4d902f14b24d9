"""Usage records: the tables, numbered migrations, the queued writer, and the queries behind the usage API.

The only module that speaks SQL. SQLite (WAL mode) by default, PostgreSQL by URL; several replicas may share one
PostgreSQL database: migrations take an advisory lock, and inserts are idempotent (our own UUID keys).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
import uuid
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import anyio
from sqlalchemy import (
    BigInteger,
    Boolean,
    Column,
    Connection,
    Float,
    Integer,
    MetaData,
    String,
    Table,
    and_,
    case,
    event,
    false,
    func,
    inspect,
    literal,
    or_,
    select,
    text,
)
from sqlalchemy.dialects import postgresql, sqlite
from sqlalchemy.engine import make_url
from sqlalchemy.ext.asyncio import AsyncConnection, AsyncEngine, create_async_engine

from mom_service.cost_calculation import from_pico, to_pico, usd
from mom_service.events import CallReport, RequestOutcome

logger = logging.getLogger("mom_service")

metadata = MetaData()

requests_table = Table(
    "mom_requests",
    metadata,
    Column("id", String(36), primary_key=True),
    Column("created_ms", BigInteger, nullable=False, index=True),
    Column("mom_model", String(128), nullable=False, index=True),
    Column("stream", Boolean, nullable=False),
    Column("status", String(16), nullable=False),  # ok | error | cancelled
    Column("error_type", String(64)),
    Column("prompt_tokens", Integer, nullable=False),
    Column("completion_tokens", Integer, nullable=False),
    Column("reasoning_tokens", Integer, nullable=False),
    Column("cached_tokens", Integer, nullable=False),
    Column("cost_pico", BigInteger),  # USD * 1e12; null when no call's price is known
    Column("latency_ms", Float, nullable=False),
    Column("ttft_ms", Float),
    Column("cache_hit", Boolean, nullable=False),
    Column("members_asked", Integer, nullable=False),
    Column("members_ok", Integer, nullable=False),
    Column("cost_saved_pico", BigInteger),  # what the cache saved (answers or members' answers); migration 2
    # any call's usage counted by us (none reported, or the call was cut off); migration 3
    Column("usage_estimated", Boolean, nullable=False, server_default=false()),
)

calls_table = Table(
    "mom_calls",
    metadata,
    Column("id", String(36), primary_key=True),
    Column("request_id", String(36), nullable=False, index=True),
    Column("created_ms", BigInteger, nullable=False, index=True),
    Column("mom_model", String(128), nullable=False),
    Column("llm", String(128), nullable=False, index=True),
    Column("model", String(256), nullable=False),
    Column("role", String(16), nullable=False),  # member | concluding
    Column("status", String(16), nullable=False),  # ok | error | cancelled
    Column("error_type", String(32)),  # timeout, rate_limited, http_error, connection, cancelled, ...
    Column("error", String(300)),  # the (redacted) message
    Column("prompt_tokens", Integer, nullable=False),
    Column("completion_tokens", Integer, nullable=False),
    Column("reasoning_tokens", Integer, nullable=False),
    Column("cached_tokens", Integer, nullable=False),
    Column("usage_estimated", Boolean, nullable=False),
    Column("cost_pico", BigInteger),
    Column("latency_ms", Float),
    Column("ttft_ms", Float),
    Column("cached", Boolean, nullable=False),
)

versions_table = Table(
    "mom_schema_version",
    metadata,
    Column("version", Integer, primary_key=True),
    Column("applied_ms", BigInteger, nullable=False),
)


# ---------------------------------------------------------------------------------------------- migrations


async def _migration_1(conn: AsyncConnection) -> None:
    """The first schema: requests and calls (created as declared now; the later migrations add what is missing)."""
    await conn.run_sync(lambda sync: metadata.create_all(sync, tables=[requests_table, calls_table]))


async def _migration_2(conn: AsyncConnection) -> None:
    """mom_requests.cost_saved_pico: the cost the response cache saved."""

    def add(sync: Connection) -> None:
        if "cost_saved_pico" not in {c["name"] for c in inspect(sync).get_columns("mom_requests")}:
            sync.execute(text("ALTER TABLE mom_requests ADD COLUMN cost_saved_pico BIGINT"))

    await conn.run_sync(add)


async def _migration_3(conn: AsyncConnection) -> None:
    """mom_requests.usage_estimated: true when any call of the request has usage counted by us (false before)."""

    def add(sync: Connection) -> None:
        if "usage_estimated" not in {c["name"] for c in inspect(sync).get_columns("mom_requests")}:
            sync.execute(text("ALTER TABLE mom_requests ADD COLUMN usage_estimated BOOLEAN NOT NULL DEFAULT false"))

    await conn.run_sync(add)


# Numbered, applied in order, each once; never edit one that has shipped: add the next.
MIGRATIONS: Sequence[Callable[[AsyncConnection], Any]] = (_migration_1, _migration_2, _migration_3)
SCHEMA_VERSION = len(MIGRATIONS)
_PG_MIGRATION_LOCK = 0x4D6F4D5F  # "MoM_": replicas starting together migrate one at a time


async def migrate(engine: AsyncEngine) -> int:
    """Create or upgrade the schema to SCHEMA_VERSION; returns the version found before."""
    async with engine.begin() as conn:
        if engine.dialect.name == "postgresql":
            await conn.execute(text("SELECT pg_advisory_xact_lock(:key)"), {"key": _PG_MIGRATION_LOCK})
        await conn.run_sync(lambda sync: versions_table.create(sync, checkfirst=True))
        current = (await conn.execute(select(func.max(versions_table.c.version)))).scalar() or 0
        for number in range(current + 1, SCHEMA_VERSION + 1):
            await MIGRATIONS[number - 1](conn)
            await conn.execute(versions_table.insert().values(version=number, applied_ms=_now_ms()))
            logger.info("usage database: applied migration %d", number)
        return int(current)


def _now_ms() -> int:
    return int(time.time() * 1000)


def create_engine(url: str) -> AsyncEngine:
    """An async engine for the URL; SQLite gets its folder created, WAL mode and a busy timeout."""
    parsed = make_url(url)
    if parsed.get_backend_name() == "sqlite":
        database = parsed.database
        if database and database != ":memory:":
            Path(database).parent.mkdir(parents=True, exist_ok=True)
        engine = create_async_engine(url, connect_args={"timeout": 30})

        @event.listens_for(engine.sync_engine, "connect")
        def _sqlite_pragmas(dbapi_connection: Any, _record: Any) -> None:
            cursor = dbapi_connection.cursor()
            cursor.execute("PRAGMA journal_mode=WAL")
            cursor.execute("PRAGMA synchronous=NORMAL")
            cursor.execute("PRAGMA busy_timeout=30000")
            cursor.close()

        return engine
    return create_async_engine(url, pool_pre_ping=True, pool_size=5, max_overflow=5)


async def ping(engine: AsyncEngine) -> None:
    async with engine.connect() as conn:
        await conn.execute(select(literal(1)))


# ------------------------------------------------------------------------------------------------- records


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
    }
    return request, calls


Batch = tuple[dict[str, Any], list[dict[str, Any]]]


class UsageWriter:
    """A bounded queue and one background task that commits records in batches.

    `submit` never waits: a full queue drops the record, counts it and logs it. A flush that fails or is
    cancelled keeps its rows and tries again; `close` drains everything before the process exits.
    """

    def __init__(self, engine: AsyncEngine, *, max_queue: int = 10_000, batch_size: int = 500) -> None:
        self.engine = engine
        self.batch_size = batch_size
        self.queue: asyncio.Queue[Batch] = asyncio.Queue(max_queue)
        self.dropped = 0
        self.written = 0
        self.schema_ready = False  # set once migrations ran; until then each flush tries them first
        self._pending: list[Batch] = []
        self._task: asyncio.Task[None] | None = None
        self._insert = postgresql.insert if engine.dialect.name == "postgresql" else sqlite.insert

    def submit(self, outcome: RequestOutcome) -> None:
        try:
            self.queue.put_nowait(rows_for(outcome))
        except asyncio.QueueFull:
            self.dropped += 1
            if self.dropped == 1 or self.dropped % 100 == 0:
                logger.error(
                    "usage queue full (%d records waiting): record of request %s dropped (%d dropped so far)",
                    self.queue.qsize(),
                    outcome.request_id,
                    self.dropped,
                )

    @property
    def depth(self) -> int:
        return self.queue.qsize() + len(self._pending)

    def start(self) -> None:
        self._task = asyncio.create_task(self._run(), name="usage-writer")

    async def _run(self) -> None:
        backoff = 0.5
        while True:
            if not self._pending:
                self._pending.append(await self.queue.get())
            self._take_waiting()
            try:
                await self._flush()
                backoff = 0.5
            except asyncio.CancelledError:
                raise
            except Exception as exc:
                logger.error(
                    "usage database write failed (%s); %d records kept, retrying in %.1f s",
                    type(exc).__name__,
                    len(self._pending),
                    backoff,
                )
                await asyncio.sleep(backoff)
                backoff = min(backoff * 2, 30.0)

    def _take_waiting(self) -> None:
        while len(self._pending) < self.batch_size:
            try:
                self._pending.append(self.queue.get_nowait())
            except asyncio.QueueEmpty:
                return

    async def _flush(self) -> None:
        """Commit the pending batch in one transaction; on any failure the rows stay pending."""
        batch = self._pending[: self.batch_size]
        if not batch:
            return
        if not self.schema_ready:
            await migrate(self.engine)
            self.schema_ready = True
            logger.info("usage database answers again: schema version %d", SCHEMA_VERSION)
        requests = [request for request, _ in batch]
        calls = [call for _, rows in batch for call in rows]
        async with self.engine.begin() as conn:
            await conn.execute(self._insert(requests_table).on_conflict_do_nothing(), requests)
            if calls:
                await conn.execute(self._insert(calls_table).on_conflict_do_nothing(), calls)
        del self._pending[: len(batch)]
        self.written += len(batch)

    async def close(self, drain_seconds: float = 15.0) -> None:
        """Stop the background task, then write every record still queued or pending."""
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
            self._task = None
        with anyio.CancelScope(shield=True), anyio.move_on_after(drain_seconds) as scope:
            while self._pending or not self.queue.empty():
                self._take_waiting()
                try:
                    await self._flush()
                except Exception as exc:
                    logger.error("usage database write failed at shutdown (%s); retrying", type(exc).__name__)
                    await asyncio.sleep(0.5)
        if scope.cancelled_caught:
            logger.error("usage records not written at shutdown: %d (the database did not answer)", self.depth)


# --------------------------------------------------------------------------------------------------- queries

GroupBy = Literal["model", "llm", "day", "hour"]
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
) -> dict[str, Any]:
    """Totals and groups over [start, end). Per request, unless an LLM is named (filter or grouping): then per
    upstream call of those LLMs, with `requests` counting the distinct requests they served."""
    per_call = llm is not None or group_by == "llm"
    table = calls_table if per_call else requests_table
    c = table.c
    key = _key(table, group_by)
    conditions = [c.created_ms >= start_ms, c.created_ms < end_ms]
    if model is not None:
        conditions.append(c.mom_model == model)
    if llm is not None:
        conditions.append(c.llm == llm)
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
