"""Graceful shutdown of `mom-service serve`: SIGTERM drains the answers in flight, then the process exits 0.

Each test starts its own service process (and signals it itself), over the standard panel whose concluding
LLM streams slowly, so that answers are still running when the signal arrives.
"""

from __future__ import annotations

import json
import signal
import sqlite3
import subprocess
import time
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any

import httpx
import pytest

from tests.conftest import Service, StartService, panel_config, sse_payloads, wait_until
from tests.fake_upstream import FakeUpstream

QUESTION = [{"role": "user", "content": "Drain me."}]
CLIENT_TIMEOUT = httpx.Timeout(30.0, connect=5.0)


def words(count: int) -> str:
    return " ".join(f"w{i}" for i in range(count))


@dataclass
class Answer:
    """What one client saw: status, X-Request-ID, and either the SSE frames or the JSON body."""

    status: int = 0
    request_id: str = ""
    headers: dict[str, str] = field(default_factory=dict)
    frames: list[str] = field(default_factory=list)
    body: Any = None
    error: str | None = None  # the transport error that ended the exchange, if any
    ended_at: float = 0.0

    @property
    def chunks(self) -> list[dict[str, Any]]:
        return [json.loads(f) for f in self.frames if f != "[DONE]"]

    @property
    def content(self) -> str:
        return "".join(
            c["choices"][0]["delta"].get("content") or "" for c in self.chunks if c.get("choices") and "error" not in c
        )


def stream(service: Service, model: str = "mom") -> Answer:
    """A streaming chat request, read to its end (or until the connection breaks)."""
    answer = Answer()
    body = {"model": model, "messages": QUESTION, "stream": True, "stream_options": {"include_usage": True}}
    try:
        with (
            httpx.Client(timeout=CLIENT_TIMEOUT) as client,
            client.stream("POST", f"{service.base_url}/chat/completions", headers=service.headers(), json=body) as r,
        ):
            answer.status, answer.headers = r.status_code, dict(r.headers)
            answer.request_id = r.headers.get("x-request-id", "")
            if r.status_code != 200:
                answer.body = json.loads(r.read())
                return answer
            for payload in sse_payloads(r):
                answer.frames.append(payload)
    except httpx.HTTPError as exc:
        answer.error = f"{type(exc).__name__}: {exc}"
    finally:
        answer.ended_at = time.monotonic()
    return answer


def complete(service: Service, model: str = "mom") -> Answer:
    """A non-streaming chat request."""
    answer = Answer()
    try:
        r = httpx.post(
            f"{service.base_url}/chat/completions",
            headers=service.headers(),
            json={"model": model, "messages": QUESTION},
            timeout=CLIENT_TIMEOUT,
        )
        answer.status, answer.headers, answer.body = r.status_code, dict(r.headers), r.json()
        answer.request_id = r.headers.get("x-request-id", "")
    except httpx.HTTPError as exc:
        answer.error = f"{type(exc).__name__}: {exc}"
    finally:
        answer.ended_at = time.monotonic()
    return answer


def rows(service: Service, query: str, *params: Any) -> list[sqlite3.Row]:
    with sqlite3.connect(service.workdir / "data" / "mom.db") as conn:
        conn.row_factory = sqlite3.Row
        return list(conn.execute(query, params).fetchall())


def requests_by_id(service: Service) -> dict[str, sqlite3.Row]:
    return {row["id"]: row for row in rows(service, "SELECT * FROM mom_requests")}


def calls_of(service: Service, request_id: str) -> list[sqlite3.Row]:
    return rows(service, "SELECT * FROM mom_calls WHERE request_id = ? ORDER BY role, llm", request_id)


def streaming_judges(entries: list[dict[str, Any]], min_tokens: int = 1) -> int:
    """How many concluding calls (the fake's log entries) have streamed at least `min_tokens` tokens."""
    return sum(1 for e in entries if e["model"] == "judge" and (e["tokens_sent"] or 0) >= min_tokens)


def process_of(service: Service) -> subprocess.Popen[bytes]:
    assert service.process is not None
    return service.process


def wait_for_log(service: Service, text: str, timeout: float = 15.0) -> float:
    """Poll the service's log until `text` appears; return when it was seen (time.monotonic())."""
    wait_until(lambda: text in service.log(), timeout=timeout)
    return time.monotonic()


# uvicorn's last line: the shutdown is over (records written, traces flushed). The interpreter's own teardown comes
# after it, and takes seconds of its own on a loaded machine (LiteLLM's modules), so the exit is bounded loosely.
FINISHED = "Finished server process"


def results(futures: list[Future[Answer]], timeout: float) -> list[Answer]:
    return [f.result(timeout=timeout) for f in futures]


@pytest.mark.slow
def test_sigterm_drains_answers_in_flight_then_exits(fake: FakeUpstream, start_service: StartService) -> None:
    """Every answer in flight at SIGTERM completes in full; meanwhile the service says it is going away."""
    text = words(40)
    fake.configure({"judge": {"text": text, "token_delay_ms": 100}})  # each answer streams for ~4 s
    service = start_service(panel_config(fake))
    process = process_of(service)
    streams, plain = 10, 3
    with ThreadPoolExecutor(streams + plain) as pool:
        stream_futures = [pool.submit(stream, service) for _ in range(streams)]
        plain_futures = [pool.submit(complete, service) for _ in range(plain)]
        # every request is in flight: its concluding call is streaming tokens
        fake.wait_for(lambda entries: streaming_judges(entries) == streams + plain, timeout=20)
        process.send_signal(signal.SIGTERM)
        signalled = time.monotonic()

        # while draining: not ready, new chat requests refused, alive, and the socket still accepts connections
        wait_until(lambda: httpx.get(f"{service.url}/health/ready", timeout=5).status_code == 503, timeout=5)
        probes = 0
        while time.monotonic() - signalled < 1.5 and not all(f.done() for f in stream_futures + plain_futures):
            ready = httpx.get(f"{service.url}/health/ready", timeout=5)
            assert ready.status_code == 503
            assert ready.json() == {"status": "not_ready", "reason": "shutting down"}
            assert httpx.get(f"{service.url}/health", timeout=5).status_code == 200
            assert httpx.get(f"{service.url}/health/live", timeout=5).status_code == 200
            refused = service.chat("mom", messages=QUESTION)
            assert refused.status_code == 503, refused.text
            assert refused.json()["error"]["type"] == "service_unavailable"
            assert refused.json()["error"]["code"] == "shutting_down"
            assert refused.headers["retry-after"] == "1"
            assert refused.headers["connection"] == "close"
            refused_stream = stream(service)
            assert refused_stream.status == 503
            assert refused_stream.body["error"]["code"] == "shutting_down"
            probes += 1
            time.sleep(0.2)
        assert probes >= 2, "the answers ended before the drain could be observed"
        assert any(not f.done() for f in stream_futures), "the drain was not observed while answers were running"

        answered_streams = results(stream_futures, timeout=30)
        answered_plain = results(plain_futures, timeout=30)

    # every stream completed in full: content, a finish_reason chunk, the usage chunk, [DONE]; no error event
    for answer in answered_streams:
        assert answer.error is None, answer.error
        assert answer.status == 200
        assert answer.frames[-1] == "[DONE]", answer.frames[-3:]
        assert not any("error" in c for c in answer.chunks), answer.frames[-3:]
        assert answer.content == text
        assert [c["choices"][0]["finish_reason"] for c in answer.chunks if c["choices"]][-1] == "stop"
        assert answer.chunks[-1]["usage"]["completion_tokens"] > 0
    for answer in answered_plain:
        assert answer.error is None, answer.error
        assert answer.status == 200, answer.body
        assert answer.body["choices"][0]["message"]["content"] == text
        assert answer.body["choices"][0]["finish_reason"] == "stop"

    # then the service stops promptly (well before the 20 s grace period), and the process exits with status 0
    finished = wait_for_log(service, FINISHED)
    last_answer = max(a.ended_at for a in answered_streams + answered_plain)
    assert finished - last_answer < 5, (finished - last_answer, service.log())
    assert finished - signalled < 15, service.log()
    assert process.wait(20) == 0, service.log()

    # one `ok` record per answer, keyed by the X-Request-ID the client saw; no record for the refused requests
    answered = answered_streams + answered_plain
    records = requests_by_id(service)
    assert set(records) == {a.request_id for a in answered}
    assert len(records) == streams + plain
    for answer in answered:
        record = records[answer.request_id]
        assert record["status"] == "ok"
        assert bool(record["stream"]) == (answer in answered_streams)
        usage = answer.chunks[-1]["usage"] if record["stream"] else answer.body["usage"]
        assert (record["prompt_tokens"], record["completion_tokens"]) == (
            usage["prompt_tokens"],
            usage["completion_tokens"],
        )
        calls = calls_of(service, answer.request_id)
        assert [(c["llm"], c["status"]) for c in calls] == [
            ("judge", "ok"),
            ("alpha", "ok"),
            ("beta", "ok"),
            ("gamma", "ok"),
        ]
    log = service.log()
    assert f"waiting up to 20 s for {streams + plain} answer(s) in flight" in log
    assert f"Usage records written: {streams + plain}, dropped: 0" in log
    assert "Grace period" not in log


@pytest.mark.slow
def test_grace_period_over_cuts_answers_off(fake: FakeUpstream, start_service: StartService) -> None:
    """Answers still running when the grace period ends: streams end in OpenAI's error shape, waits get a 500; both
    say `cut_off_by_shutdown`, never the 503 `shutting_down` of a refusal (which a load balancer sends elsewhere,
    running again a panel already paid for)."""
    fake.configure(
        {
            "judge": {"text": words(40), "token_delay_ms": 150},  # each answer would stream for ~6 s
            "gpt-4o-mini": {"ttft_ms": 10_000},  # mom-catalog's only member: its answer is far off
        }
    )
    service = start_service(panel_config(fake), {"MOM_SHUTDOWN_GRACE_SECONDS": "1"})
    process = process_of(service)
    streams = 4
    with ThreadPoolExecutor(streams + 2) as pool:
        stream_futures = [pool.submit(stream, service) for _ in range(streams)]
        waiting_judge = pool.submit(complete, service)  # waiting while the concluding LLM streams
        waiting_member = pool.submit(complete, service, "mom-catalog")  # waiting for its panel
        fake.wait_for(
            lambda entries: (
                streaming_judges(entries, min_tokens=3) == streams + 1
                and any(e["model"] == "gpt-4o-mini" for e in entries)
            ),
            timeout=20,
        )
        process.send_signal(signal.SIGTERM)
        signalled = time.monotonic()
        answered_streams = results(stream_futures, timeout=20)
        plain = results([waiting_judge, waiting_member], timeout=20)

    for answer in answered_streams:
        assert answer.error is None, answer.error  # not a cut connection
        assert answer.status == 200
        assert answer.frames[-1] == "[DONE]", answer.frames[-3:]
        last = json.loads(answer.frames[-2])
        assert last["error"]["code"] == "cut_off_by_shutdown", last
        assert last["error"]["type"] == "server_error", last
        assert "paid" in last["error"]["message"], last
        assert sum("error" in c for c in answer.chunks) == 1
        assert not any(c["choices"][0]["finish_reason"] for c in answer.chunks if c.get("choices"))
        assert answer.content, "some of the answer was streamed before the cut-off"
        assert 0.8 <= answer.ended_at - signalled < 4, answer.ended_at - signalled  # after the grace period
    for answer in plain:
        assert answer.error is None, answer.error
        assert answer.status == 500, answer.body
        assert answer.body["error"]["code"] == "cut_off_by_shutdown"
        assert answer.body["error"]["type"] == "server_error"
        assert "ended by the service's shutdown" in answer.body["error"]["message"]
        assert "paid" in answer.body["error"]["message"]
        assert "retry-after" not in answer.headers  # not an invitation to send it again
        assert answer.headers["connection"] == "close"
        assert 0.8 <= answer.ended_at - signalled < 4, answer.ended_at - signalled

    assert process.wait(15) == 0, service.log()

    # every request has its record, cancelled, with the calls it made
    records = requests_by_id(service)
    every = [*answered_streams, *plain]
    assert set(records) == {a.request_id for a in every}
    for answer in [*answered_streams, plain[0]]:
        record = records[answer.request_id]
        assert record["status"] == "cancelled"
        calls = {c["llm"]: c for c in calls_of(service, answer.request_id)}
        assert set(calls) == {"alpha", "beta", "gamma", "judge"}
        assert all(calls[m]["status"] == "ok" for m in ("alpha", "beta", "gamma"))
        judge = calls["judge"]
        assert (judge["role"], judge["status"], judge["error_type"]) == ("concluding", "cancelled", "cancelled")
        assert judge["completion_tokens"] > 0  # what was streamed is counted (and paid for)
        assert judge["usage_estimated"]
        assert judge["cost_pico"] > 0
        assert record["completion_tokens"] >= judge["completion_tokens"]
        if answer.frames:  # a stream: at least what the client received is counted (each word a token or more)
            assert judge["completion_tokens"] >= len(answer.content.split())
    assert records[plain[1].request_id]["status"] == "cancelled"
    member_calls = calls_of(service, plain[1].request_id)
    assert [(c["llm"], c["role"], c["status"]) for c in member_calls] == [("catalog", "member", "cancelled")]
    log = service.log()
    assert f"ending {streams + 2} answer(s) still in flight with a cut_off_by_shutdown error" in log
    assert f"Usage records written: {streams + 2}, dropped: 0" in log


@pytest.mark.slow
def test_idle_sigterm_exits_promptly(fake: FakeUpstream, start_service: StartService) -> None:
    service = start_service(panel_config(fake))
    assert service.chat("mom", messages=QUESTION).status_code == 200
    process = process_of(service)
    started = time.monotonic()
    process.send_signal(signal.SIGTERM)
    assert wait_for_log(service, FINISHED, timeout=10) - started < 5, service.log()
    assert process.wait(15) == 0, service.log()
    assert time.monotonic() - started < 15
    log = service.log()
    assert "waiting up to" not in log  # nothing in flight: no drain to wait for
    assert "Usage records written: 1, dropped: 0" in log


@pytest.mark.slow
def test_second_sigterm_stops_without_waiting(fake: FakeUpstream, start_service: StartService) -> None:
    """A second SIGTERM during the drain ends it: the process exits soon, answers cancelled, records written."""
    fake.configure({"judge": {"text": words(60), "token_delay_ms": 150}})  # each answer would stream for ~9 s
    service = start_service(panel_config(fake))  # grace period: the default 20 s
    process = process_of(service)
    streams = 3
    with ThreadPoolExecutor(streams) as pool:
        futures = [pool.submit(stream, service) for _ in range(streams)]
        fake.wait_for(lambda entries: streaming_judges(entries) == streams, timeout=20)
        process.send_signal(signal.SIGTERM)
        wait_until(lambda: httpx.get(f"{service.url}/health/ready", timeout=5).status_code == 503, timeout=5)
        process.send_signal(signal.SIGTERM)
        second = time.monotonic()
        # uvicorn's own shutdown: 1 s for the answers to end, then they are cancelled (and recorded as such)
        assert wait_for_log(service, FINISHED, timeout=15) - second < 6, service.log()
        assert process.wait(15) == 0, service.log()
        answers = results(futures, timeout=15)

    for answer in answers:  # cut short: none of them got its whole answer
        assert answer.status == 200
        assert answer.content
        assert not any(c["choices"][0]["finish_reason"] for c in answer.chunks if c.get("choices"))
        # uvicorn cancels them: the connection is cut, or they end with the cut-off error event
        assert answer.error is not None or json.loads(answer.frames[-2])["error"]["code"] == "cut_off_by_shutdown"
    records = requests_by_id(service)
    assert set(records) == {a.request_id for a in answers}
    assert {r["status"] for r in records.values()} == {"cancelled"}
    assert f"Usage records written: {streams}, dropped: 0" in service.log()
