"""Our retries: transient errors only, backoff within the deadline, Retry-After honoured; attempts read from the
fake's log. LiteLLM's and the OpenAI client's own retries are off, so every attempt seen is one of ours."""

from __future__ import annotations

import time
from typing import Any

import orjson
import pytest

from tests.conftest import CallPath, Service, StartService, llm
from tests.fake_upstream import FakeUpstream

QUESTION = [{"role": "user", "content": "Try again?"}]


@pytest.fixture(scope="module")
def retrying(fake_server: FakeUpstream, start_service: StartService, call_path: CallPath) -> Service:
    config: dict[str, Any] = {
        "llm_definitions": [
            llm("steady", fake_server),
            llm("flaky", fake_server, retries=2, timeout=10),
            llm("once", fake_server, retries=0),
            llm("hasty", fake_server, retries=3, timeout=1),
            llm("closer", fake_server, retries=1),
        ],
        "models": [
            {"name": "flaky-panel", "llms_to_query": ["steady", "flaky"], "concluding_llm": "closer"},
            {"name": "once-panel", "llms_to_query": ["steady", "once"], "concluding_llm": "closer"},
            {"name": "hasty-panel", "llms_to_query": ["steady", "hasty"], "concluding_llm": "closer"},
            {"name": "hasty-judge-panel", "llms_to_query": ["steady"], "concluding_llm": "hasty"},
        ],
    }
    return start_service(config, call_path.env)


def attempts(fake: FakeUpstream, model: str) -> list[dict[str, Any]]:
    return [e for e in fake.log() if e["model"] == model]


def member(body: dict[str, Any], name: str) -> dict[str, Any]:
    found: dict[str, Any] = next(m for m in body["mom"]["members"] if m["name"] == name)
    return found


@pytest.mark.parametrize("status", [500, 502, 503, 429])
def test_transient_errors_are_retried_until_success(retrying: Service, fake: FakeUpstream, status: int) -> None:
    fake.configure({"flaky": {"status": status, "fail_times": 2, "text": "third time lucky"}})
    body = retrying.chat("flaky-panel", messages=QUESTION).json()
    assert member(body, "flaky")["status"] == "ok"
    assert len(attempts(fake, "flaky")) == 3  # two failures, then the answer


def test_connection_reset_is_retried(retrying: Service, fake: FakeUpstream) -> None:
    fake.configure({"flaky": {"reset_connection": True, "fail_times": 1}})
    body = retrying.chat("flaky-panel", messages=QUESTION).json()
    assert member(body, "flaky")["status"] == "ok"
    assert len(attempts(fake, "flaky")) == 2


@pytest.mark.parametrize("status", [400, 401, 403, 404, 422])
def test_client_errors_are_never_retried(
    retrying: Service, fake: FakeUpstream, status: int, call_path: CallPath
) -> None:
    fake.configure({"flaky": {"status": status}})
    body = retrying.chat("flaky-panel", messages=QUESTION).json()
    assert member(body, "flaky")["status"] == "error"
    assert member(body, "flaky")["reason"] == "http_error"
    # none of ours; on a 422 LiteLLM itself sends the request once more without the parameters the error names
    # (its drop_params behaviour); the lean path sends what the client asked for, once
    assert len(attempts(fake, "flaky")) == (2 if status == 422 and call_path.litellm else 1)


def test_retries_are_used_up_then_reported(retrying: Service, fake: FakeUpstream) -> None:
    fake.configure({"flaky": {"status": 503}})
    body = retrying.chat("flaky-panel", messages=QUESTION).json()
    assert member(body, "flaky")["status"] == "error"
    assert len(attempts(fake, "flaky")) == 3  # retries: 2


def test_retries_zero_means_one_attempt(retrying: Service, fake: FakeUpstream) -> None:
    fake.configure({"once": {"status": 503}})
    body = retrying.chat("once-panel", messages=QUESTION).json()
    assert member(body, "once")["status"] == "error"
    assert len(attempts(fake, "once")) == 1


def test_retry_after_is_honoured(retrying: Service, fake: FakeUpstream) -> None:
    fake.configure({"flaky": {"status": 429, "fail_times": 1, "retry_after": 0.6}})
    body = retrying.chat("flaky-panel", messages=QUESTION).json()
    assert member(body, "flaky")["status"] == "ok"
    first, second = attempts(fake, "flaky")
    assert second["received_at"] - first["received_at"] >= 0.6


def test_retry_after_beyond_the_deadline_is_not_waited_for(retrying: Service, fake: FakeUpstream) -> None:
    fake.configure({"hasty": {"status": 429, "retry_after": 30}})  # hasty's timeout is 1 s
    started = time.monotonic()
    body = retrying.chat("hasty-panel", messages=QUESTION).json()
    assert time.monotonic() - started < 3
    assert member(body, "hasty")["status"] == "error"
    assert len(attempts(fake, "hasty")) == 1


def test_retries_never_outlast_the_timeout(retrying: Service, fake: FakeUpstream) -> None:
    fake.configure({"hasty": {"status": 503, "error_delay_ms": 300}})  # 3 retries of 0.3 s each exceed 1 s
    started = time.monotonic()
    body = retrying.chat("hasty-panel", messages=QUESTION).json()
    elapsed = time.monotonic() - started
    assert member(body, "hasty")["status"] == "error"
    assert member(body, "hasty")["latency_ms"] < 1500
    assert elapsed < 4


@pytest.mark.parametrize("stream", [False, True])
def test_concluding_llm_is_retried_before_its_first_token(retrying: Service, fake: FakeUpstream, stream: bool) -> None:
    fake.configure({"closer": {"status": 503, "fail_times": 1, "text": "Concluded."}})
    response = retrying.chat("flaky-panel", messages=QUESTION, stream=stream)
    assert response.status_code == 200
    assert "Concluded." in response.text
    assert len(attempts(fake, "closer")) == 2


def test_a_stream_that_stalls_ends_at_the_timeout_with_an_error_event(retrying: Service, fake: FakeUpstream) -> None:
    # hasty concludes (timeout 1 s): two tokens, then nothing. The timeout bounds the whole stream; nothing is
    # retried once tokens went out.
    fake.configure({"hasty": {"text": "one two three four", "hang_after_tokens": 2}})
    started = time.monotonic()
    frames = [p for _, p in retrying.sse({"model": "hasty-judge-panel", "messages": QUESTION, "stream": True})]
    elapsed = time.monotonic() - started
    assert frames[-1] == "[DONE]"
    error = orjson.loads(frames[-2])["error"]
    assert error["code"] == "concluding_failed" and "timed out after 1 s" in error["message"]
    content = "".join(
        orjson.loads(f)["choices"][0]["delta"].get("content") or "" for f in frames[:-2] if orjson.loads(f)["choices"]
    )
    assert content == "one two "
    assert elapsed < 4
    assert len(attempts(fake, "hasty")) == 1
    fake.wait_for(lambda log: any(e["model"] == "hasty" and e["outcome"] == "disconnected" for e in log))
