"""The usage report on both databases it runs on, a real SQLite file and the real PostgreSQL: latency percentiles
computed by the database (checked against an independent computation, and without fetching every latency), the
count of records with estimated usage, and migration 3 from a version-2 database."""

from __future__ import annotations

import math
import random
import statistics
import time
from collections import defaultdict
from collections.abc import AsyncIterator, Awaitable, Callable, Iterable
from decimal import Decimal
from pathlib import Path
from typing import Any

import pytest
from sqlalchemy import Connection, event, inspect, select, text
from sqlalchemy.ext.asyncio import AsyncEngine

from mom_service.engine.events import Breakdown, CallReport, RequestOutcome, Usage
from mom_service.usage.records import rows_for
from mom_service.usage.report import usage_report
from mom_service.usage.schema import SCHEMA_VERSION, create_engine, migrate, requests_table, versions_table
from mom_service.usage.writer import UsageWriter

DAY0 = 1_710_028_800  # 2024-03-10T00:00:00Z
START_MS = DAY0 * 1000
END_MS = (DAY0 + 2 * 86_400) * 1000


@pytest.fixture(params=["sqlite", "postgresql"])
def database_url(request: pytest.FixtureRequest, tmp_path: Path) -> str:
    """A new SQLite file, or a fresh database of this test's own on the real PostgreSQL."""
    if request.param == "sqlite":
        return "sqlite+aiosqlite:///" + str(tmp_path / "usage.db")
    url: str = request.getfixturevalue("postgres_url")
    return url


@pytest.fixture
async def engine(database_url: str) -> AsyncIterator[AsyncEngine]:
    engine = create_engine(database_url)
    await migrate(engine)
    yield engine
    await engine.dispose()


async def write(engine: AsyncEngine, outcomes: Iterable[RequestOutcome]) -> None:
    writer = UsageWriter(engine)
    for item in outcomes:
        writer.submit(item)
    await writer.close()
    assert writer.depth == 0 and writer.dropped == 0


def report(engine: AsyncEngine, **kwargs: Any) -> Any:
    options: dict[str, Any] = {"start_ms": START_MS, "end_ms": END_MS, "model": None, "llm": None, "group_by": None}
    return usage_report(engine, **(options | kwargs))


def call(name: str, latency_ms: float | None, *, role: str = "member", **extra: Any) -> CallReport:
    status = extra.pop("status", "ok" if latency_ms is not None else "error")
    return CallReport(
        name=name,
        model=f"openai/{name}",
        status=status,
        latency_ms=latency_ms,
        usage=Usage(10, 5) if status != "error" else None,
        cost=Decimal("0.000001") if status != "error" else Decimal(0),
        role=role,  # type: ignore[arg-type]
        **extra,
    )


def request(
    request_id: str, model: str, started_at: float, latency_ms: float, calls: list[CallReport]
) -> RequestOutcome:
    *members, concluding = calls
    return RequestOutcome(
        request_id=request_id,
        mom_model=model,
        stream=False,
        status="ok",
        error_code=None,
        started_at=started_at,
        latency_ms=latency_ms,
        ttft_ms=None,
        breakdown=Breakdown(members=members, concluding=concluding),
    )


# ------------------------------------------------------------------------------------------------- percentiles


def latency(rng: random.Random) -> float:
    """A latency in ms: mostly fractional, sometimes a round number that other requests share (ties)."""
    return float(rng.choice([100, 250, 1000])) if rng.random() < 0.1 else round(rng.uniform(5, 6000), 3)


def sample() -> list[RequestOutcome]:
    """Requests over two days in many hours; groups of 1, 2 and many; some calls failed with no latency."""
    rng = random.Random(20240310)
    outcomes = []
    for i in range(240):
        model = "mom-c" if i == 7 else "mom-b" if i in (3, 150) else "mom"
        started_at = DAY0 + rng.uniform(0, 2 * 86_400 - 1)
        calls = [call("alpha", latency(rng)), call("beta", None if rng.random() < 0.2 else latency(rng))]
        if i % 3 == 0:
            calls.append(call("gamma", latency(rng)))
        calls.append(call("judge", latency(rng), role="concluding"))
        outcomes.append(request(f"r{i:03d}", model, started_at, latency(rng), calls))
    return outcomes


def reference(values: list[float], fraction: float) -> float | None:
    """Linear interpolation between closest ranks (numpy's default), rounded to 0.1 ms; checked against the
    standard library's inclusive quantiles."""
    if not values:
        return None
    ordered = sorted(values)
    rank = fraction * (len(ordered) - 1)
    below, above = math.floor(rank), math.ceil(rank)
    value = ordered[below] + (ordered[above] - ordered[below]) * (rank - below)
    if len(ordered) > 1:
        cuts = statistics.quantiles(ordered, n=100, method="inclusive")
        assert value == pytest.approx(cuts[round(fraction * 100) - 1], rel=1e-12, abs=1e-9)
    return round(value, 1)


def day(seconds: float) -> str:
    return time.strftime("%Y-%m-%d", time.gmtime(seconds))


def hour(seconds: float) -> str:
    return time.strftime("%Y-%m-%dT%H:00:00Z", time.gmtime(seconds))


# what a report counts, of a request: its latency and the keys it falls under
REQUEST_KEYS: dict[str | None, Callable[[RequestOutcome], str]] = {
    None: lambda o: "all",
    "model": lambda o: o.mom_model,
    "day": lambda o: day(o.started_at),
    "hour": lambda o: hour(o.started_at),
}


def expected_latencies(outcomes: list[RequestOutcome], group_by: str | None, llm: str | None) -> dict[str, list[float]]:
    """The latencies each group of the report counts: the requests', or in a per-call report the calls'."""
    groups: dict[str, list[float]] = defaultdict(list)
    for item in outcomes:
        if llm is None and group_by != "llm":
            groups[REQUEST_KEYS[group_by](item)].append(item.latency_ms)
            continue
        for report_ in item.breakdown.calls:
            if report_.latency_ms is not None and llm in (None, report_.name):
                key = report_.name if group_by == "llm" else REQUEST_KEYS[group_by](item)
                groups[key].append(report_.latency_ms)
    return groups


@pytest.mark.parametrize(
    ("group_by", "llm"),
    [(None, None), ("model", None), ("llm", None), ("day", None), ("hour", None), (None, "beta"), ("day", "gamma")],
)
async def test_latency_percentiles_are_linear_interpolation_between_closest_ranks(
    engine: AsyncEngine, group_by: str | None, llm: str | None
) -> None:
    outcomes = sample()
    await write(engine, outcomes)
    result = await report(engine, group_by=group_by, llm=llm)
    expected = expected_latencies(outcomes, group_by, llm)
    everything = [v for values in expected.values() for v in values]
    assert (result["totals"]["latency_ms_p50"], result["totals"]["latency_ms_p95"]) == (
        reference(everything, 0.50),
        reference(everything, 0.95),
    )
    if group_by is None:
        assert result["groups"] == []
        return
    found = {g["key"]: (g["latency_ms_p50"], g["latency_ms_p95"]) for g in result["groups"]}
    assert found == {key: (reference(v, 0.50), reference(v, 0.95)) for key, v in expected.items()}
    if group_by == "model":  # groups of one and two latencies too
        assert (len(expected["mom-c"]), len(expected["mom-b"])) == (1, 2)


async def test_a_group_without_any_latency_has_none(engine: AsyncEngine) -> None:
    # beta's calls all failed before they had a latency: beta is a group (its errors count), with no percentile
    await write(
        engine, [request("r", "mom", DAY0, 100.0, [call("beta", None), call("judge", 42.0, role="concluding")])]
    )
    groups = {g["key"]: g for g in (await report(engine, group_by="llm"))["groups"]}
    assert (groups["beta"]["errors"], groups["beta"]["latency_ms_p50"], groups["beta"]["latency_ms_p95"]) == (
        1,
        None,
        None,
    )
    assert (groups["judge"]["latency_ms_p50"], groups["judge"]["latency_ms_p95"]) == (42.0, 42.0)


def rows_fetched(engine: AsyncEngine) -> Callable[[], Awaitable[tuple[int, list[str]]]]:
    """Records each statement the engine sends; the returned coroutine function counts the rows they return."""
    statements: list[tuple[str, Any]] = []

    @event.listens_for(engine.sync_engine, "before_cursor_execute")
    def capture(_conn: Connection, _cursor: Any, statement: str, parameters: Any, *_: Any) -> None:
        statements.append((statement, parameters))

    async def count() -> tuple[int, list[str]]:
        event.remove(engine.sync_engine, "before_cursor_execute", capture)
        total = 0
        async with engine.connect() as conn:
            for statement, parameters in statements:
                total += len((await conn.exec_driver_sql(statement, parameters)).all())
        return total, [statement for statement, _ in statements]

    return count


@pytest.mark.parametrize(("group_by", "llm"), [(None, None), ("model", None), ("day", None), ("llm", None)])
async def test_the_report_fetches_a_handful_of_rows_per_group_not_every_latency(
    engine: AsyncEngine, group_by: str | None, llm: str | None
) -> None:
    outcomes = sample()
    await write(engine, outcomes)
    count = rows_fetched(engine)
    result = await report(engine, group_by=group_by, llm=llm)
    fetched, statements = await count()
    groups = max(len(result["groups"]), 1)
    assert result["totals"]["requests"] == len(outcomes) == 240
    # an aggregate row per group, at most four ranks per group and four for the totals, a distinct count
    assert fetched <= 5 * groups + 5, (fetched, statements)


# --------------------------------------------------------------------------------------------- estimated usage


def estimated_sample() -> list[RequestOutcome]:
    """Three requests: one whose member was cut off (usage counted by us), one whose concluding LLM reported no
    usage (counted by us too), and one with every usage reported."""
    cut = call("gamma", 30.0, status="cancelled", estimated=True)
    quiet = call("judge", 20.0, role="concluding", estimated=True)
    return [
        request("cut", "mom", DAY0 + 10, 100.0, [call("alpha", 10.0), cut, call("judge", 20.0, role="concluding")]),
        request("quiet", "mom-b", DAY0 + 20, 100.0, [call("alpha", 10.0), quiet]),
        request("exact", "mom", DAY0 + 30, 100.0, [call("alpha", 10.0), call("judge", 20.0, role="concluding")]),
    ]


async def test_usage_estimated_counts_requests_or_calls(engine: AsyncEngine) -> None:
    await write(engine, estimated_sample())
    async with engine.connect() as conn:
        rows = dict((await conn.execute(select(requests_table.c.id, requests_table.c.usage_estimated))).all())
    assert rows == {"cut": True, "quiet": True, "exact": False}
    result = await report(engine, group_by="model")
    assert result["totals"]["usage_estimated"] == 2
    assert {g["key"]: g["usage_estimated"] for g in result["groups"]} == {"mom": 1, "mom-b": 1}
    by_llm = await report(engine, group_by="llm")
    assert {g["key"]: g["usage_estimated"] for g in by_llm["groups"]} == {"alpha": 0, "gamma": 1, "judge": 1}
    assert by_llm["totals"]["usage_estimated"] == 2  # calls
    assert (await report(engine, llm="judge", group_by="model"))["totals"]["usage_estimated"] == 1
    assert (await report(engine, llm="alpha"))["totals"]["usage_estimated"] == 0


async def test_migrations_3_to_8_add_usage_estimated_turn_surface_overrides_caller_and_keys_to_a_version_2_database(
    engine: AsyncEngine,
) -> None:
    # a database as version 2 left it: mom_requests without usage_estimated, one request in it
    old, _ = rows_for(
        request("old", "mom", DAY0 + 5, 100.0, [call("alpha", 10.0), call("judge", 20.0, role="concluding")])
    )
    old.pop("usage_estimated", None)  # not a column yet
    old.pop("turn", None)  # nor this one (migration 4)
    old.pop("surface", None)  # nor this one (migration 5)
    old.pop("overrides", None)  # nor these (migration 6)
    old.pop("caller", None)
    old.pop("key_id", None)  # nor this one (migration 8)
    async with engine.begin() as conn:
        await conn.execute(text("ALTER TABLE mom_requests DROP COLUMN usage_estimated"))
        await conn.execute(text("ALTER TABLE mom_requests DROP COLUMN turn"))
        await conn.execute(text("ALTER TABLE mom_requests DROP COLUMN surface"))
        await conn.execute(text("DROP INDEX ix_mom_requests_caller"))
        await conn.execute(text("ALTER TABLE mom_requests DROP COLUMN caller"))
        await conn.execute(text("ALTER TABLE mom_requests DROP COLUMN overrides"))
        await conn.execute(text("DROP TABLE mom_responses"))
        await conn.execute(text("DROP INDEX ix_mom_requests_key_created"))
        await conn.execute(text("ALTER TABLE mom_requests DROP COLUMN key_id"))
        await conn.execute(text("DROP TABLE mom_keys"))
        await conn.execute(text("DROP TABLE mom_audit"))
        await conn.execute(versions_table.delete().where(versions_table.c.version > 2))
        await conn.execute(requests_table.insert().values(**old))
    assert await migrate(engine) == 2
    assert await migrate(engine) == SCHEMA_VERSION == 8
    async with engine.connect() as conn:
        columns = await conn.run_sync(lambda sync: {c["name"]: c for c in inspect(sync).get_columns("mom_requests")})
        kept = (
            await conn.execute(
                select(
                    requests_table.c.id,
                    requests_table.c.usage_estimated,
                    requests_table.c.turn,
                    requests_table.c.surface,
                    requests_table.c.overrides,
                    requests_table.c.caller,
                    requests_table.c.key_id,
                )
            )
        ).all()
        tables = await conn.run_sync(lambda sync: set(inspect(sync).get_table_names()))
        indexes = await conn.run_sync(lambda sync: {i["name"] for i in inspect(sync).get_indexes("mom_requests")})
    assert columns["usage_estimated"]["nullable"] is False
    assert columns["turn"]["nullable"] is False
    assert columns["surface"]["nullable"] is False
    assert {"mom_responses", "mom_keys", "mom_audit"} <= tables
    assert "ix_mom_requests_caller" in indexes  # a caller reads its own usage
    assert "ix_mom_requests_key_created" in indexes  # a key's spend in its period
    # the old row is kept, with nothing estimated, counted as the only kind of turn and surface there was, with no
    # overrides, no caller and no key known
    assert [tuple(row) for row in kept] == [("old", False, "ensemble", "chat", None, None, None)]

    await write(engine, estimated_sample())
    result = await report(engine, group_by="model")
    assert (result["totals"]["requests"], result["totals"]["usage_estimated"]) == (4, 2)
    assert {g["key"]: (g["requests"], g["usage_estimated"]) for g in result["groups"]} == {
        "mom": (3, 1),
        "mom-b": (1, 1),
    }
