"""API keys across two replicas on one PostgreSQL database and one Redis (docs/keys.md): a key's requests per minute
are shared (the total allowed in a minute is the limit, not twice it); a budget holds across them within one request
per replica; Redis frozen, then gone, mid-way: the limits are counted per replica, answers keep coming, and
/health/detailed says so."""

from __future__ import annotations

import signal
from concurrent.futures import ThreadPoolExecutor
from decimal import Decimal
from typing import Any

import httpx

from tests.api.test_keys import (
    JUDGE,
    MEMBERS,
    chat,
    configure,
    error_of,
    keys_config,
    keys_env,
    make_key,
    spend_of,
    upstream,
)
from tests.conftest import TOKEN, Service, StartService, wait_until
from tests.fake_upstream import FakeUpstream
from tests.integration.conftest import OwnRedis

FALLBACK = "limits are counted per replica until it does"


def rate_limits(service: Service) -> dict[str, Any]:
    response = httpx.get(f"{service.url}/health/detailed", headers=service.headers(TOKEN), timeout=30)
    assert response.status_code == 200, response.text  # degraded at worst, never an error
    component: dict[str, Any] = response.json()["components"]["rate_limits"]
    return component


def shared_requests_per_minute(replicas: tuple[Service, Service], fake: FakeUpstream) -> None:
    """Ten requests of a key allowed four a minute, alternating between the replicas: four answered in all."""
    _, key = make_key(replicas[0], rpm_limit=4)
    fake.clear_log()
    answers = [chat(replicas[i % 2], key) for i in range(10)]
    assert [a.status_code for a in answers] == [200] * 4 + [429] * 6
    assert [a.headers["x-ratelimit-remaining-requests"] for a in answers[:4]] == ["3", "2", "1", "0"]
    for refused in answers[4:]:
        assert "4 requests per minute" in error_of(refused, 429, "rate_limit_exceeded")["message"]
    assert upstream(fake) == sorted([*MEMBERS, JUDGE] * 4)


def shared_budget(replicas: tuple[Service, Service], fake: FakeUpstream) -> None:
    """Each replica answers a key's requests one after another, both at once, until the key's budget refuses them:
    what the key spent is within its budget plus one request per replica."""
    budget = Decimal("0.06")  # some fifty requests; far from it, the replicas read the spend from their caches
    fake.configure({JUDGE: {"text": "The panel agrees on a short answer.", "prompt_tokens": 60, "ttft_ms": 100}})
    record, key = make_key(replicas[0], budget_usd=str(budget), budget_period="day")

    def spend_until_refused(replica: Service) -> list[Decimal]:
        costs: list[Decimal] = []
        while len(costs) < 200:
            response = chat(replica, key)
            if response.status_code == 429:
                error_of(response, 429, "budget_exceeded")
                return costs
            assert response.status_code == 200, response.text
            costs.append(Decimal(repr(response.json()["usage"]["cost"])))
        raise AssertionError("the budget never refused a request")

    with ThreadPoolExecutor(2) as pool:
        first, second = pool.map(spend_until_refused, replicas)
    answered = len(first) + len(second)
    assert first and second  # both replicas answered some, then refused
    wait_until(lambda: spend_of(replicas[1], record["id"])["requests"] == answered)
    spent = Decimal(repr(spend_of(replicas[1], record["id"])["spent_usd"]))
    assert spent == sum(first + second, Decimal(0))
    assert spent <= budget + 2 * max(first + second)  # within one request per replica
    for replica in replicas:  # and it stays refused everywhere
        error_of(chat(replica, key), 429, "budget_exceeded")
    configure(fake)


def answered_with_per_replica_limits(replicas: tuple[Service, Service], fake: FakeUpstream, what: str) -> None:
    """A new key allowed three a minute: three answers on each replica, its own count, then a 429 (not a 5xx)."""
    _, key = make_key(replicas[0], rpm_limit=3)
    fake.clear_log()
    for replica in replicas:
        answers = [chat(replica, key) for _ in range(4)]
        assert [a.status_code for a in answers] == [200, 200, 200, 429], f"Redis {what}"
        assert [a.headers["x-ratelimit-remaining-requests"] for a in answers] == ["2", "1", "0", "0"]
    assert upstream(fake) == sorted([*MEMBERS, JUDGE] * 6)
    for replica in replicas:
        limits = rate_limits(replica)
        assert limits["status"] == "degraded" and limits["backend"] == "per_replica", limits
        assert "Redis did not answer" in limits["reason"]


def test_two_replicas_share_limits_and_budgets_and_go_on_without_redis(
    fake_server: FakeUpstream, start_service: StartService, postgres_url: str, own_redis: OwnRedis
) -> None:
    fake = fake_server
    fake.reset()
    configure(fake)
    process, client = own_redis
    kwargs = client.connection_pool.connection_kwargs
    env = keys_env(DATABASE_URL=postgres_url, REDIS_URL=f"redis://{kwargs['host']}:{kwargs['port']}/0")
    replicas = (start_service(keys_config(fake), env), start_service(keys_config(fake), env))
    for replica in replicas:
        limits = rate_limits(replica)
        assert (limits["status"], limits["backend"], limits.get("reason")) == ("ok", "redis", None)

    shared_requests_per_minute(replicas, fake)
    assert any(key.startswith(b"mom:limits") for key in client.scan_iter())  # counted in Redis
    shared_budget(replicas, fake)

    process.send_signal(signal.SIGSTOP)  # Redis frozen: its connections stay open, nothing answers
    try:
        answered_with_per_replica_limits(replicas, fake, "frozen")
    finally:
        process.send_signal(signal.SIGCONT)
    # back: the limits are shared again (health's ping finds it, and the next request counts in Redis)
    for replica in replicas:
        wait_until(lambda replica=replica: rate_limits(replica)["backend"] == "redis", timeout=15)  # type: ignore[misc]
    shared_requests_per_minute(replicas, fake)

    process.kill()  # Redis gone for good
    process.wait(5)
    answered_with_per_replica_limits(replicas, fake, "gone")
    for replica in replicas:  # said once when it happened (frozen), once when it answered again; not per request
        log = replica.log()
        assert log.count(FALLBACK) == 2 and log.count("Redis answers again") == 1
