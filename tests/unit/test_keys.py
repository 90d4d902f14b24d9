"""API keys' pure parts and their database parts on real SQLite files: key shapes, budget periods, the admin API's
validation, the key store and its audit rows, the spend a replica sees, the rate limits in memory (and Redis
unreachable), the per-key metrics' bound."""

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
from prometheus_client.parser import text_string_to_metric_families
from sqlalchemy import select, text
from sqlalchemy.ext.asyncio import AsyncEngine

from mom_service.api.rate_limits import Limits, RateLimits
from mom_service.api.schemas.keys import key_fields, key_json
from mom_service.config import parse_config
from mom_service.engine.events import Breakdown, CallReport, KeyLabel, RequestOutcome, Usage
from mom_service.errors import InvalidRequest, RateLimited
from mom_service.observability.metrics import Metrics
from mom_service.usage.keys import KEY_LENGTH, KeyStore, hash_key, looks_like_key, new_key
from mom_service.usage.money import to_pico
from mom_service.usage.schema import audit_table, create_engine, migrate, requests_table
from mom_service.usage.spend import NEAR_BUDGET, SpendTracker, SpendUnavailable, period_bounds
from mom_service.usage.writer import UsageWriter
from tests.conftest import free_port

CONFIG = parse_config(
    {
        "llm_definitions": [{"name": n, "model": f"openai/{n}"} for n in ("one", "two")],
        "models": [
            {"name": "alpha", "llms_to_query": ["one"], "concluding_llm": "two"},
            {"name": "beta", "llms_to_query": ["two"], "concluding_llm": "one"},
        ],
    },
    "<test>",
)
ADMIN = "admin:0123456789abcdef"


def utc_ms(stamp: str) -> int:
    return calendar.timegm(time.strptime(stamp, "%Y-%m-%dT%H:%M:%S")) * 1000


@pytest.fixture
async def engine(tmp_path: Path) -> AsyncIterator[AsyncEngine]:
    engine = create_engine("sqlite+aiosqlite:///" + str(tmp_path / "usage.db"))
    await migrate(engine)
    yield engine
    await engine.dispose()


# ---------------------------------------------------------------------------------------- shapes, periods


def test_a_key_is_recognizable_random_and_stored_only_as_a_hash() -> None:
    keys = {new_key() for _ in range(50)}
    assert len(keys) == 50
    for key in keys:
        assert key.startswith("mom-") and len(key) == KEY_LENGTH and looks_like_key(key.encode())
        assert len(hash_key(key.encode())) == 64 and key not in hash_key(key.encode())
    assert hash_key(b"mom-x") == hash_key(b"mom-x") != hash_key(b"mom-y")
    for token in (b"test-token-123456", b"mom-short", b"sk-" + b"x" * 44, next(iter(keys)).encode()[:-1]):
        assert not looks_like_key(token)


@pytest.mark.parametrize(
    ("period", "now", "start", "end"),
    [
        ("day", "2024-02-29T13:05:00", "2024-02-29T00:00:00", "2024-03-01T00:00:00"),
        ("day", "2024-12-31T23:59:59", "2024-12-31T00:00:00", "2025-01-01T00:00:00"),
        ("month", "2024-02-10T08:00:00", "2024-02-01T00:00:00", "2024-03-01T00:00:00"),
        ("month", "2023-02-28T23:00:00", "2023-02-01T00:00:00", "2023-03-01T00:00:00"),
        ("month", "2024-12-31T23:59:59", "2024-12-01T00:00:00", "2025-01-01T00:00:00"),
    ],
)
def test_budget_periods_are_the_utc_day_and_calendar_month(period: Any, now: str, start: str, end: str) -> None:
    assert period_bounds(period, utc_ms(now) / 1000) == (utc_ms(start), utc_ms(end))


# ------------------------------------------------------------------------------------ the admin API's fields


def refused(body: Any, *, new: bool = True) -> InvalidRequest:
    with pytest.raises(InvalidRequest) as raised:
        key_fields(body, CONFIG, new=new)
    assert raised.value.status_code == 400
    return raised.value


def test_key_fields_are_checked_before_anything_is_written() -> None:
    future = time.time() + 3600
    fields = key_fields(
        {"name": "team", "models": ["beta", "alpha", "beta"], "budget_usd": 2.5, "expires_at": future}, CONFIG, new=True
    )
    assert fields == {
        "name": "team",
        "models": ("beta", "alpha"),
        "budget_usd": Decimal("2.5"),
        "budget_period": "month",  # a budget without a period: per month
        "expires_ms": int(future * 1000),
    }
    assert key_fields({"owner": None, "budget_usd": None}, CONFIG, new=False) == {"owner": None, "budget_usd": None}
    assert key_fields({}, CONFIG, new=False) == {}

    assert refused({"owner": "x"}).code == "missing_required_parameter"
    assert refused({"name": None}, new=False).param == "name"
    assert refused({"disabled": None}, new=False).param == "disabled"
    unknown = refused({"name": "t", "models": ["alpha", "gamma"]})
    assert unknown.param == "models" and "'gamma'" in unknown.message
    assert refused({"name": "t", "key": "mom-mine"}).param == "key"  # a key is never chosen by the caller
    assert refused({"name": "t", "expires_at": "2001-01-01T00:00:00Z"}).param == "expires_at"
    assert refused({"name": "t", "expires_at": "soon"}).param == "expires_at"
    assert refused({"name": "t", "budget_usd": 0}).param == "budget_usd"
    assert refused({"name": "t", "budget_period": "week"}).param == "budget_period"
    assert refused({"name": "t", "rpm_limit": -1}).param == "rpm_limit"
    assert refused(["name"]).code == "invalid_request_body"


# ---------------------------------------------------------------------------------------------- the store


async def audit_rows(engine: AsyncEngine) -> list[dict[str, Any]]:
    async with engine.connect() as conn:
        rows = await conn.execute(select(audit_table).order_by(audit_table.c.created_ms, audit_table.c.action))
        return [dict(row) for row in rows.mappings()]


async def test_the_store_keeps_records_and_their_audit_never_the_key(engine: AsyncEngine) -> None:
    store = KeyStore(engine)
    record, secret = await store.create(key_fields({"name": "team-a", "owner": "ops"}, CONFIG, new=True), ADMIN)
    assert record.prefix == secret[:12] and record.id.startswith("key_")
    assert await store.by_hash(hash_key(secret.encode())) == record == await store.get(record.id)
    assert await store.by_hash(hash_key(new_key().encode())) is None

    changed = await store.update(record.id, {"budget_usd": Decimal("3"), "budget_period": "day"}, ADMIN)
    assert changed is not None and changed.budget_usd == Decimal(3) and changed.period == "day"
    disabled = await store.update(record.id, {"disabled": True}, "cli:someone")
    assert disabled is not None and disabled.disabled
    assert await store.update("key_nothing", {"disabled": True}, ADMIN) is None
    assert await store.delete(record.id, ADMIN)
    assert not await store.delete(record.id, ADMIN)
    assert await store.get(record.id) is None and await store.by_hash(hash_key(secret.encode())) is None
    assert await store.all() == []
    assert await store.names([record.id]) == {record.id: "team-a"}  # a deleted key still names its records

    rows = await audit_rows(engine)
    assert [(r["actor"], r["action"], r["target"]) for r in rows] == [
        (ADMIN, "key.create", record.id),
        (ADMIN, "key.update", record.id),
        ("cli:someone", "key.disable", record.id),
        (ADMIN, "key.delete", record.id),
    ]
    assert '"budget_usd":"3"' in rows[1]["details"]
    async with engine.connect() as conn:  # nowhere in the database: neither the key nor anything but its prefix
        dumped = [
            str(tuple(row))
            for table in ("mom_keys", "mom_audit")
            for row in await conn.execute(text(f"SELECT * FROM {table}"))
        ]
    assert dumped and not any(secret in row or secret[12:] in row for row in dumped)
    assert "key" not in key_json(record) and secret not in str(key_json(record))


# ---------------------------------------------------------------------------------------------- the spend


def keyed_outcome(request_id: str, key_id: str, cost: str, name: str = "team") -> RequestOutcome:
    judge = CallReport(name="two", model="openai/two", role="concluding", usage=Usage(5, 5), cost=Decimal(cost))
    return RequestOutcome(
        request_id=request_id,
        mom_model="alpha",
        stream=False,
        status="ok",
        error_code=None,
        started_at=time.time(),
        latency_ms=10.0,
        ttft_ms=None,
        breakdown=Breakdown(members=[], concluding=judge),
        key=KeyLabel(key_id, name),
    )


async def another_replicas_record(engine: AsyncEngine, key_id: str, cost: str) -> None:
    """A request another replica recorded (straight into the table)."""
    row = {
        "id": str(uuid.uuid4()),
        "created_ms": int(time.time() * 1000),
        "mom_model": "alpha",
        "stream": False,
        "status": "ok",
        "prompt_tokens": 1,
        "completion_tokens": 1,
        "reasoning_tokens": 0,
        "cached_tokens": 0,
        "cost_pico": to_pico(Decimal(cost)),
        "latency_ms": 1.0,
        "cache_hit": False,
        "members_asked": 1,
        "members_ok": 1,
        "key_id": key_id,
    }
    async with engine.begin() as conn:
        await conn.execute(requests_table.insert().values(**row))


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


async def test_a_replica_counts_its_own_requests_at_once_and_each_once(engine: AsyncEngine) -> None:
    writer = UsageWriter(engine)
    spend = SpendTracker(engine, writer, ttl_s=60.0)
    start_ms = period_bounds("day", time.time())[0]
    budget, worst = Decimal(100), Decimal("0.5")
    assert await spend.spent("key_a", start_ms, budget, worst) == 0

    spend.reserve("key_a", "r1", worst)  # in flight: its worst case counts
    assert await spend.spent("key_a", start_ms, budget, worst) == Decimal("0.5")
    assert await spend.spent("key_b", start_ms, budget, worst) == 0  # another key's spend is its own
    writer.submit(keyed_outcome("r1", "key_a", "0.125"))
    spend.settle("r1", Decimal("0.125"))  # ended, its record queued: its cost counts
    assert await spend.spent("key_a", start_ms, budget, worst) == Decimal("0.125")

    writer.start()
    try:
        deadline = time.monotonic() + 5
        while writer.written < 1:
            assert time.monotonic() < deadline
            await asyncio.sleep(0.01)
    finally:
        await writer.close()
    # written: read from the database, no longer counted here too
    fresh = SpendTracker(engine, writer, ttl_s=60.0)
    assert await fresh.spent("key_a", start_ms, budget, worst) == Decimal("0.125")
    spend._sums.clear()
    assert await spend.spent("key_a", start_ms, budget, worst) == Decimal("0.125")


async def test_a_reservation_released_counts_nothing_until_its_outcome_comes(engine: AsyncEngine) -> None:
    writer = UsageWriter(engine)
    spend = SpendTracker(engine, writer, ttl_s=60.0)
    start_ms = period_bounds("day", time.time())[0]
    budget, worst = Decimal(100), Decimal(2)
    spend.reserve("key_a", "never-ran", worst)
    spend.reserve("key_a", "ran", worst)
    spend.release("never-ran")  # its run never started: no outcome will come
    spend.release("ran")  # the client left: its outcome is still to come
    assert await spend.spent("key_a", start_ms, budget, worst) == 0
    writer.submit(keyed_outcome("ran", "key_a", "0.75"))
    spend.settle("ran", Decimal("0.75"))
    spend.release("ran")  # settled: a release changes nothing
    assert await spend.spent("key_a", start_ms, budget, worst) == Decimal("0.75")


async def test_the_cached_sum_is_read_again_near_the_budget_or_once_stale(engine: AsyncEngine) -> None:
    clock = Clock()
    spend = SpendTracker(engine, UsageWriter(engine), ttl_s=1.0, monotonic=clock)
    start_ms = period_bounds("month", time.time())[0]
    worst = Decimal(1)
    assert await spend.spent("key_a", start_ms, Decimal(100), worst) == 0
    await another_replicas_record(engine, "key_a", "50")
    # far from the budget and fresh: the cached sum
    assert await spend.spent("key_a", start_ms, Decimal(100), worst) == 0
    # near it (fewer than NEAR_BUDGET such requests left): read for this request
    near = Decimal(NEAR_BUDGET)
    assert await spend.spent("key_a", start_ms, near, worst) == Decimal(50)
    await another_replicas_record(engine, "key_a", "25")
    assert await spend.spent("key_a", start_ms, Decimal(1000), worst) == Decimal(50)
    clock.now += 1.0  # stale
    assert await spend.spent("key_a", start_ms, Decimal(1000), worst) == Decimal(75)


async def test_without_the_database_the_last_sum_read_is_used(
    engine: AsyncEngine, mom_log: pytest.LogCaptureFixture
) -> None:
    clock = Clock()
    spend = SpendTracker(engine, UsageWriter(engine), ttl_s=1.0, monotonic=clock)
    start_ms = period_bounds("month", time.time())[0]
    await another_replicas_record(engine, "key_a", "3")
    assert await spend.spent("key_a", start_ms, Decimal(100), Decimal(1)) == Decimal(3)
    async with engine.begin() as conn:
        await conn.execute(text("DROP TABLE mom_requests"))  # every query fails from now on
    clock.now += 5
    spend.reserve("key_a", "r1", Decimal(1))
    assert await spend.spent("key_a", start_ms, Decimal(100), Decimal(1)) == Decimal(4)
    with pytest.raises(SpendUnavailable):
        await spend.spent("key_b", start_ms, Decimal(100), Decimal(1))
    assert [r.levelno for r in mom_log.records if "key spend" in r.getMessage()] == [logging.WARNING]


# ------------------------------------------------------------------------------------------ rate limits


async def test_requests_per_minute_in_memory_with_openai_headers() -> None:
    limits = RateLimits(None, 0.25)
    assert (limits.backend, limits.reason) == ("per_replica", "REDIS_URL is not set")
    remaining = []
    for _ in range(3):
        headers = await limits.admit("key:a", Limits(rpm=3), "API key")
        assert headers["x-ratelimit-limit-requests"] == "3"
        remaining.append(headers["x-ratelimit-remaining-requests"])
    assert remaining == ["2", "1", "0"]
    with pytest.raises(RateLimited) as raised:
        await limits.admit("key:a", Limits(rpm=3), "API key")
    error = raised.value
    assert error.code == "rate_limit_exceeded" and "3 requests per minute for this API key" in error.message
    assert error.headers["x-ratelimit-remaining-requests"] == "0"
    assert error.headers["x-ratelimit-reset-requests"] == error.headers["Retry-After"] + "s"
    assert 1 <= int(error.headers["Retry-After"]) <= 60
    assert (await limits.admit("key:b", Limits(rpm=3), "API key"))["x-ratelimit-remaining-requests"] == "2"


async def test_tokens_per_minute_are_counted_after_the_answer_up_to_the_limit() -> None:
    limits = RateLimits(None, 0.25)
    tpm = Limits(tpm=100)
    assert (await limits.admit("t", tpm, "API key"))["x-ratelimit-remaining-tokens"] == "100"
    await limits.count_tokens("t", 100, 60)
    assert (await limits.admit("t", tpm, "API key"))["x-ratelimit-remaining-tokens"] == "40"
    await limits.count_tokens("t", 100, 80)  # over: the window is full, no more
    with pytest.raises(RateLimited) as raised:
        await limits.admit("t", tpm, "API key")
    assert "100 tokens per minute" in raised.value.message
    assert raised.value.headers["x-ratelimit-remaining-tokens"] == "0"


async def test_an_unreachable_redis_means_per_replica_limits_logged_once(mom_log: pytest.LogCaptureFixture) -> None:
    limits = RateLimits(f"redis://127.0.0.1:{free_port()}/0", 0.25)
    assert limits.backend == "redis"
    for expected in ("1", "0"):
        headers = await limits.admit("k", Limits(rpm=2), "API key")
        assert headers["x-ratelimit-remaining-requests"] == expected  # counted here, not refused, not failed
    with pytest.raises(RateLimited):
        await limits.admit("k", Limits(rpm=2), "API key")
    assert limits.backend == "per_replica" and "Redis did not answer" in (limits.reason or "")
    health = await limits.check()
    assert health["status"] == "degraded" and health["backend"] == "per_replica"
    warnings = [r.getMessage() for r in mom_log.records if r.levelno == logging.WARNING]
    assert len(warnings) == 1 and "per replica" in warnings[0]


# ------------------------------------------------------------------------------------------------ metrics


def test_metrics_per_key_are_bounded() -> None:
    metrics = Metrics(CONFIG, max_keys=2)
    for name, cost in (("a", "0.5"), ("b", "0.25"), ("c", "1"), ("d", "2"), ("a", "0.5")):
        metrics.record(keyed_outcome(str(uuid.uuid4()), f"key_{name}", cost, name))
    families = {f.name: f for f in text_string_to_metric_families(metrics.exposition().decode())}
    requests = {s.labels["key"]: s.value for s in families["mom_key_requests"].samples if s.name.endswith("_total")}
    cost = {s.labels["key"]: s.value for s in families["mom_key_cost_usd"].samples if s.name.endswith("_total")}
    assert requests == {"a": 2.0, "b": 1.0, "other": 2.0}
    assert cost == {"a": 1.0, "b": 0.25, "other": 3.0}
