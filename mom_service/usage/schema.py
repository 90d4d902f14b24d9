"""The usage database: its tables, numbered migrations (each applied once, in order, under an advisory lock on
PostgreSQL so replicas starting together migrate one at a time), and the engine for a URL (SQLite in WAL mode by
default, PostgreSQL for several replicas)."""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from sqlalchemy import (
    BigInteger,
    Boolean,
    Column,
    Connection,
    Float,
    Index,
    Integer,
    MetaData,
    String,
    Table,
    Text,
    event,
    false,
    func,
    inspect,
    select,
    text,
)
from sqlalchemy.engine import make_url
from sqlalchemy.ext.asyncio import AsyncConnection, AsyncEngine, create_async_engine

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
    Column("turn", String(16), nullable=False, server_default="ensemble"),  # ensemble | relay | vote; migration 4
    Column("surface", String(16), nullable=False, server_default="chat"),  # chat|messages|responses|mcp|eval; mig. 5
    Column("overrides", Text),  # the caller's controls applied (JSON), null when none; migration 6
    Column("caller", String(64), index=True),  # who asked: the hash of its token (null before); migration 6
    Column("key_id", String(32)),  # the API key that asked (null: a static API_TOKEN, or before); migration 8
    Index("ix_mom_requests_key_created", "key_id", "created_ms"),  # a key's spend in a period, its usage
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
    Column("role", String(16), nullable=False),  # member | ranker | concluding
    # the strategy's stage: answer, rank, conclude, judge (docs/strategies); migration 7
    Column("stage", String(16), nullable=False, server_default="answer"),
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

# Responses stored for `previous_response_id` and GET/DELETE /v1/responses/{id} (`store: true`); migration 5.
responses_table = Table(
    "mom_responses",
    metadata,
    Column("id", String(64), primary_key=True),  # resp_...
    Column("owner", String(64), nullable=False),  # the caller's identity (a hash of its token): only it sees the row
    Column("created_ms", BigInteger, nullable=False),
    Column("expires_ms", BigInteger, nullable=False, index=True),
    Column("response", Text, nullable=False),  # the response object as GET returns it (JSON)
    Column("input_items", Text, nullable=False),  # its input items, with ids (JSON list)
    Column("conversation", Text, nullable=False),  # the engine's messages up to and with its output (JSON list)
)

# API keys (docs/keys.md); migration 8. The key itself is never stored: its SHA-256 (a key is 256 random bits, so a
# plain hash is as good as a slow one) and a short prefix to recognize it by.
keys_table = Table(
    "mom_keys",
    metadata,
    Column("id", String(32), primary_key=True),  # key_<hex>
    Column("key_hash", String(64), nullable=False, unique=True),  # sha256 of the key, hex
    Column("prefix", String(16), nullable=False),  # its first characters, for people to recognize it by
    Column("name", String(128), nullable=False),
    Column("owner", String(128)),
    Column("models", Text),  # the MoM models it may use (JSON list); null: all
    Column("budget_pico", BigInteger),  # USD * 1e12 per period; null: no budget
    Column("budget_period", String(8)),  # day | month (UTC)
    Column("rpm_limit", Integer),
    Column("tpm_limit", Integer),
    Column("expires_ms", BigInteger),
    Column("disabled", Boolean, nullable=False, server_default=false()),
    Column("created_ms", BigInteger, nullable=False),
    Column("updated_ms", BigInteger, nullable=False),
    Column("deleted_ms", BigInteger),  # deleted keys stay, for their usage records' names and the audit
)

# Every admin action (the admin API's and the CLI's): who, what, when; never a key. Migration 8.
audit_table = Table(
    "mom_audit",
    metadata,
    Column("id", String(36), primary_key=True),
    Column("created_ms", BigInteger, nullable=False, index=True),
    Column("actor", String(64), nullable=False),  # admin:<hash of the admin token>, or cli:<user>
    Column("action", String(32), nullable=False),  # key.create, key.update, key.delete, ...
    Column("target", String(64)),  # the key's id
    Column("details", Text),  # what changed (JSON)
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
async def _migration_4(conn: AsyncConnection) -> None:
    """mom_requests.turn: what kind of turn the request was (ensemble before tools existed)."""

    def add(sync: Connection) -> None:
        if "turn" not in {c["name"] for c in inspect(sync).get_columns("mom_requests")}:
            sync.execute(text("ALTER TABLE mom_requests ADD COLUMN turn VARCHAR(16) NOT NULL DEFAULT 'ensemble'"))

    await conn.run_sync(add)


async def _migration_5(conn: AsyncConnection) -> None:
    """mom_requests.surface: the protocol a request came in by (chat before the others existed); mom_responses."""

    def add(sync: Connection) -> None:
        if "surface" not in {c["name"] for c in inspect(sync).get_columns("mom_requests")}:
            sync.execute(text("ALTER TABLE mom_requests ADD COLUMN surface VARCHAR(16) NOT NULL DEFAULT 'chat'"))
        metadata.create_all(sync, tables=[responses_table])

    await conn.run_sync(add)


async def _migration_6(conn: AsyncConnection) -> None:
    """mom_requests.overrides: the caller's controls applied to a request (JSON; null before they existed);
    mom_requests.caller: who asked (the hash of its token; null before), indexed: a caller reads its own usage."""

    def add(sync: Connection) -> None:
        columns = {c["name"] for c in inspect(sync).get_columns("mom_requests")}
        if "overrides" not in columns:
            sync.execute(text("ALTER TABLE mom_requests ADD COLUMN overrides TEXT"))
        if "caller" not in columns:
            sync.execute(text("ALTER TABLE mom_requests ADD COLUMN caller VARCHAR(64)"))
            sync.execute(text("CREATE INDEX ix_mom_requests_caller ON mom_requests (caller)"))

    await conn.run_sync(add)


async def _migration_7(conn: AsyncConnection) -> None:
    """mom_calls.stage: the strategy's stage of a call (before strategies: `conclude` for the concluding calls,
    `answer` for the members')."""

    def add(sync: Connection) -> None:
        if "stage" not in {c["name"] for c in inspect(sync).get_columns("mom_calls")}:
            sync.execute(text("ALTER TABLE mom_calls ADD COLUMN stage VARCHAR(16) NOT NULL DEFAULT 'answer'"))
            sync.execute(text("UPDATE mom_calls SET stage = 'conclude' WHERE role = 'concluding'"))

    await conn.run_sync(add)


async def _migration_8(conn: AsyncConnection) -> None:
    """API keys and the audit table; mom_requests.key_id (the key that asked; null before), indexed with the time:
    a key's spend in a period is read on the requests' path."""

    def add(sync: Connection) -> None:
        metadata.create_all(sync, tables=[keys_table, audit_table])
        if "key_id" not in {c["name"] for c in inspect(sync).get_columns("mom_requests")}:
            sync.execute(text("ALTER TABLE mom_requests ADD COLUMN key_id VARCHAR(32)"))
        if "ix_mom_requests_key_created" not in {i["name"] for i in inspect(sync).get_indexes("mom_requests")}:
            sync.execute(text("CREATE INDEX ix_mom_requests_key_created ON mom_requests (key_id, created_ms)"))

    await conn.run_sync(add)


MIGRATIONS: Sequence[Callable[[AsyncConnection], Any]] = (
    _migration_1,
    _migration_2,
    _migration_3,
    _migration_4,
    _migration_5,
    _migration_6,
    _migration_7,
    _migration_8,
)
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
