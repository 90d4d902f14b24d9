"""Real PostgreSQL for the integration tests: a fresh database per test (or per module), dropped at its end; a
redis-server of a test's own, which it may stop or kill."""

from __future__ import annotations

import asyncio
import os
import shutil
import subprocess
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import NoReturn

import pytest
import redis

from tests.conftest import REDIS_HOST, free_port, wait_until

PG_ADMIN_DSN = os.environ.get("MOM_TEST_PG_DSN", "postgresql://postgres@127.0.0.1:5432/test")


def _admin(statement: str) -> None:
    import asyncpg

    async def run() -> None:
        conn = await asyncpg.connect(PG_ADMIN_DSN, timeout=5)
        try:
            await conn.execute(statement)
        finally:
            await conn.close()

    asyncio.run(run())


def fresh_database() -> Iterator[str]:
    """`postgresql+asyncpg://` URL of a new, empty database, dropped at the end; skipped where no PostgreSQL
    answers (failed when CI=true)."""
    try:
        _admin("SELECT 1")
    except Exception as exc:
        unavailable(f"no PostgreSQL answers at {PG_ADMIN_DSN} ({type(exc).__name__}: {exc})", "PostgreSQL")
    name = f"mom_test_{uuid.uuid4().hex[:12]}"
    _admin(f'CREATE DATABASE "{name}"')
    base = PG_ADMIN_DSN.rsplit("/", 1)[0].replace("postgresql://", "postgresql+asyncpg://", 1)
    yield f"{base}/{name}"
    _admin(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')


@pytest.fixture
def postgres_url() -> Iterator[str]:
    """A database of this test's own (no test sees another's records)."""
    yield from fresh_database()


@pytest.fixture(scope="module")
def module_postgres_url() -> Iterator[str]:
    """A database of this module's own, for a service its tests share."""
    yield from fresh_database()


OwnRedis = tuple[subprocess.Popen[bytes], redis.Redis]


def unavailable(reason: str, what: str) -> NoReturn:
    """Skip (fail when CI=true) for want of `what`."""
    if os.environ.get("CI") == "true":
        pytest.fail(f"CI=true requires {what}: {reason}")
    pytest.skip(reason)


def redis_client(port: int, db: int = 0) -> redis.Redis:
    return redis.Redis(host=REDIS_HOST, port=port, db=db, socket_timeout=2, socket_connect_timeout=2)


@pytest.fixture
def own_redis(tmp_path: Path) -> Iterator[OwnRedis]:
    """A redis-server of this test's own (no persistence), on a free port: the test may stop or kill it."""
    binary = shutil.which("redis-server")
    if binary is None:
        unavailable("redis-server is not installed", "redis-server")
    port = free_port()
    with (tmp_path / "redis.log").open("wb") as log:
        process = subprocess.Popen(
            [binary, "--port", str(port), "--bind", REDIS_HOST, "--save", "", "--appendonly", "no"],
            stdout=log,
            stderr=subprocess.STDOUT,
            cwd=tmp_path,
        )
    client = redis_client(port)

    def answers() -> bool:
        try:
            return bool(client.ping())
        except redis.RedisError:
            return False

    try:
        wait_until(answers)
        yield process, client
    finally:
        client.close()
        if process.poll() is None:
            process.kill()
        process.wait(5)
