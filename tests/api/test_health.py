"""Health: liveness stays instant under load, readiness follows the database, the detailed report tells the truth
about every component (config, database, cache, progress, tracing, each LLM) and never reveals a secret or a URL."""

from __future__ import annotations

import asyncio
import statistics
import time
from datetime import datetime
from pathlib import Path
from typing import Any

import httpx
import pytest

from tests.conftest import FAKE_KEY, TOKEN, CallPath, Service, StartService, llm, panel_config
from tests.fake_upstream import FakeUpstream

MEMBERS = ("alpha", "beta", "gamma")
PANEL_LLMS = ("alpha", "beta", "gamma", "judge", "seer", "sloth", "catalog")
COMPONENTS = {
    *("config", "database", "cache", "progress", "tracing", "rate_limits"),
    *(f"llm:{name}" for name in PANEL_LLMS),
}
UNREACHABLE_POSTGRES = "postgresql+asyncpg://postgres@127.0.0.1:1/nowhere"


def get(service: Service, path: str, *, token: str | None = TOKEN, timeout: float = 30) -> httpx.Response:
    headers = service.headers(token) if token is not None else {}
    return httpx.get(f"{service.url}{path}", headers=headers, timeout=timeout)


def assert_reveals_nothing(response: httpx.Response, fake: FakeUpstream) -> None:
    text = response.text
    for secret in (FAKE_KEY, TOKEN, fake.base_url, fake.root_url, f"127.0.0.1:{fake.port}"):
        assert secret not in text
    for marker in ("://", "sqlite+aiosqlite", "postgresql+asyncpg", "nowhere", "Traceback"):
        assert marker not in text


def detailed(service: Service, fake: FakeUpstream, query: str = "", status: int = 200) -> dict[str, Any]:
    return validated(get(service, f"/health/detailed{query}"), fake, status)


def validated(response: httpx.Response, fake: FakeUpstream, status: int = 200) -> dict[str, Any]:
    """The body of a detailed report, checked: its status, its shape, and that it reveals nothing."""
    assert response.status_code == status, response.text
    assert response.headers["cache-control"] == "no-store"
    assert_reveals_nothing(response, fake)
    body: dict[str, Any] = response.json()
    assert set(body) == {"status", "components"}
    for component in body["components"].values():
        assert component["status"] in ("ok", "degraded", "error")
        assert isinstance(component["latency_ms"], float | int) and component["latency_ms"] >= 0
    return body


def hung(log: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Upstream calls the fake is holding open."""
    return [e for e in log if e["outcome"] in (None, "hung")]


# ----------------------------------------------------------------------------------------------- liveness


def test_liveness_and_readiness_need_no_token(service: Service) -> None:
    for path in ("/health", "/health/live"):
        response = get(service, path, token=None)
        assert response.status_code == 200
        assert response.json() == {"status": "ok"}
    ready = get(service, "/health/ready", token=None)
    assert ready.status_code == 200
    assert ready.json() == {"status": "ready"}


def test_detailed_needs_the_token(service: Service, start_service: StartService, fake_server: FakeUpstream) -> None:
    for token in (None, "wrong-token-123456"):
        response = get(service, "/health/detailed", token=token)
        assert response.status_code == 401
        assert response.json()["error"]["type"] == "authentication_error"
    closed = start_service(panel_config(fake_server), token=None)
    response = get(closed, "/health/detailed", token="anything-at-all")
    assert response.status_code == 503
    assert response.json()["error"]["code"] == "service_misconfigured"
    assert get(closed, "/health/ready", token=None).status_code == 200  # readiness is not behind the token


async def test_health_stays_instant_while_requests_hang(service: Service, fake: FakeUpstream) -> None:
    fake.configure({name: {"hang": True} for name in MEMBERS})
    body = {"model": "mom", "messages": [{"role": "user", "content": "Hang, please."}]}
    limits = httpx.Limits(max_connections=100, max_keepalive_connections=100)
    async with httpx.AsyncClient(timeout=60, limits=limits) as hanging:
        requests = [
            asyncio.create_task(
                hanging.post(f"{service.base_url}/chat/completions", headers=service.headers(), json=body)
            )
            for _ in range(50)
        ]
        try:
            # every request is inside the service, each waiting on its hanging members
            await asyncio.to_thread(fake.wait_for, lambda log: len(hung(log)) >= 3 * 50, 20)
            timings: list[float] = []
            async with httpx.AsyncClient(timeout=5) as probe:
                await probe.get(f"{service.url}/health")  # connect once
                for _ in range(20):
                    started = time.perf_counter()
                    response = await probe.get(f"{service.url}/health")
                    timings.append((time.perf_counter() - started) * 1000)
                    assert response.status_code == 200 and response.json() == {"status": "ok"}
            assert not any(task.done() for task in requests)  # they were hanging all along
        finally:
            for task in requests:
                task.cancel()
            await asyncio.gather(*requests, return_exceptions=True)
    assert statistics.median(timings) < 10, timings
    assert max(timings) < 100, timings
    # the clients left: the service cancelled every upstream call they had started
    await asyncio.to_thread(fake.wait_for, lambda log: not hung(log), 15)


# ----------------------------------------------------------------------------------------------- detailed


def test_detailed_ok_on_the_standard_panel(service: Service, fake: FakeUpstream, call_path: CallPath) -> None:
    body = detailed(service, fake)
    assert body["status"] == "ok"
    components = body["components"]
    assert set(components) == COMPONENTS
    assert all(c["status"] == "ok" for c in components.values())
    config = components["config"]
    assert config["demo"] is False
    assert config["mom_model_count"] == len(config["mom_models"]) == 7 and "mom" in config["mom_models"]
    assert config["llm_count"] == 7 and config["llms"] == list(PANEL_LLMS)
    database = components["database"]
    assert database["backend"] == "sqlite"
    assert database["schema_ready"] is True
    assert database["dropped"] == 0 and isinstance(database["queue_depth"], int)
    assert components["cache"] == {"status": "ok", "latency_ms": 0.0, "backend": "none"}
    assert components["tracing"] == {"status": "ok", "latency_ms": 0.0, "enabled": False}
    progress = components["progress"]
    assert progress["backend"] == "memory" and progress["max_runs"] == 1000 and isinstance(progress["runs"], int)
    limits = components["rate_limits"]  # no REDIS_URL: counted in this replica's memory
    assert (limits["status"], limits["backend"], limits["reason"]) == ("ok", "per_replica", "REDIS_URL is not set")
    alpha = components["llm:alpha"]
    # (circuit breakers are off in the shared test services: no `circuit` entry; see test_circuit_breaker.py)
    # alpha is served by an OpenAI-compatible server: the lean path, unless MOM_LEAN_CALLS=false
    expected = {
        "status": "ok",
        "configured": "openai/alpha",
        "client": call_path.name,
        "key": "present",
        "checked": False,
    }
    assert {k: v for k, v in alpha.items() if k != "latency_ms"} == expected
    assert components["llm:catalog"]["configured"] == "openai/gpt-4o-mini"
    assert components["llm:catalog"]["client"] == "litellm"  # OpenAI's catalog: LiteLLM adapts its parameters
    assert fake.log() == []  # no live call without check_llm


def test_check_llm_calls_every_llm_once_bounded_and_reports_failures(service: Service, fake: FakeUpstream) -> None:
    fake.configure(
        {
            "beta": {"status": 500, "error_message": f"beta is down at {fake.base_url} with key {FAKE_KEY}"},
            "sloth": {"hang": True},  # its timeout is 1 s
            # 0.6 s each: one after another the five would take 3 s, at once about 0.6 s
            **{name: {"ttft_ms": 600} for name in ("alpha", "gamma", "judge", "seer", "gpt-4o-mini")},
        }
    )
    started = time.monotonic()
    body = detailed(service, fake, "?check_llm=true")
    assert time.monotonic() - started < 5
    assert body["status"] == "degraded"
    components = body["components"]
    assert components["database"]["status"] == "ok"
    beta, sloth = components["llm:beta"], components["llm:sloth"]
    assert beta["status"] == "error" and beta["checked"] is True
    assert "beta is down" in beta["error"]
    assert sloth["status"] == "error" and "timed out after 1 s" in sloth["error"]
    assert 900 <= sloth["latency_ms"] < 3000
    for name in ("alpha", "gamma", "judge", "seer", "catalog"):
        assert components[f"llm:{name}"]["status"] == "ok"
        assert components[f"llm:{name}"]["checked"] is True
    pings = fake.log()
    assert sorted(e["model"] for e in pings) == sorted(["gpt-4o-mini" if n == "catalog" else n for n in PANEL_LLMS])
    alpha = next(e for e in pings if e["model"] == "alpha")
    assert alpha["body"]["messages"] == [{"role": "user", "content": "ping"}]
    assert alpha["body"]["max_tokens"] == 1
    # the calls ran concurrently: every one had arrived before the first slow one could answer
    arrivals = [e["received_at"] for e in pings]
    assert max(arrivals) - min(arrivals) < 0.5


async def test_check_llm_is_one_shared_run_reused_for_a_minute(
    start_service: StartService, fake: FakeUpstream, tmp_path: Path
) -> None:
    """`check_llm=true` bills a call to every LLM: reports asked for at once share one run (one call per LLM), a
    report within 60 s reuses its results and says how old they are; the rest of the report is checked every time."""
    database = tmp_path / "mom.db"
    checked = start_service(panel_config(fake), {"DATABASE_URL": f"sqlite+aiosqlite:///{database}"})
    fake.configure({"*": {"ttft_ms": 1000}, "sloth": {"hang": True}})  # every live call takes about 1 s
    try:
        await check_once_then_reuse(checked, fake, database)
    finally:
        fake.reset()  # slow calls are this test's: not for tests that use the fake without resetting it


async def check_once_then_reuse(checked: Service, fake: FakeUpstream, database: Path) -> None:
    url = f"{checked.url}/health/detailed?check_llm=true"
    async with httpx.AsyncClient(timeout=30) as client:

        async def report() -> tuple[float, httpx.Response]:
            started = time.monotonic()
            response = await client.get(url, headers=checked.headers())
            return time.monotonic() - started, response

        concurrent = await asyncio.gather(*(report() for _ in range(5)))
    # each of them waited for the run in flight (none was answered from a finished one)...
    assert all(took >= 0.5 for took, _ in concurrent), [took for took, _ in concurrent]
    # ...and that run made one call per LLM, not one per report
    calls = fake.log()
    assert sorted(e["model"] for e in calls) == sorted("gpt-4o-mini" if n == "catalog" else n for n in PANEL_LLMS)
    bodies = [validated(response, fake) for _, response in concurrent]
    for body in bodies:
        assert body["status"] == "degraded"  # sloth timed out
        for name in PANEL_LLMS:
            llm_report = body["components"][f"llm:{name}"]
            first = bodies[0]["components"][f"llm:{name}"]
            assert llm_report["checked"] is True
            assert llm_report["checked_at"] == first["checked_at"]  # one run
            assert 0 <= llm_report["checked_age_s"] < 60
        assert body["components"]["llm:alpha"]["status"] == "ok"
        assert "timed out after 1 s" in body["components"]["llm:sloth"]["error"]
    checked_at = bodies[0]["components"]["llm:alpha"]["checked_at"]
    assert abs(datetime.fromisoformat(checked_at).timestamp() - time.time()) < 30
    oldest = max(b["components"]["llm:alpha"]["checked_age_s"] for b in bodies)

    # within the minute: no call, the same results, older
    again = detailed(checked, fake, "?check_llm=true")
    assert len(fake.log()) == len(calls)
    alpha = again["components"]["llm:alpha"]
    assert alpha["checked_at"] == checked_at and alpha["checked_age_s"] >= oldest
    assert alpha["latency_ms"] == bodies[0]["components"]["llm:alpha"]["latency_ms"]
    assert again["components"]["database"]["status"] == "ok"

    # the database is checked anew on every report, while the LLMs' results are still reused
    moved = database.with_name("mom.db.moved")
    database.rename(moved)
    database.mkdir()
    try:
        down = detailed(checked, fake, "?check_llm=true", status=503)
        assert down["components"]["database"]["status"] == "error"
        assert down["components"]["llm:alpha"]["checked_at"] == checked_at
    finally:
        database.rmdir()
        moved.rename(database)
    assert detailed(checked, fake, "?check_llm=true")["components"]["database"]["status"] == "ok"
    assert len(fake.log()) == len(calls)


def test_missing_key_is_degraded_and_never_called(start_service: StartService, fake: FakeUpstream) -> None:
    config = panel_config(fake)
    config["llm_definitions"].append(llm("keyless", fake, api_key_env="SOME_UNSET_VAR"))
    keyless = start_service(config)
    for query in ("", "?check_llm=true"):
        body = detailed(keyless, fake, query)
        assert body["status"] == "degraded"
        component = body["components"]["llm:keyless"]
        assert component["status"] == "degraded"
        assert component["key"] == "missing" and component["checked"] is False
        # the variable is named in the start-up log, for the operator, not in a response a client can read
        assert component["error"] == "no API key: the environment variable its api_key_env names is not set"
        assert "SOME_UNSET_VAR" in keyless.log()
        assert body["components"]["llm:alpha"]["status"] == "ok"
        assert body["components"]["database"]["status"] == "ok"
    assert not [e for e in fake.log() if e["model"] == "keyless"]


def test_demo_config_is_reported_and_its_mock_panel_checks_offline(
    start_service: StartService, fake: FakeUpstream
) -> None:
    demo = start_service(None)
    body = detailed(demo, fake, "?check_llm=true")
    assert body["status"] == "ok"
    assert body["components"]["config"]["demo"] is True
    llms = {n: c for n, c in body["components"].items() if n.startswith("llm:")}
    assert len(llms) == body["components"]["config"]["llm_count"] == 4
    assert all(c["status"] == "ok" and c["checked"] and c["key"] == "not_needed" for c in llms.values())


# --------------------------------------------------------------------------------------------- database


def test_unreachable_database_is_an_error_but_the_service_answers(
    start_service: StartService, fake: FakeUpstream
) -> None:
    down = start_service(panel_config(fake), {"DATABASE_URL": UNREACHABLE_POSTGRES})
    try:
        check_database_down(down, fake)
    finally:
        # Its queued record cannot be written: a graceful stop would spend 15 s trying. Nothing to keep here.
        assert down.process is not None
        down.process.kill()
        down.process.wait(5)


def check_database_down(down: Service, fake: FakeUpstream) -> None:
    assert down.chat().status_code == 200  # answers do not need the database
    assert get(down, "/health", token=None).json() == {"status": "ok"}
    ready = get(down, "/health/ready", token=None)
    assert ready.status_code == 503
    assert ready.json() == {"status": "not_ready", "reason": "database unavailable"}
    assert_reveals_nothing(ready, fake)
    body = detailed(down, fake, status=503)
    assert body["status"] == "error"
    database = body["components"]["database"]
    assert database["status"] == "error" and database["error"]
    assert database["backend"] == "postgresql"
    assert database["schema_ready"] is False
    assert database["queue_depth"] >= 1  # the chat's record waits for the database
    assert body["components"]["llm:alpha"]["status"] == "ok"


def test_sqlite_file_gone_is_an_error_until_it_is_back(
    start_service: StartService, fake: FakeUpstream, tmp_path: Path
) -> None:
    folder = tmp_path / "db"
    database = folder / "mom.db"
    local = start_service(panel_config(fake), {"DATABASE_URL": f"sqlite+aiosqlite:///{database}"})
    assert get(local, "/health/ready", token=None).status_code == 200
    assert detailed(local, fake)["status"] == "ok"
    # Tests run as root, which ignores file modes: take the file away instead, and put a directory in its place.
    moved = folder / "mom.db.moved"
    database.rename(moved)
    database.mkdir()
    try:
        assert get(local, "/health", token=None).status_code == 200
        ready = get(local, "/health/ready", token=None)
        assert ready.status_code == 503 and ready.json()["status"] == "not_ready"
        body = detailed(local, fake, status=503)
        assert body["status"] == "error"
        assert body["components"]["database"]["status"] == "error"
        assert "missing" in body["components"]["database"]["error"]
    finally:
        database.rmdir()
        moved.rename(database)
    assert get(local, "/health/ready", token=None).json() == {"status": "ready"}
    assert detailed(local, fake)["status"] == "ok"


@pytest.mark.parametrize("path", ["/health", "/health/live", "/health/ready"])
def test_open_endpoints_say_nothing_more(service: Service, fake: FakeUpstream, path: str) -> None:
    response = get(service, path, token=None)
    assert set(response.json()) == {"status"}
    assert_reveals_nothing(response, fake)
