"""What a slow Redis round trip must not break: single flight, and every circuit-breaker permit coming back.

A proxy in front of the real Redis (tests/redis_proxy.py) holds Redis' answers to chosen commands for exactly as
long as a test needs, so the windows these tests aim at are opened on purpose, not hoped for.
"""

from __future__ import annotations

import signal
import threading
from collections.abc import Iterator
from typing import Any

import httpx
import pytest
import redis

from tests.api.test_cache import Answer, ask, question, raw_request
from tests.conftest import REDIS_HOST, REDIS_PORT, Service, StartService, empty_redis_db, llm, wait_until
from tests.fake_upstream import FakeUpstream
from tests.redis_proxy import HoldingProxy

REDIS_DB = 12  # this module's own key space, flushed before and after
MEMBERS = ("rr-one", "rr-two", "rr-three")
JUDGE = "rr-judge"
ANSWER_KEYS = b"mom:cache:a:"
MEMBER_KEYS = b"mom:cache:m:"


def config(fake: FakeUpstream) -> dict[str, Any]:
    # no retries: one failure is one failure (a circuit opens after one, below)
    return {
        "llm_definitions": [llm(name, fake, retries=0) for name in (*MEMBERS, JUDGE)],
        "models": [{"name": "rrmom", "llms_to_query": list(MEMBERS), "concluding_llm": JUDGE}],
    }


@pytest.fixture
def proxied_redis() -> Iterator[tuple[redis.Redis, HoldingProxy]]:
    """This module's Redis db (empty), and a holding proxy in front of the Redis server."""
    for client in empty_redis_db(REDIS_DB):
        proxy = HoldingProxy((REDIS_HOST, REDIS_PORT))
        try:
            yield client, proxy
        finally:
            proxy.release()
            proxy.close()


def start(start_service: StartService, fake: FakeUpstream, proxy: HoldingProxy, **env: str) -> Service:
    environment = {
        "MOM_CACHE_ENABLED": "true",
        "REDIS_URL": f"{proxy.url}/{REDIS_DB}",
        "MOM_CACHE_TIMEOUT_MS": "20000",  # a held answer is slow, never a timeout
    }
    return start_service(config(fake), environment | env)


def calls_of(fake: FakeUpstream, model: str) -> int:
    return sum(1 for e in fake.log() if e["model"] == model)


def in_thread(work: Any) -> tuple[threading.Thread, list[Any]]:
    result: list[Any] = []
    thread = threading.Thread(target=lambda: result.append(work()), daemon=True)
    thread.start()
    return thread, result


def test_an_identical_request_joins_the_flight_before_its_cache_lookup(
    start_service: StartService, fake: FakeUpstream, proxied_redis: tuple[redis.Redis, HoldingProxy]
) -> None:
    """The second request arrives while the first one's panel runs. Had it looked in Redis first, its lookup
    (a miss: nothing is stored yet) could come back after the first run ended and left the flight table, and it
    would run the whole panel again. It joins the flight at once instead: one synthesis, and a hit."""
    client, proxy = proxied_redis
    service = start(start_service, fake, proxy)
    fake.configure({JUDGE: {"text": "One synthesis for both.", "ttft_ms": 600}})
    text = "Who asks second?"
    first, first_answer = in_thread(lambda: ask(service, text, "rrmom"))
    fake.wait_for(lambda log: any(e["model"] == JUDGE for e in log), timeout=10)  # the first run is under way
    proxy.hold(ANSWER_KEYS)  # from now on, an answer lookup takes as long as this test says
    second, second_answer = in_thread(lambda: ask(service, text, "rrmom"))
    wait_until(lambda: proxy.held >= 1 or not second.is_alive(), timeout=15)
    if proxy.held:  # the second request looked in Redis: let its (missing) answer come back after the first run
        first.join(15)
        wait_until(lambda: bool(list(client.scan_iter(match="mom:cache:a:*"))), timeout=10)
        proxy.release()
    first.join(15)
    second.join(15)
    one: Answer = first_answer[0]
    two: Answer = second_answer[0]
    assert one.status == two.status == 200
    assert (one.cache, two.cache) == ("miss", "hit")
    assert two.content == one.content == "One synthesis for both."
    assert calls_of(fake, JUDGE) == 1
    assert proxy.held == 0  # it never looked in Redis: it followed the run already under way


def circuit_of(service: Service, name: str) -> dict[str, Any]:
    report = httpx.get(f"{service.url}/health/detailed", headers=service.headers(), timeout=10).json()
    circuit: dict[str, Any] = report["components"][f"llm:{name}"]["circuit"]
    return circuit


def test_a_probe_cancelled_during_its_cache_lookup_gives_its_permit_back(
    start_service: StartService, fake: FakeUpstream, proxied_redis: tuple[redis.Redis, HoldingProxy]
) -> None:
    """A member whose circuit is half-open holds the one probe permit while it looks for its cached answer. The
    client leaving during that lookup cancels it: the permit must come back, or the circuit would stay half-open
    with its probe 'running' for ever, and the LLM skipped until a restart."""
    _, proxy = proxied_redis
    service = start(
        start_service, fake, proxy, MOM_CIRCUIT_FAILURES="1", MOM_CIRCUIT_COOLDOWN_SECONDS="0.5", LOG_FORMAT="json"
    )
    flaky = MEMBERS[0]
    fake.configure({flaky: {"status": 503, "fail_times": 1}})
    opened = ask(service, "Open the circuit.", "rrmom")
    assert {m["name"]: m["status"] for m in opened.mom["members"]}[flaky] == "error"
    wait_until(lambda: circuit_of(service, flaky)["state"] == "half_open", timeout=10)

    proxy.hold(MEMBER_KEYS)
    leaving = raw_request(service, {"model": "rrmom", "messages": question("Leave early."), "stream": True})
    wait_until(lambda: proxy.held >= len(MEMBERS), timeout=15)  # every member is in its lookup
    leaving.close()
    # the client has left: the request is recorded as cancelled, its members cut off in their lookups
    wait_until(lambda: '"status":499' in service.log(), timeout=15)
    proxy.release()

    again = ask(service, "Is the circuit closed again?", "rrmom")
    member = {m["name"]: m for m in again.mom["members"]}[flaky]
    assert (member["status"], member["reason"]) == ("ok", None)  # asked: the probe, which closed the circuit
    assert circuit_of(service, flaky)["state"] == "closed"


def test_answers_still_being_stored_at_shutdown_are_waited_for(
    start_service: StartService, fake: FakeUpstream, proxied_redis: tuple[redis.Redis, HoldingProxy]
) -> None:
    """Members' answers are stored in the background, after the answer went out. A shutdown right then waits for
    those stores (a bounded while) before it closes the cache, instead of dropping them."""
    client, proxy = proxied_redis
    service = start(start_service, fake, proxy)
    proxy.hold(MEMBER_KEYS, command=b"SET", before=True)  # the stores reach Redis only when released
    answer = ask(service, "Store me on the way out.", "rrmom")
    assert answer.status == 200 and answer.cache == "miss"
    wait_until(lambda: proxy.held >= len(MEMBERS), timeout=10)  # every member's answer is being stored
    assert service.process is not None
    service.process.send_signal(signal.SIGTERM)
    wait_until(lambda: "being stored in the cache" in service.log(), timeout=15)  # the shutdown waits for them
    proxy.release()
    assert service.process.wait(15) == 0
    assert len(list(client.scan_iter(match="mom:cache:m:*"))) == len(MEMBERS)
