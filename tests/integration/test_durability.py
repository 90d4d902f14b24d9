"""No record is lost: 500 requests, SIGTERM in the middle of the load, then a restart; SQLite and PostgreSQL."""

from __future__ import annotations

import asyncio
import signal
import sqlite3
import time
from typing import Any

import httpx
import pytest

from tests.conftest import Service, StartService, panel_config
from tests.fake_upstream import FakeUpstream

QUESTION = [{"role": "user", "content": "Count me."}]
TOTAL = 500
CONCURRENCY = 25


async def _load_then_sigterm(service: Service) -> int:
    """Send TOTAL requests, SIGTERM the service after half have been answered; return how many were answered."""
    answered = 0
    sent = 0
    lock = asyncio.Lock()
    assert service.process is not None
    process = service.process

    async def worker(client: httpx.AsyncClient) -> None:
        nonlocal answered, sent
        while True:
            async with lock:
                if sent >= TOTAL:
                    return
                sent += 1
            try:
                response = await client.post(
                    f"{service.base_url}/chat/completions",
                    headers=service.headers(),
                    json={"model": "mom", "messages": QUESTION},
                )
            except httpx.HTTPError:
                continue  # the service is going away: this request got no answer
            if response.status_code == 200 and response.json()["choices"][0]["message"]["content"]:
                answered += 1
                if answered == TOTAL // 2:
                    process.send_signal(signal.SIGTERM)

    limits = httpx.Limits(max_connections=CONCURRENCY)
    async with httpx.AsyncClient(timeout=30, limits=limits) as client:
        await asyncio.gather(*(worker(client) for _ in range(CONCURRENCY)))
    return answered


def _check(service: Service, answered: int, count_ok_rows: Any) -> None:
    assert service.process is not None
    assert service.process.wait(30) == 0, service.log()
    assert TOTAL // 2 <= answered < TOTAL  # the signal landed mid-load
    assert count_ok_rows() == answered
    assert "Usage records written" in service.log()
    # restart on the same database: the usage API still reports every answer
    service.start()
    report = httpx.get(
        f"{service.base_url}/metrics/usage", headers=service.headers(), params={"start": time.time() - 3600}, timeout=10
    ).json()
    # every answer is there; requests cut off by the shutdown (if any) are there too, as cancelled or errors
    assert report["totals"]["requests"] >= answered
    assert report["totals"]["prompt_tokens"] > 0


@pytest.mark.slow
def test_sigterm_mid_load_loses_no_record_sqlite(fake_server: FakeUpstream, start_service: StartService) -> None:
    fake_server.reset()
    service = start_service(panel_config(fake_server))
    answered = asyncio.run(_load_then_sigterm(service))

    def count_ok_rows() -> int:
        with sqlite3.connect(service.workdir / "data" / "mom.db") as conn:
            return int(conn.execute("SELECT count(*) FROM mom_requests WHERE status = 'ok'").fetchone()[0])

    _check(service, answered, count_ok_rows)


@pytest.mark.slow
def test_sigterm_mid_load_loses_no_record_postgres(
    fake_server: FakeUpstream, start_service: StartService, postgres_url: str
) -> None:
    import asyncpg

    fake_server.reset()
    service = start_service(panel_config(fake_server), {"DATABASE_URL": postgres_url})
    answered = asyncio.run(_load_then_sigterm(service))

    def count_ok_rows() -> int:
        async def count() -> int:
            conn = await asyncpg.connect(postgres_url.replace("+asyncpg", ""))
            try:
                return int(await conn.fetchval("SELECT count(*) FROM mom_requests WHERE status = 'ok'"))
            finally:
                await conn.close()

        return asyncio.run(count())

    _check(service, answered, count_ok_rows)
