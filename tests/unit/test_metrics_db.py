"""Usage records on real SQLite files: migrations, rows of a request, the queued writer, the usage report."""

from __future__ import annotations

import asyncio
import calendar
import logging
import time
import uuid
from collections.abc import AsyncIterator
from decimal import Decimal
from pathlib import Path
from typing import Any

import pytest
from sqlalchemy import Table, func, inspect, select, text
from sqlalchemy.ext.asyncio import AsyncEngine

from mom_service.engine.events import Breakdown, CallReport, RequestOutcome, Usage
from mom_service.usage.money import to_pico
from mom_service.usage.records import rows_for
from mom_service.usage.report import usage_report
from mom_service.usage.schema import SCHEMA_VERSION, calls_table, create_engine, migrate, requests_table, versions_table
from mom_service.usage.writer import UsageWriter

# ------------------------------------------------------------------------------------------------- helpers


def utc(stamp: str) -> int:
    """Unix seconds of a UTC time written as YYYY-MM-DDTHH:MM:SS."""
    return calendar.timegm(time.strptime(stamp, "%Y-%m-%dT%H:%M:%S"))


def call(
    name: str,
    *,
    status: str = "ok",
    usage: Usage | None = None,
    cost: Decimal | None = None,
    latency_ms: float | None = 10.0,
    role: str = "member",
    error: str | None = None,
    **extra: Any,
) -> CallReport:
    return CallReport(
        name=name,
        model=f"openai/{name}-model",
        status=status,  # type: ignore[arg-type]
        usage=usage,
        cost=cost,
        latency_ms=latency_ms,
        role=role,  # type: ignore[arg-type]
        error=error,
        **extra,
    )


def outcome(
    request_id: str,
    members: list[CallReport],
    concluding: CallReport,
    *,
    mom_model: str = "mom",
    started_at: float = 1_700_000_000.0,
    status: str = "ok",
    error_code: str | None = None,
    latency_ms: float = 100.0,
    cache: str = "miss",
) -> RequestOutcome:
    return RequestOutcome(
        request_id=request_id,
        mom_model=mom_model,
        stream=False,
        status=status,  # type: ignore[arg-type]
        error_code=error_code,
        started_at=started_at,
        latency_ms=latency_ms,
        ttft_ms=None,
        breakdown=Breakdown(members=members, concluding=concluding, cache=cache),  # type: ignore[arg-type]
    )


def simple(request_id: str, **kwargs: Any) -> RequestOutcome:
    """A request with one priced member and a priced concluding call: two call rows."""
    return outcome(
        request_id,
        [call("alpha", usage=Usage(3, 2), cost=Decimal("0.000001"))],
        call("judge", usage=Usage(5, 4), cost=Decimal("0.000002"), role="concluding"),
        **kwargs,
    )


async def count(engine: AsyncEngine, table: Any) -> int:
    async with engine.connect() as conn:
        return int((await conn.execute(select(func.count()).select_from(table))).scalar_one())


async def request_ids(engine: AsyncEngine) -> list[str]:
    async with engine.connect() as conn:
        return sorted((await conn.execute(select(requests_table.c.id))).scalars())


async def wait_for(condition: Any, timeout: float = 5.0) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, "condition not reached in time"
        await asyncio.sleep(0.01)


def sqlite_url(path: Path) -> str:
    return "sqlite+aiosqlite:///" + str(path)


@pytest.fixture
async def bare_engine(tmp_path: Path) -> AsyncIterator[AsyncEngine]:
    """An engine on a new SQLite file, no tables yet."""
    engine = create_engine(sqlite_url(tmp_path / "data" / "usage.db"))
    yield engine
    await engine.dispose()


@pytest.fixture
async def engine(bare_engine: AsyncEngine) -> AsyncEngine:
    await migrate(bare_engine)
    return bare_engine


def errors(log: pytest.LogCaptureFixture) -> list[str]:
    return [r.getMessage() for r in log.records if r.levelno >= logging.ERROR]


# ------------------------------------------------------------------------------------------------ migrations


async def table_names(engine: AsyncEngine) -> set[str]:
    async with engine.connect() as conn:
        return set(await conn.run_sync(lambda sync: inspect(sync).get_table_names()))


async def test_migrate_creates_the_tables(bare_engine: AsyncEngine, tmp_path: Path) -> None:
    assert (tmp_path / "data").is_dir()  # create_engine made the folder
    assert await migrate(bare_engine) == 0
    assert {"mom_requests", "mom_calls", "mom_schema_version", "mom_audit"} <= await table_names(bare_engine)
    async with bare_engine.connect() as conn:
        versions = (await conn.execute(select(versions_table.c.version))).scalars().all()
    assert list(versions) == list(range(1, SCHEMA_VERSION + 1))


async def test_migrate_is_idempotent(bare_engine: AsyncEngine) -> None:
    assert await migrate(bare_engine) == 0
    tables = await table_names(bare_engine)
    writer = UsageWriter(bare_engine)
    writer.submit(simple("r1"))
    await writer.close()
    assert await migrate(bare_engine) == SCHEMA_VERSION == 8
    assert await migrate(bare_engine) == 8
    assert await table_names(bare_engine) == tables
    assert await count(bare_engine, versions_table) == 8
    assert await count(bare_engine, requests_table) == 1  # data survives a second migration
    assert await count(bare_engine, calls_table) == 2


async def test_migration_2_adds_cost_saved_to_a_version_1_database(bare_engine: AsyncEngine) -> None:
    # a database as version 1 left it: mom_requests without cost_saved_pico, one row in it
    async with bare_engine.begin() as conn:
        await conn.run_sync(lambda sync: versions_table.create(sync))
        await conn.execute(versions_table.insert().values(version=1, applied_ms=0))
        await conn.run_sync(lambda sync: calls_table.create(sync))
        columns = ", ".join(
            f"{c.name} {'BIGINT' if c.name.endswith(('_ms', '_pico')) else 'TEXT'}"
            for c in requests_table.columns
            if c.name not in ("cost_saved_pico", "usage_estimated", "turn", "surface")  # migrations 2 to 5
        )
        await conn.execute(text(f"CREATE TABLE mom_requests ({columns})"))
        await conn.execute(text("INSERT INTO mom_requests (id, created_ms) VALUES ('old', 1)"))
    assert await migrate(bare_engine) == 1
    async with bare_engine.connect() as conn:
        names = await conn.run_sync(lambda sync: {c["name"] for c in inspect(sync).get_columns("mom_requests")})
        rows = (await conn.execute(text("SELECT id, cost_saved_pico FROM mom_requests"))).all()
    assert {"cost_saved_pico", "usage_estimated", "turn", "surface"} <= names
    assert [tuple(r) for r in rows] == [("old", None)]  # the old row is kept, with nothing saved


async def as_version(engine: AsyncEngine, version: int, whole: Table, partial: Table, missing: str, rows: str) -> None:
    """A database as `version` left it: `whole` as declared now, `partial` without its column `missing` (every
    other one TEXT), with `rows` (an INSERT's VALUES) in it."""
    async with engine.begin() as conn:
        await conn.run_sync(lambda sync: versions_table.create(sync))
        for number in range(1, version + 1):
            await conn.execute(versions_table.insert().values(version=number, applied_ms=0))
        await conn.run_sync(lambda sync: whole.create(sync))
        columns = [c.name for c in partial.columns if c.name != missing]
        await conn.execute(text(f"CREATE TABLE {partial.name} ({', '.join(f'{c} TEXT' for c in columns)})"))
        await conn.execute(text(f"INSERT INTO {partial.name} {rows}"))


async def test_migration_7_adds_the_stage_of_each_call(bare_engine: AsyncEngine) -> None:
    # a database as version 6 left it: mom_calls without stage, a member's and a concluding call's rows in it
    await as_version(
        bare_engine, 6, requests_table, calls_table, "stage", "(id, role) VALUES ('m', 'member'), ('c', 'concluding')"
    )
    assert await migrate(bare_engine) == 6
    async with bare_engine.connect() as conn:
        rows = (await conn.execute(text("SELECT id, stage FROM mom_calls ORDER BY id"))).all()
    assert [tuple(r) for r in rows] == [("c", "conclude"), ("m", "answer")]


async def test_migration_8_adds_keys_the_audit_and_each_request_s_key(bare_engine: AsyncEngine) -> None:
    # a database as version 7 left it: mom_requests without key_id, one request in it, no keys nor audit tables
    await as_version(bare_engine, 7, calls_table, requests_table, "key_id", "(id, created_ms) VALUES ('old', 1)")
    assert await migrate(bare_engine) == 7
    async with bare_engine.connect() as conn:
        rows = (await conn.execute(text("SELECT id, key_id FROM mom_requests"))).all()
        indexes = await conn.run_sync(lambda sync: {i["name"] for i in inspect(sync).get_indexes("mom_requests")})
    assert [tuple(r) for r in rows] == [("old", None)]  # made before keys: no key
    assert "ix_mom_requests_key_created" in indexes
    assert {"mom_keys", "mom_audit"} <= await table_names(bare_engine)


async def test_migrate_on_a_new_engine_for_the_same_file(tmp_path: Path) -> None:
    path = tmp_path / "usage.db"
    first = create_engine(sqlite_url(path))
    try:
        assert await migrate(first) == 0
    finally:
        await first.dispose()
    second = create_engine(sqlite_url(path))
    try:
        assert await migrate(second) == SCHEMA_VERSION
    finally:
        await second.dispose()


async def test_sqlite_runs_in_wal_mode(engine: AsyncEngine) -> None:
    async with engine.connect() as conn:
        assert (await conn.execute(text("PRAGMA journal_mode"))).scalar() == "wal"
        assert int((await conn.execute(text("PRAGMA busy_timeout"))).scalar_one()) == 30000


# ---------------------------------------------------------------------------------------------------- rows_for


def panel_outcome(concluding_status: str = "ok") -> RequestOutcome:
    concluding = (
        call("judge", usage=Usage(30, 6, 0, 12), cost=Decimal("0.0000025"), role="concluding", latency_ms=400.0)
        if concluding_status == "ok"
        else call("judge", status="skipped", role="concluding", latency_ms=None, cost=Decimal(0))
    )
    return outcome(
        "req-1",
        [
            call("alpha", usage=Usage(10, 5), cost=Decimal("0.000001"), latency_ms=120.0, ttft_ms=40.0),
            call("beta", usage=Usage(20, 10, 4, 0), cost=None, latency_ms=150.0),  # unpriced
            call("gamma", status="error", error="x" * 500, cost=Decimal(0), latency_ms=50.0),
            call("delta", status="cancelled", usage=Usage(8, 3), cost=Decimal("0.0000000375"), latency_ms=90.0,
                 estimated=True),  # cut off mid-stream
            call("eps", status="cancelled", latency_ms=None, cost=Decimal(0)),  # never started
        ],
        concluding,
        started_at=1_700_000_123.456,
        latency_ms=987.5,
        cache="hit",
    )  # fmt: skip


def test_rows_for_request_row() -> None:
    request, _ = rows_for(panel_outcome())
    assert request["id"] == "req-1"
    assert request["created_ms"] == 1_700_000_123_456
    assert request["mom_model"] == "mom"
    assert request["stream"] is False
    assert request["status"] == "ok"
    assert request["error_type"] is None
    assert request["prompt_tokens"] == 10 + 20 + 8 + 30
    assert request["completion_tokens"] == 5 + 10 + 3 + 6
    assert request["reasoning_tokens"] == 4
    assert request["cached_tokens"] == 12
    # 0.000001 + 0 + 0.0000000375 + 0 + 0.0000025 USD, exactly, in pico-USD
    assert request["cost_pico"] == 3_537_500
    assert request["cost_pico"] == to_pico(Decimal("0.0000035375"))
    assert isinstance(request["cost_pico"], int)
    assert request["latency_ms"] == 987.5
    assert request["cache_hit"] is True
    assert request["members_asked"] == 5
    assert request["members_ok"] == 2
    assert request["usage_estimated"] is True  # delta's usage was counted by us


def test_rows_for_members_asked_leaves_out_members_that_cannot_see_the_images() -> None:
    blind = "skipped: cannot see images"
    members = [
        call("alpha", usage=Usage(10, 5), cost=Decimal(0)),
        call("beta", status="skipped", error=blind, latency_ms=None, cost=Decimal(0)),
        call("gamma", status="skipped", error=blind, latency_ms=None, cost=Decimal(0)),
        call("delta", status="skipped", error="circuit open", error_type="circuit_open", latency_ms=None),
    ]
    item = outcome("r", members, call("judge", usage=Usage(1, 1), cost=Decimal(0), role="concluding"))
    request, calls = rows_for(item)
    assert item.breakdown.asked == 2  # alpha, and delta (its open circuit makes the answer degraded)
    assert (request["members_asked"], request["members_ok"]) == (2, 1)
    assert request["usage_estimated"] is False
    assert [c["llm"] for c in calls] == ["alpha", "judge"]


def test_rows_for_one_row_per_call_that_ran() -> None:
    _, calls = rows_for(panel_outcome())
    assert [c["llm"] for c in calls] == ["alpha", "beta", "gamma", "delta", "judge"]
    assert [c["role"] for c in calls] == ["member"] * 4 + ["concluding"]
    assert [c["status"] for c in calls] == ["ok", "ok", "error", "cancelled", "ok"]
    assert [c["cost_pico"] for c in calls] == [1_000_000, None, 0, 37_500, 2_500_000]
    ids = [c["id"] for c in calls]
    assert len(set(ids)) == len(ids)
    for value in ids:
        assert str(uuid.UUID(value)) == value
    for row in calls:
        assert row["request_id"] == "req-1"
        assert row["created_ms"] == 1_700_000_123_456
        assert row["mom_model"] == "mom"
        assert row["model"] == f"openai/{row['llm']}-model"
    alpha, beta, gamma, delta, judge = calls
    assert (alpha["prompt_tokens"], alpha["completion_tokens"]) == (10, 5)
    assert (alpha["latency_ms"], alpha["ttft_ms"]) == (120.0, 40.0)
    assert beta["reasoning_tokens"] == 4
    assert gamma["prompt_tokens"] == gamma["completion_tokens"] == 0  # no usage reported
    assert gamma["error"] == "x" * 300  # the column holds 300 characters
    assert delta["usage_estimated"] is True
    assert alpha["usage_estimated"] is False
    assert judge["cached_tokens"] == 12


def test_rows_for_skipped_concluding_call_is_not_a_row() -> None:
    request, calls = rows_for(panel_outcome(concluding_status="skipped"))
    assert [c["llm"] for c in calls] == ["alpha", "beta", "gamma", "delta"]
    assert request["cost_pico"] == 1_037_500
    assert request["members_asked"] == 5


def test_rows_for_unpriced_request_has_null_cost() -> None:
    request, calls = rows_for(
        outcome("r", [call("a", usage=Usage(1, 1), cost=None)], call("b", usage=Usage(1, 1), cost=None))
    )
    assert request["cost_pico"] is None
    assert [c["cost_pico"] for c in calls] == [None, None]


def test_rows_for_fresh_call_ids_each_time() -> None:
    first = {c["id"] for c in rows_for(simple("r"))[1]}
    second = {c["id"] for c in rows_for(simple("r"))[1]}
    assert not first & second


# ------------------------------------------------------------------------------------------------- UsageWriter


async def test_writer_close_writes_everything_submitted(engine: AsyncEngine) -> None:
    writer = UsageWriter(engine)
    for i in range(25):
        writer.submit(simple(f"r{i:02d}"))
    assert writer.depth == 25
    writer.start()
    await writer.close()
    assert writer.depth == 0
    assert writer.dropped == 0
    assert await count(engine, requests_table) == 25
    assert await count(engine, calls_table) == 50
    assert await request_ids(engine) == [f"r{i:02d}" for i in range(25)]


async def test_writer_background_task_writes_in_batches(engine: AsyncEngine) -> None:
    writer = UsageWriter(engine, batch_size=4)
    writer.start()
    try:
        for i in range(10):
            writer.submit(simple(f"r{i}"))
        await wait_for(lambda: writer.written == 10)
        assert writer.depth == 0
        assert await count(engine, requests_table) == 10  # committed before close
        assert await count(engine, calls_table) == 20
    finally:
        await writer.close()
    assert await count(engine, requests_table) == 10


async def test_writer_full_queue_drops_and_logs(engine: AsyncEngine, mom_log: pytest.LogCaptureFixture) -> None:
    writer = UsageWriter(engine, max_queue=2)
    for i in range(5):
        writer.submit(simple(f"r{i}"))
    assert writer.dropped == 3
    assert writer.depth == 2
    logged = errors(mom_log)
    assert len(logged) == 1  # the first drop is logged, then every hundredth
    assert "r2" in logged[0]
    assert "dropped" in logged[0]
    writer.start()
    await writer.close()
    assert await request_ids(engine) == ["r0", "r1"]
    assert writer.dropped == 3


async def test_writer_logs_every_hundredth_drop(engine: AsyncEngine, mom_log: pytest.LogCaptureFixture) -> None:
    writer = UsageWriter(engine, max_queue=1)
    for i in range(202):
        writer.submit(simple(f"r{i}"))
    assert writer.dropped == 201
    assert len(errors(mom_log)) == 3  # drops 1, 100 and 200
    await writer.close()


async def test_writer_failed_flush_keeps_rows_then_writes_them(
    bare_engine: AsyncEngine, mom_log: pytest.LogCaptureFixture
) -> None:
    writer = UsageWriter(bare_engine)
    writer.schema_ready = True  # it believes the schema is there, but no tables exist: every flush fails
    for i in range(3):
        writer.submit(simple(f"r{i}"))
    writer.start()
    try:
        await wait_for(lambda: any("write failed" in m for m in errors(mom_log)))
        assert writer.depth == 3  # nothing lost
        assert writer.written == 0
        assert "3 records kept" in next(m for m in errors(mom_log) if "write failed" in m)
        await migrate(bare_engine)
    finally:
        await writer.close()
    assert writer.depth == 0
    assert await request_ids(bare_engine) == ["r0", "r1", "r2"]
    assert await count(bare_engine, calls_table) == 6


async def test_writer_migrates_a_database_that_was_down_at_start(
    bare_engine: AsyncEngine, mom_log: pytest.LogCaptureFixture
) -> None:
    writer = UsageWriter(bare_engine)  # start-up could not migrate: the writer does it before its first flush
    writer.submit(simple("r0"))
    await writer.close()
    assert writer.schema_ready is True
    assert await request_ids(bare_engine) == ["r0"]


async def test_writer_close_lets_a_commit_in_progress_finish(engine: AsyncEngine) -> None:
    """Closing never cuts the background task's commit in the middle (with SQLite, a transaction cut short can
    leave the file locked for the drain after it): that commit ends, then the rest is drained."""
    writer = UsageWriter(engine)
    flush = writer._flush
    entered, release = asyncio.Event(), asyncio.Event()
    outcomes: list[str] = []

    async def slow_flush() -> None:
        try:
            entered.set()
            await release.wait()  # the commit is in progress when close begins
            await flush()
            outcomes.append("committed")
        except asyncio.CancelledError:
            outcomes.append("cut")
            raise

    writer._flush = slow_flush  # type: ignore[method-assign]
    writer.start()
    writer.submit(simple("r0"))
    await entered.wait()
    writer.submit(simple("r1"))  # queued behind the commit in progress
    closing = asyncio.create_task(writer.close())
    await asyncio.sleep(0.05)
    assert not closing.done()  # waiting for the commit, not cutting it
    release.set()
    await closing
    assert outcomes[0] == "committed" and "cut" not in outcomes
    assert await request_ids(engine) == ["r0", "r1"]
    assert writer.depth == 0


async def test_writer_close_gives_up_after_the_drain_deadline(
    bare_engine: AsyncEngine, mom_log: pytest.LogCaptureFixture
) -> None:
    writer = UsageWriter(bare_engine)
    writer.schema_ready = True  # no tables behind it: every flush fails
    writer.submit(simple("r0"))
    writer.submit(simple("r1"))
    started = time.monotonic()
    await writer.close(drain_seconds=0.3)
    assert time.monotonic() - started < 3
    assert writer.depth == 2  # still held, not silently discarded
    assert any("not written at shutdown: 2" in m for m in errors(mom_log))


async def test_same_batch_twice_is_not_duplicated(engine: AsyncEngine) -> None:
    batch = rows_for(panel_outcome())
    writer = UsageWriter(engine)
    writer.queue.put_nowait(batch)
    writer.queue.put_nowait(batch)  # in one transaction
    await writer.close()
    assert await count(engine, requests_table) == 1
    assert await count(engine, calls_table) == 5

    again = UsageWriter(engine)  # a retry of a batch already committed, in a later transaction
    again.queue.put_nowait(batch)
    await again.close()
    assert again.depth == 0
    assert await count(engine, requests_table) == 1
    assert await count(engine, calls_table) == 5


# ------------------------------------------------------------------------------------------------ percentiles

# latencies of one MoM model each -> (p50, p95): linear interpolation between closest ranks (numpy's default)
PERCENTILE_CASES: dict[str, tuple[list[float], tuple[float, float]]] = {
    "one": ([7.0], (7.0, 7.0)),
    "two": ([10.0, 20.0], (15.0, 19.5)),
    "four": ([10.0, 20.0, 30.0, 40.0], (25.0, 38.5)),  # 30 + 0.85 * 10
    "five": ([400.0, 100.0, 1000.0, 300.0, 200.0], (300.0, 880.0)),  # 400 + 0.8 * 600; order does not matter
    "three": ([100.0, 200.0, 1000.0], (200.0, 920.0)),  # 200 + 0.9 * 800
    "ties": ([5.0, 5.0, 5.0, 1.0], (5.0, 5.0)),
    "ten": ([1.0, 2.0, 4.0, 8.0, 16.0, 32.0, 64.0, 128.0, 256.0, 512.0], (24.0, 396.8)),  # 256 + 0.55 * 256
    "fractions": ([0.04, 0.06, 1.25], (0.1, 1.1)),  # 0.06 rounded; 0.06 + 0.9 * 1.19 = 1.131 rounded
}


async def test_report_latency_percentiles_interpolate_between_closest_ranks(engine: AsyncEngine) -> None:
    writer = UsageWriter(engine)
    for name, (latencies, _) in PERCENTILE_CASES.items():
        for i, latency in enumerate(latencies):
            writer.submit(simple(f"{name}-{i}", mom_model=name, started_at=DAY0, latency_ms=latency))
    await writer.close()
    result = await run_report(engine, group_by="model")
    found = {g["key"]: (g["latency_ms_p50"], g["latency_ms_p95"]) for g in result["groups"]}
    assert found == {name: expected for name, (_, expected) in PERCENTILE_CASES.items()}


# ---------------------------------------------------------------------------------------------- usage_report

DAY0 = utc("2024-03-10T00:00:00")
START_MS = DAY0 * 1000
END_MS = (DAY0 + 2 * 86_400) * 1000


def report_outcomes() -> list[RequestOutcome]:
    """Five requests inside [2024-03-10, 2024-03-12) UTC and two just outside it.

    alpha and judge are priced, beta is not.
    """
    return [
        outcome(
            "r0",
            [
                call("alpha", usage=Usage(10, 5), cost=Decimal("0.000001"), latency_ms=11.0),
                call("beta", usage=Usage(20, 10, 4, 0), cost=None, latency_ms=12.0),
            ],
            call("judge", usage=Usage(30, 6, 0, 12), cost=Decimal("0.0000025"), role="concluding", latency_ms=13.0),
            started_at=DAY0,  # exactly the start: included
            latency_ms=100.0,
        ),
        outcome(
            "r1",
            [
                call("alpha", status="error", error="timeout", cost=Decimal(0), latency_ms=21.0),
                call("beta", usage=Usage(20, 10), cost=None, latency_ms=22.0),
            ],
            call("judge", status="error", error="boom", cost=Decimal(0), role="concluding", latency_ms=23.0),
            started_at=utc("2024-03-10T10:15:00"),
            status="error",
            error_code="upstream_error",
            latency_ms=200.0,
        ),
        outcome(
            "r2",
            [call("alpha", usage=Usage(40, 8), cost=Decimal("0.000004"), latency_ms=31.0)],
            call("alpha", usage=Usage(50, 10), cost=Decimal("0.000005"), role="concluding", latency_ms=32.0),
            mom_model="mom-b",
            started_at=utc("2024-03-10T10:45:00"),
            latency_ms=300.0,
        ),
        outcome(
            "r3",
            [
                call("beta", usage=Usage(5, 5), cost=None, latency_ms=41.0),
                call("gamma", status="cancelled", latency_ms=None, cost=None),  # never started: no row
            ],
            call("beta", usage=Usage(7, 3), cost=None, role="concluding", latency_ms=42.0),
            mom_model="mom-c",
            started_at=utc("2024-03-10T11:05:00"),
            latency_ms=400.0,
        ),
        outcome(
            "r4",
            [call("alpha", usage=Usage(1, 1), cost=Decimal("0.0000015"), latency_ms=51.0)],
            call("judge", usage=Usage(2, 2), cost=Decimal("0.000003"), role="concluding", latency_ms=52.0),
            started_at=utc("2024-03-11T00:30:00"),
            latency_ms=1000.0,
        ),
        outcome(
            "before",
            [call("alpha", usage=Usage(1000, 1000), cost=Decimal("1"), latency_ms=1.0)],
            call("judge", usage=Usage(1000, 1000), cost=Decimal("1"), role="concluding", latency_ms=1.0),
            started_at=DAY0 - 1,
            status="error",
            latency_ms=9999.0,
        ),
        outcome(
            "at-end",
            [call("alpha", usage=Usage(1000, 1000), cost=Decimal("1"), latency_ms=1.0)],
            call("judge", usage=Usage(1000, 1000), cost=Decimal("1"), role="concluding", latency_ms=1.0),
            started_at=END_MS / 1000,  # exactly the end: excluded
            status="error",
            latency_ms=9999.0,
        ),
    ]


@pytest.fixture
async def filled(engine: AsyncEngine) -> AsyncEngine:
    writer = UsageWriter(engine)
    for item in report_outcomes():
        writer.submit(item)
    writer.start()
    await writer.close()
    assert await count(engine, requests_table) == 7
    return engine


async def run_report(engine: AsyncEngine, **kwargs: Any) -> dict[str, Any]:
    options: dict[str, Any] = {"start_ms": START_MS, "end_ms": END_MS, "model": None, "llm": None, "group_by": None}
    options.update(kwargs)
    return await usage_report(engine, **options)


def usd_of(value: str) -> float:
    return float(Decimal(value))


async def test_report_totals(filled: AsyncEngine) -> None:
    result = await run_report(filled)
    assert result["groups"] == []
    assert result["totals"] == {
        "requests": 5,
        "errors": 1,
        "prompt_tokens": 60 + 20 + 90 + 12 + 3,
        "completion_tokens": 21 + 10 + 18 + 8 + 3,
        "reasoning_tokens": 4,
        "cached_tokens": 12,
        "usage_estimated": 0,
        # r0 0.0000035 + r1 0 + r2 0.000009 + r3 unpriced + r4 0.0000045
        "cost": usd_of("0.000017"),
        "cost_saved": 0.0,  # nothing came from the cache
        "latency_ms_p50": 300.0,
        "latency_ms_p95": 880.0,  # 400 + 0.8 * (1000 - 400)
    }


async def test_report_time_range_is_half_open(filled: AsyncEngine) -> None:
    wide = await run_report(filled, start_ms=START_MS - 10_000, end_ms=END_MS + 10_000)
    assert wide["totals"]["requests"] == 7
    assert wide["totals"]["errors"] == 3
    only_start = await run_report(filled, end_ms=START_MS + 1)
    assert only_start["totals"]["requests"] == 1
    assert only_start["totals"]["latency_ms_p50"] == 100.0
    only_end = await run_report(filled, start_ms=END_MS, end_ms=END_MS + 1)
    assert only_end["totals"]["requests"] == 1
    assert only_end["totals"]["cost"] == 2.0


async def test_report_empty_range(filled: AsyncEngine) -> None:
    result = await run_report(filled, start_ms=START_MS + 1, end_ms=START_MS + 2, group_by="model")
    assert result["groups"] == []
    assert result["totals"]["requests"] == 0
    assert result["totals"]["errors"] == 0
    assert result["totals"]["prompt_tokens"] == 0
    assert result["totals"]["cost"] is None
    assert result["totals"]["latency_ms_p50"] is None
    assert result["totals"]["latency_ms_p95"] is None


async def test_report_group_by_model(filled: AsyncEngine) -> None:
    result = await run_report(filled, group_by="model")
    groups = {g["key"]: g for g in result["groups"]}
    assert [g["key"] for g in result["groups"]] == ["mom", "mom-b", "mom-c"]
    mom = groups["mom"]
    assert (mom["requests"], mom["errors"]) == (3, 1)
    assert (mom["prompt_tokens"], mom["completion_tokens"]) == (60 + 20 + 3, 21 + 10 + 3)
    assert mom["cost"] == usd_of("0.000008")
    assert (mom["latency_ms_p50"], mom["latency_ms_p95"]) == (200.0, 920.0)
    assert groups["mom-b"]["requests"] == 1
    assert groups["mom-b"]["cost"] == usd_of("0.000009")
    assert groups["mom-b"]["latency_ms_p50"] == 300.0
    assert groups["mom-c"]["requests"] == 1
    assert groups["mom-c"]["cost"] is None  # no priced call
    assert result["totals"]["requests"] == 5
    assert result["totals"]["cost"] == usd_of("0.000017")


async def test_report_model_filter(filled: AsyncEngine) -> None:
    result = await run_report(filled, model="mom-c")
    assert result["totals"]["requests"] == 1
    assert result["totals"]["prompt_tokens"] == 12
    assert result["totals"]["cost"] is None
    mom = await run_report(filled, model="mom", group_by="day")
    assert [(g["key"], g["requests"]) for g in mom["groups"]] == [("2024-03-10", 2), ("2024-03-11", 1)]


async def test_report_group_by_day(filled: AsyncEngine) -> None:
    result = await run_report(filled, group_by="day")
    assert [g["key"] for g in result["groups"]] == ["2024-03-10", "2024-03-11"]
    first, second = result["groups"]
    assert (first["requests"], first["errors"], first["prompt_tokens"]) == (4, 1, 60 + 20 + 90 + 12)
    assert first["cost"] == usd_of("0.0000125")
    # latencies 100, 200, 300, 400: p95 = 300 + 0.85 * 100
    assert (first["latency_ms_p50"], first["latency_ms_p95"]) == (250.0, 385.0)
    assert (second["requests"], second["prompt_tokens"], second["cost"]) == (1, 3, usd_of("0.0000045"))
    assert result["totals"]["requests"] == 5


async def test_report_group_by_hour(filled: AsyncEngine) -> None:
    result = await run_report(filled, group_by="hour")
    assert [(g["key"], g["requests"]) for g in result["groups"]] == [
        ("2024-03-10T00:00:00Z", 1),
        ("2024-03-10T10:00:00Z", 2),
        ("2024-03-10T11:00:00Z", 1),
        ("2024-03-11T00:00:00Z", 1),
    ]
    ten = result["groups"][1]
    assert ten["errors"] == 1
    assert ten["cost"] == usd_of("0.000009")
    assert ten["latency_ms_p50"] == 250.0


async def test_report_llm_filter_counts_distinct_requests(filled: AsyncEngine) -> None:
    result = await run_report(filled, llm="alpha")
    totals = result["totals"]
    # five alpha calls (r2 used alpha twice) in four requests
    assert totals["requests"] == 4
    assert totals["errors"] == 1
    assert totals["prompt_tokens"] == 10 + 0 + 40 + 50 + 1
    assert totals["completion_tokens"] == 5 + 0 + 8 + 10 + 1
    assert totals["cost"] == usd_of("0.0000115")
    assert totals["latency_ms_p50"] == 31.0  # of the calls: 11, 21, 31, 32, 51


async def test_report_llm_filter_unpriced(filled: AsyncEngine) -> None:
    result = await run_report(filled, llm="beta")
    assert result["totals"]["requests"] == 3
    assert result["totals"]["prompt_tokens"] == 20 + 20 + 5 + 7
    assert result["totals"]["reasoning_tokens"] == 4
    assert result["totals"]["cost"] is None


async def test_report_group_by_llm(filled: AsyncEngine) -> None:
    result = await run_report(filled, group_by="llm")
    groups = {g["key"]: g for g in result["groups"]}
    assert [g["key"] for g in result["groups"]] == ["alpha", "beta", "judge"]  # gamma never ran
    assert groups["alpha"]["requests"] == 4
    assert groups["beta"]["requests"] == 3
    assert groups["beta"]["cost"] is None
    judge = groups["judge"]
    assert (judge["requests"], judge["errors"]) == (3, 1)
    assert (judge["prompt_tokens"], judge["cached_tokens"]) == (32, 12)
    assert judge["cost"] == usd_of("0.0000055")
    # a request served by several LLMs counts once in the totals
    assert result["totals"]["requests"] == 5
    assert result["totals"]["errors"] == 2  # the two failed calls of r1
    assert result["totals"]["cost"] == usd_of("0.000017")


async def test_report_llm_filter_with_grouping(filled: AsyncEngine) -> None:
    result = await run_report(filled, llm="alpha", group_by="model")
    assert [(g["key"], g["requests"]) for g in result["groups"]] == [("mom", 3), ("mom-b", 1)]
    assert result["groups"][1]["prompt_tokens"] == 90
    assert result["totals"]["requests"] == 4
