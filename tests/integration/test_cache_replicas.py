"""The response cache in Redis: shared by replicas (on one PostgreSQL database), and never a failed answer when
Redis goes away."""

from __future__ import annotations

import signal
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from decimal import Decimal
from typing import Any

import httpx
import pytest
import redis

from tests.api.test_cache import Answer, ask, assert_hit, assert_miss, usd
from tests.conftest import Service, StartService, empty_redis_db, llm, wait_until
from tests.fake_upstream import FakeUpstream
from tests.integration.conftest import OwnRedis

REDIS_DB = 14  # this module's own key space, flushed before and after
MEMBERS = ("cr-one", "cr-two")
JUDGE = "cr-judge"
OURS = frozenset({*MEMBERS, JUDGE})
PRICE = {"input_per_million": "3", "output_per_million": "12"}
WARNING = "answering without the cache"


def config(fake: FakeUpstream) -> dict[str, Any]:
    return {
        "llm_definitions": [*(llm(name, fake, pricing=PRICE) for name in (*MEMBERS, JUDGE))],
        "models": [{"name": "crmom", "llms_to_query": list(MEMBERS), "concluding_llm": JUDGE}],
    }


def configure(fake: FakeUpstream) -> None:
    fake.configure(
        {
            **{name: {"text": f"{name}: {{last_user}}", "prompt_tokens": 30} for name in MEMBERS},
            JUDGE: {"text": "A shared answer, in several pieces.", "prompt_tokens": 200},
        }
    )


def upstream(fake: FakeUpstream) -> list[str]:
    return sorted(e["model"] for e in fake.log() if e["model"] in OURS)


@pytest.fixture
def shared_redis() -> Iterator[redis.Redis]:
    """This module's db index of the Redis at 127.0.0.1:6379, empty; skipped where none answers (failed on CI)."""
    yield from empty_redis_db(REDIS_DB)


def url_of(client: redis.Redis) -> str:
    kwargs = client.connection_pool.connection_kwargs
    return f"redis://{kwargs['host']}:{kwargs['port']}/{kwargs['db']}"


def stored(client: redis.Redis, kind: str) -> list[bytes]:
    """The keys of stored answers (`a`) or members' answers (`m`)."""
    return list(client.scan_iter(f"mom:cache:{kind}:*"))


def usage(service: Service, since: float) -> dict[str, Any]:
    response = httpx.get(
        f"{service.base_url}/metrics/usage",
        headers=service.headers(),
        params={"start": since, "model": "crmom"},
        timeout=10,
    )
    assert response.status_code == 200, response.text
    totals: dict[str, Any] = response.json()["totals"]
    return totals


def health(service: Service) -> httpx.Response:
    return httpx.get(f"{service.url}/health/detailed", headers=service.headers(), timeout=10)


def test_replicas_share_the_cache_and_the_records(
    fake_server: FakeUpstream, start_service: StartService, postgres_url: str, shared_redis: redis.Redis
) -> None:
    fake = fake_server
    fake.reset()
    configure(fake)
    env = {"MOM_CACHE_ENABLED": "true", "REDIS_URL": url_of(shared_redis), "DATABASE_URL": postgres_url}
    with ThreadPoolExecutor(2) as pool:
        first, second = pool.map(lambda _: start_service(config(fake), env), range(2))
    since = time.time() - 1
    text = "Which replica remembers?"

    original = ask(first, text, "crmom")
    assert_miss(original)
    # stored in Redis as the answer goes out (the answer after its last event, the members' in the background),
    # each with the model's TTL
    wait_until(lambda: len(stored(shared_redis, "a")) == 1 and len(stored(shared_redis, "m")) == len(MEMBERS))
    for key in stored(shared_redis, "a") + stored(shared_redis, "m"):
        assert 3500 < int(shared_redis.ttl(key)) <= 3600

    hits: list[Answer] = [
        ask(second, text, "crmom", stream=True),
        ask(second, text, "crmom"),
        ask(first, text, "crmom"),
    ]
    for hit in hits:
        assert_hit(hit, original)
    assert upstream(fake) == sorted([*MEMBERS, JUDGE])  # the other replica called nothing

    expected_saved = sum((usd(h.mom["cost_saved"]) for h in hits), Decimal(0))
    assert expected_saved == 3 * usd(original.mom["cost"])
    for replica in (first, second):  # each reports every replica's records
        wait_until(lambda replica=replica: usage(replica, since)["requests"] == 4)  # type: ignore[misc]
        totals = usage(replica, since)
        assert totals["errors"] == 0
        assert totals["prompt_tokens"] == original.body["usage"]["prompt_tokens"]
        assert usd(totals["cost"]) == usd(original.mom["cost"])
        assert usd(totals["cost_saved"]) == expected_saved

        response = health(replica)
        assert response.status_code == 200
        cache = response.json()["components"]["cache"]
        assert cache["status"] == "ok" and cache["backend"] == "redis" and "error" not in cache
        assert "redis://" not in response.text


def answered_without_the_cache(service: Service, fake: FakeUpstream, text: str, original: Answer, what: str) -> None:
    """Whole and streamed requests each answered promptly, as misses, by the panel."""
    fake.clear_log()
    questions = [(text, False), (text, True)] * 2 + [(f"A new question while Redis is {what}.", False)]
    for index, (question, stream) in enumerate(questions):
        started = time.monotonic()
        answer = ask(service, question, "crmom", stream=stream)
        elapsed = time.monotonic() - started
        assert elapsed < 3, f"Redis {what}: request {index} took {elapsed:.2f} s"
        assert_miss(answer)  # answered, without the cache
        assert answer.content == original.content
        assert all(c["cached"] is False for c in answer.calls)
    assert upstream(fake) == sorted([*MEMBERS, JUDGE] * len(questions))


def assert_cache_degraded(service: Service) -> None:
    started = time.monotonic()
    response = health(service)
    assert time.monotonic() - started < 3
    assert response.status_code == 200
    report = response.json()
    assert report["status"] == "degraded", report  # not an error: answers go on
    cache = report["components"]["cache"]
    assert cache["status"] == "degraded" and cache["backend"] == "redis" and cache["error"]
    assert report["components"]["database"]["status"] == "ok"


def test_redis_slow_or_gone_makes_misses_not_failures(
    fake_server: FakeUpstream,
    start_service: StartService,
    own_redis: OwnRedis,
) -> None:
    fake = fake_server
    fake.reset()
    configure(fake)
    process, client = own_redis
    service = start_service(config(fake), {"MOM_CACHE_ENABLED": "true", "REDIS_URL": url_of(client)})
    text = "What if Redis goes away?"

    original = ask(service, text, "crmom")
    assert_miss(original)
    wait_until(lambda: len(stored(client, "a")) == 1)
    assert_hit(ask(service, text, "crmom"), original)
    assert health(service).json()["components"]["cache"]["status"] == "ok"
    assert WARNING not in service.log()

    # Redis hangs (its connections stay open, nothing answers): each operation gives up after 250 ms
    process.send_signal(signal.SIGSTOP)
    try:
        answered_without_the_cache(service, fake, text, original, "frozen")
        assert_cache_degraded(service)
    finally:
        process.send_signal(signal.SIGCONT)
    # back: the stored answer is found again
    deadline = time.monotonic() + 15
    while ask(service, text, "crmom").cache != "hit":
        assert time.monotonic() < deadline, "the cache did not come back with Redis"
        time.sleep(0.2)

    process.kill()  # Redis dies mid-run
    process.wait(5)
    answered_without_the_cache(service, fake, text, original, "gone")
    assert_cache_degraded(service)
    # every lookup and store failed, frozen then gone, yet it is logged once (at most once a minute)
    assert service.log().count(WARNING) == 1
