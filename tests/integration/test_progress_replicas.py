"""The progress stream across replicas on one Redis: the request answered by one replica, its progress read on the
other (after the run, and live while a member is held); and Redis going away never fails an answer."""

from __future__ import annotations

import signal
import subprocess
import time
from collections.abc import Iterator

import httpx
import openai
import pytest
import redis

from tests.api.test_progress import (
    ANSWER,
    GATE,
    QUESTION,
    Event,
    ask,
    assert_answered,
    assert_panel,
    client,
    config,
    configure,
    lifecycle,
    of,
    progress,
    read_all,
)
from tests.conftest import TOKEN, Service, StartService, empty_redis_db, wait_until
from tests.fake_upstream import FakeUpstream
from tests.integration.test_cache_replicas import url_of

REDIS_DB = 11  # this module's own key space, flushed before and after
TTL_S = 120
WARNING = "progress stream (redis)"


@pytest.fixture
def shared_redis() -> Iterator[redis.Redis]:
    """This module's db index of the Redis at 127.0.0.1:6379, empty; skipped where none answers (failed on CI)."""
    yield from empty_redis_db(REDIS_DB)


def replicas(fake: FakeUpstream, start_service: StartService, url: str) -> tuple[Service, Service]:
    env = {"REDIS_URL": url, "MOM_PROGRESS_TTL_SECONDS": str(TTL_S)}
    return start_service(config(fake), env), start_service(config(fake), env)


def test_a_run_on_one_replica_is_followed_on_the_other(
    fake_server: FakeUpstream, start_service: StartService, shared_redis: redis.Redis
) -> None:
    first, second = replicas(fake_server, start_service, url_of(shared_redis))
    configure(fake_server)
    run_id, url, mom, content = ask(first)
    elsewhere = read_all(second, url)  # after the run: all of it, from Redis
    assert elsewhere == read_all(first, url)
    assert lifecycle(elsewhere)[:7] == ["run_started", *["member_started"] * 3, *["member_done"] * 3]
    assert_panel(elsewhere)
    assert_answered(elsewhere, mom, content)
    assert read_all(second, f"/v1/progress/{run_id}", Authorization=f"Bearer {TOKEN}") == elsewhere
    keys = sorted(key.decode() for key in shared_redis.scan_iter(f"mom:progress:{run_id}:*"))
    assert keys == [f"mom:progress:{run_id}:{part}" for part in ("deltas", "life", "owner")]
    for key in keys:
        assert 0 < int(shared_redis.pttl(key)) <= TTL_S * 1000
    other = httpx.get(second.url + url.replace(run_id, "00000000-0000-4000-8000-000000000000"), timeout=10)
    assert other.status_code == 401  # the link token of one run opens no other, on any replica

    # live: the run goes on on the first replica while the second follows it
    configure(fake_server, pg_three={"gate": GATE})
    raw = client(first).chat.completions.with_raw_response.create(model="prog-think", messages=QUESTION, stream=True)
    try:
        with progress(second, raw.headers["x-mom-progress-url"]) as stream:
            seen: list[Event] = []
            while len(of(seen, "member_done")) < 2:
                seen.append(next(stream))
            (held,) = [e for e in fake_server.log() if e["model"] == "pg-three"]
            assert held["finished_at"] is None  # still held: what follows comes live, through pub/sub
            time.sleep(3)  # longer than a Redis read's timeout (2 s): the subscription waits on regardless
            fake_server.open_gate(GATE)
            seen += list(stream)
        assert_panel(seen)
        assert of(seen, "member_done")[-1].data["name"] == "pg-three" and seen[-1].kind == "run_done"
        assert seen[-1].data["content"] == ANSWER
        assert ANSWER in "".join(c.choices[0].delta.content or "" for c in raw.parse() if c.choices)
        assert read_all(first, raw.headers["x-mom-progress-url"]) == seen
    finally:
        fake_server.open_gate(GATE)


def assert_progress_degraded(service: Service) -> None:
    report = httpx.get(f"{service.url}/health/detailed", headers=service.headers(), timeout=15).json()
    assert report["status"] == "degraded", report  # not an error: answers go on
    hub = report["components"]["progress"]
    assert hub["status"] == "degraded" and hub["backend"] == "redis" and hub["error"]
    assert "redis://" not in str(report)


def answered_with_progress_unavailable(service: Service, fake: FakeUpstream, what: str) -> None:
    configure(fake)
    for stream in (False, True):
        raw = client(service).chat.completions.with_raw_response.create(
            model="prog", messages=[{"role": "user", "content": f"While Redis is {what}?"}], stream=stream
        )
        body = raw.parse()
        if stream:
            assert "".join(c.choices[0].delta.content or "" for c in body if c.choices) == ANSWER  # type: ignore[union-attr]
        else:
            assert body.choices[0].message.content == ANSWER  # type: ignore[union-attr]
        response = httpx.get(service.url + raw.headers["x-mom-progress-url"], timeout=15)
        assert response.status_code == 503
        assert response.json()["error"]["code"] == "progress_unavailable"


def test_redis_frozen_or_gone_fails_no_answer(
    fake_server: FakeUpstream,
    start_service: StartService,
    own_redis: tuple[subprocess.Popen[bytes], redis.Redis],
) -> None:
    process, redis_client = own_redis
    service = start_service(config(fake_server), {"REDIS_URL": url_of(redis_client)})
    configure(fake_server)
    _, url, _, _ = ask(service)
    assert read_all(service, url)[-1].kind == "run_done"

    process.send_signal(signal.SIGSTOP)  # Redis hangs: its connections stay open, nothing answers
    try:
        answered_with_progress_unavailable(service, fake_server, "frozen")
        assert_progress_degraded(service)
    finally:
        process.send_signal(signal.SIGCONT)

    def followed_again() -> bool:  # back: after the back-off, runs are published and read again
        try:
            _, again, _, _ = ask(service)
            return read_all(service, again)[-1].kind == "run_done"
        except (AssertionError, openai.APIError):
            return False

    wait_until(followed_again, timeout=30)

    process.kill()  # Redis dies
    process.wait(5)
    answered_with_progress_unavailable(service, fake_server, "gone")
    assert_progress_degraded(service)
    assert 1 <= service.log().count(WARNING) <= 2  # logged at most once a minute (frozen, then gone)
