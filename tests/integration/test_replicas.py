"""Several replicas on one PostgreSQL database: every replica's records land, any replica reports them all."""

from __future__ import annotations

import time
from concurrent.futures import ThreadPoolExecutor
from decimal import Decimal
from typing import Any

import httpx

from mom_service.usage.schema import SCHEMA_VERSION
from tests.conftest import Service, StartService, panel_config
from tests.fake_upstream import FakeUpstream

QUESTION = [{"role": "user", "content": "Which replica answers?"}]


def ask(service: Service) -> dict[str, Any]:
    response = httpx.post(
        f"{service.base_url}/chat/completions",
        headers=service.headers(),
        json={"model": "mom", "messages": QUESTION},
        timeout=30,
    )
    assert response.status_code == 200
    body: dict[str, Any] = response.json()
    return body


def report(service: Service, **params: Any) -> dict[str, Any]:
    response = httpx.get(f"{service.base_url}/metrics/usage", headers=service.headers(), params=params, timeout=10)
    assert response.status_code == 200
    body: dict[str, Any] = response.json()
    return body


def test_two_replicas_share_one_postgres_database(
    fake_server: FakeUpstream, start_service: StartService, postgres_url: str
) -> None:
    fake_server.reset()
    start = time.time() - 1
    # both start at once: the migration lock lets one create the schema while the other waits
    with ThreadPoolExecutor(2) as pool:
        first, second = pool.map(
            lambda _: start_service(panel_config(fake_server), {"DATABASE_URL": postgres_url}), range(2)
        )
    with ThreadPoolExecutor(8) as pool:
        answers = list(pool.map(ask, [first] * 7 + [second] * 5))
    expected_cost = sum((Decimal(repr(a["usage"]["cost"])) for a in answers), Decimal(0))
    expected_tokens = sum(a["usage"]["total_tokens"] for a in answers)

    for replica in (first, second):
        deadline = time.monotonic() + 10
        totals = report(replica, start=start)["totals"]
        while totals["requests"] < 12 and time.monotonic() < deadline:
            time.sleep(0.1)
            totals = report(replica, start=start)["totals"]
        assert totals["requests"] == 12
        assert totals["prompt_tokens"] + totals["completion_tokens"] == expected_tokens
        assert Decimal(repr(totals["cost"])) == expected_cost
    by_model = report(second, start=start, group_by="model")["groups"]
    assert [(g["key"], g["requests"]) for g in by_model] == [("mom", 12)]
    for replica in (first, second):
        assert f"schema version {SCHEMA_VERSION}" in replica.log()
