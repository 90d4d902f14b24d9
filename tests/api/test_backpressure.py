"""Back-pressure: a cap on chat requests in flight, a per-token rate limit, and a usage queue that drops, never waits.

The services are this module's own (the limits are per process), over one member and one concluding LLM served by
the fake upstream under names no other module uses. The capacity and rate-limit tests share one service with both
limits; they use different tokens, so that neither spends the other's budget.
"""

from __future__ import annotations

import socket
import threading
import time
from collections.abc import Callable, Iterator
from typing import Any

import httpx
import openai
import pytest
from prometheus_client.parser import text_string_to_metric_families

from tests.conftest import TOKEN, Service, StartService, free_port, llm, wait_until
from tests.fake_upstream import FakeUpstream
from tests.openai_schema import validate

QUESTION = [{"role": "user", "content": "Is anyone there?"}]
MEMBER, JUDGE = "bp-member", "bp-judge"
TOKEN_A, TOKEN_B = "tok-a-123456", "tok-b-123456"
MEMBER_TTFT_MS = 5000  # how long the requests holding the service's capacity stay in flight


def config(fake: FakeUpstream) -> dict[str, Any]:
    return {
        "llm_definitions": [llm(name, fake, retries=0, timeout=20) for name in (MEMBER, JUDGE)],
        "models": [{"name": "bp", "llms_to_query": [MEMBER], "concluding_llm": JUDGE}],
    }


@pytest.fixture(scope="module")
def limited(fake_server: FakeUpstream, start_service: StartService) -> Service:
    """Two chat requests at once; three a minute per token (the standard test token, A and B)."""
    env = {"MOM_MAX_IN_FLIGHT": "2", "MOM_RATE_LIMIT_RPM": "3"}
    return start_service(config(fake_server), env, token=f"{TOKEN},{TOKEN_A},{TOKEN_B}")


def post_chat(service: Service, token: str = TOKEN, timeout: float = 10, **extra: Any) -> httpx.Response:
    return httpx.post(
        f"{service.base_url}/chat/completions",
        headers=service.headers(token),
        json={"model": "bp", "messages": QUESTION, **extra},
        timeout=timeout,
    )


def sdk(service: Service, token: str = TOKEN) -> openai.OpenAI:
    return openai.OpenAI(base_url=service.base_url, api_key=token, max_retries=0, timeout=10)


def upstream_calls(fake: FakeUpstream, model: str) -> list[dict[str, Any]]:
    return [e for e in fake.log() if e["model"] == model]


def metric(service: Service, name: str) -> float:
    """The value of an unlabelled sample in `/metrics`."""
    response = httpx.get(f"{service.url}/metrics", headers=service.headers(), timeout=10)
    assert response.status_code == 200, response.text
    for family in text_string_to_metric_families(response.text):
        for sample in family.samples:
            if sample.name == name and not sample.labels:
                return float(sample.value)
    raise AssertionError(f"{name} not in /metrics")


def error_body(response: httpx.Response, status: int, error_type: str, code: str) -> dict[str, Any]:
    assert response.status_code == status, response.text
    assert response.headers["content-type"].startswith("application/json")
    body: dict[str, Any] = response.json()
    validate(body, "ErrorResponse")
    assert body["error"]["type"] == error_type and body["error"]["code"] == code, body
    return body


def in_thread(target: Callable[[], Any]) -> tuple[threading.Thread, dict[str, Any]]:
    """Run `target` in a started daemon thread; its result (or exception) lands in the returned dict."""
    outcome: dict[str, Any] = {}

    def run() -> None:
        try:
            outcome["result"] = target()
        except BaseException as exc:
            outcome["error"] = exc

    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    return thread, outcome


def finished(thread: threading.Thread, outcome: dict[str, Any]) -> Any:
    thread.join(30)
    assert not thread.is_alive(), "request still running after 30 s"
    if "error" in outcome:
        raise outcome["error"]
    return outcome["result"]


# ------------------------------------------------------------------------------------------- over capacity


def test_over_capacity_is_refused_at_once_and_probes_still_answer(limited: Service, fake: FakeUpstream) -> None:
    service = limited
    fake.configure({MEMBER: {"ttft_ms": MEMBER_TTFT_MS, "text": "Slowly."}})

    def streamed() -> tuple[int, str]:
        with (
            httpx.Client(timeout=30) as client,
            client.stream(
                "POST",
                f"{service.base_url}/chat/completions",
                headers=service.headers(),
                json={"model": "bp", "messages": QUESTION, "stream": True},
            ) as response,
        ):
            return response.status_code, response.read().decode()

    holders = [in_thread(lambda: post_chat(service, timeout=30)), in_thread(streamed)]
    try:
        # both are in flight: each has its member call hanging on the fake's time to first token
        fake.wait_for(lambda log: len([e for e in log if e["model"] == MEMBER]) == 2, timeout=10)

        started = time.monotonic()
        refused = post_chat(service, stream=True)
        assert time.monotonic() - started < 2
        body = error_body(refused, 429, "requests", "over_capacity")
        assert refused.headers["retry-after"] == "1"
        assert "2 requests at once" in body["error"]["message"]

        with pytest.raises(openai.RateLimitError) as raised:
            sdk(service).chat.completions.create(model="bp", messages=QUESTION)  # type: ignore[arg-type]
        assert raised.value.status_code == 429 and raised.value.code == "over_capacity"
        assert raised.value.response.headers["retry-after"] == "1"

        # probes, metrics and the model list are never refused
        for path in ("/health", "/health/ready", "/health/detailed", "/v1/models"):
            response = httpx.get(f"{service.url}{path}", headers=service.headers(), timeout=10)
            assert response.status_code == 200, (path, response.text)
        assert metric(service, "mom_requests_in_flight") == 2
        # still held: every check above ran while the two requests were being answered
        assert all(thread.is_alive() for thread, _ in holders)
    finally:
        results = [finished(thread, outcome) for thread, outcome in holders]

    answered, (stream_status, stream_text) = results
    assert answered.status_code == 200, answered.text
    assert answered.json()["choices"][0]["message"]["content"] == "Answer from bp-judge."
    assert stream_status == 200
    assert stream_text.endswith("data: [DONE]\n\n")
    assert '"finish_reason":"stop"' in stream_text

    # the refused requests never reached an upstream
    assert len(upstream_calls(fake, MEMBER)) == 2 and len(upstream_calls(fake, JUDGE)) == 2

    # capacity is back once the two responses are done (the gauge is counted outside the admission count);
    # this is the token's third chat request in the minute: the two refused ones spent none of its budget
    wait_until(lambda: metric(service, "mom_requests_in_flight") == 0)
    fake.configure({MEMBER: {}})
    assert post_chat(service).status_code == 200
    assert len(upstream_calls(fake, MEMBER)) == 3


# ------------------------------------------------------------------------------------------ per-token RPM


def test_rate_limit_is_per_token_and_a_wrong_token_spends_nothing(limited: Service, fake: FakeUpstream) -> None:
    service = limited

    for _ in range(3):
        assert post_chat(service, TOKEN_A).status_code == 200
    refused = post_chat(service, TOKEN_A)
    body = error_body(refused, 429, "requests", "rate_limit_exceeded")
    retry_after = int(refused.headers["retry-after"])
    assert 1 <= retry_after <= 60
    assert refused.headers["x-ratelimit-limit-requests"] == "3"
    assert refused.headers["x-ratelimit-remaining-requests"] == "0"
    assert refused.headers["x-ratelimit-reset-requests"] == f"{retry_after}s"
    assert "3 requests per minute" in body["error"]["message"]
    assert TOKEN_A not in refused.text

    with pytest.raises(openai.RateLimitError) as raised:
        sdk(service, TOKEN_A).chat.completions.create(model="bp", messages=QUESTION)  # type: ignore[arg-type]
    assert raised.value.code == "rate_limit_exceeded"

    # token B has a budget of its own
    assert post_chat(service, TOKEN_B).status_code == 200
    # a wrong token is turned away by authentication, however often, and spends no budget
    for _ in range(4):
        error_body(post_chat(service, "tok-c-123456"), 401, "authentication_error", "invalid_api_key")
    for _ in range(2):
        assert post_chat(service, TOKEN_B).status_code == 200
    error_body(post_chat(service, TOKEN_B), 429, "requests", "rate_limit_exceeded")

    # three answers for each token; the refused and unauthenticated requests never reached an upstream
    assert len(upstream_calls(fake, MEMBER)) == 6 and len(upstream_calls(fake, JUDGE)) == 6


# ------------------------------------------------------------------------------------ the usage queue full


@pytest.fixture
def silent_database() -> Iterator[socket.socket]:
    """A port that refuses connections until `listen()` is called, then accepts them and never answers."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", free_port()))
        yield sock


def test_a_full_usage_queue_drops_records_and_never_holds_an_answer(
    fake: FakeUpstream, start_service: StartService, silent_database: socket.socket
) -> None:
    # tests/api/test_metrics.py counts the drops on a database that fails at once; here the writer is stuck in a
    # write that never ends (as on a database that stopped answering) and every answer must still come at once
    port = silent_database.getsockname()[1]
    service = start_service(
        config(fake), {"DATABASE_URL": f"postgresql+asyncpg://u@127.0.0.1:{port}/x", "MOM_USAGE_QUEUE_SIZE": "2"}
    )
    try:
        silent_database.listen(64)  # start-up found the port closed and started without the database
        sent = 20
        for _ in range(sent):
            started = time.monotonic()
            response = post_chat(service)
            assert response.status_code == 200, response.text
            assert time.monotonic() - started < 5  # the stuck write lasts 60 s (asyncpg's connect timeout)

        # one record held by the stuck writer, two in the queue, the rest dropped and counted
        depth, dropped = metric(service, "mom_usage_queue_depth"), metric(service, "mom_usage_records_dropped_total")
        assert depth + dropped == sent
        assert depth <= 3 and dropped >= sent - 3
        detailed = httpx.get(f"{service.url}/health/detailed", headers=service.headers(), timeout=10)
        assert detailed.status_code == 503  # the database, a critical component, does not answer
        database = detailed.json()["components"]["database"]
        assert database["status"] == "error" and "no answer within" in database["error"]
        assert database["dropped"] == dropped and database["queue_depth"] == depth
        assert "usage queue full" in service.log()
    finally:
        # the records can never be written: a graceful stop would spend its whole drain period on them
        assert service.process is not None
        service.process.kill()
        service.process.wait(10)
