"""API keys on the real PostgreSQL: the same checks as tests/api/test_keys.py (there on SQLite), on one service over
a database of this module's own: the admin API and its token, a key's life cycle through it and through
`mom-service keys` (audited, never the key), each refusal with no upstream call, the rate-limit headers, a budget
reached mid-way, usage grouped by key and a key reading only its own."""

from __future__ import annotations

import asyncio

import asyncpg
import pytest

from tests.api.test_keys import (
    AuditRows,
    check_admin_life_cycle,
    check_admin_token,
    check_budget_midway,
    check_cli_life_cycle,
    check_rate_limit_headers,
    check_refusals,
    check_tokens_per_minute,
    check_usage_by_key,
    configure,
    keys_config,
    keys_env,
    make_key,
)
from tests.conftest import Service, StartService
from tests.fake_upstream import FakeUpstream


@pytest.fixture(scope="module")
def on_postgres(fake_server: FakeUpstream, start_service: StartService, module_postgres_url: str) -> Service:
    return start_service(keys_config(fake_server), keys_env(DATABASE_URL=module_postgres_url))


@pytest.fixture
def fake(fake_server: FakeUpstream) -> FakeUpstream:
    fake_server.reset()
    configure(fake_server)
    return fake_server


def postgres_audit(url: str) -> AuditRows:
    dsn = url.replace("postgresql+asyncpg://", "postgresql://", 1)

    def rows() -> list[tuple[str, str, str | None, str | None]]:
        async def read() -> list[tuple[str, str, str | None, str | None]]:
            conn = await asyncpg.connect(dsn, timeout=5)
            try:
                found = await conn.fetch("SELECT actor, action, target, details FROM mom_audit ORDER BY created_ms, id")
            finally:
                await conn.close()
            return [(r["actor"], r["action"], r["target"], r["details"]) for r in found]

        return asyncio.run(read())

    return rows


def test_the_admin_api_and_a_key_life_cycle(on_postgres: Service, fake: FakeUpstream, module_postgres_url: str) -> None:
    _, key = make_key(on_postgres)
    check_admin_token(on_postgres, key)
    check_admin_life_cycle(on_postgres, fake, postgres_audit(module_postgres_url))


def test_a_key_life_cycle_through_the_cli(on_postgres: Service, fake: FakeUpstream, module_postgres_url: str) -> None:
    check_cli_life_cycle(on_postgres, postgres_audit(module_postgres_url), database_url=module_postgres_url)


def test_each_refusal_comes_before_any_upstream_call(on_postgres: Service, fake: FakeUpstream) -> None:
    check_refusals(on_postgres, fake)
    check_tokens_per_minute(on_postgres, fake)


def test_answers_carry_openai_rate_limit_headers(on_postgres: Service, fake: FakeUpstream) -> None:
    check_rate_limit_headers(on_postgres, fake)


def test_a_budget_is_reached_midway_through_a_series(on_postgres: Service, fake: FakeUpstream) -> None:
    check_budget_midway(on_postgres, fake)


def test_usage_by_key_and_a_key_reads_only_its_own(on_postgres: Service, fake: FakeUpstream) -> None:
    check_usage_by_key(on_postgres, fake)
