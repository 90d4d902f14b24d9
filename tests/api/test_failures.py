"""Upstream failures: one member, all members, the concluding LLM, timeouts, and clients that leave."""

from __future__ import annotations

import threading
import time
from typing import Any

import httpx
import openai
import orjson
import pytest

from tests.conftest import TOKEN, Service, StartService, llm
from tests.fake_upstream import FakeUpstream
from tests.openai_schema import validate

QUESTION = [{"role": "user", "content": "Tell me something."}]


def test_one_member_failing_is_reported_and_the_rest_synthesized(service: Service, fake: FakeUpstream) -> None:
    fake.configure({"beta": {"status": 500, "error_message": "beta is down"}, "judge": {"text": "Synthesis."}})
    response = service.chat(messages=QUESTION)
    assert response.status_code == 200
    body = response.json()
    validate(body, "CreateChatCompletionResponse")
    members = {m["name"]: m for m in body["mom"]["members"]}
    assert members["beta"]["status"] == "error"
    assert "beta is down" in members["beta"]["error"]
    assert members["beta"]["usage"] is None
    assert members["alpha"]["status"] == members["gamma"]["status"] == "ok"
    assert body["mom"]["degraded"] is True and body["mom"]["answered"] == 2
    # the failure is named to the concluding LLM, and the usage adds only the calls that answered
    judge = next(e for e in fake.log() if e["model"] == "judge")
    assert 'name="beta" status="error"' in judge["body"]["messages"][-1]["content"]
    assert (
        body["usage"]["total_tokens"]
        == sum(m["usage"]["total_tokens"] for m in body["mom"]["members"] if m["usage"])
        + (body["mom"]["concluding"]["usage"]["total_tokens"])
    )
    # a 500 is transient: tried once more (the default `retries: 1`), then reported
    assert len([e for e in fake.log() if e["model"] == "beta"]) == 2


@pytest.mark.parametrize("stream", [False, True])
def test_all_members_failing_is_a_502(service: Service, fake: FakeUpstream, stream: bool) -> None:
    fake.configure(
        {name: {"status": 503, "error_message": f"{name} overloaded"} for name in ("alpha", "beta", "gamma")}
    )
    response = service.chat(messages=QUESTION, stream=stream)
    assert response.status_code == 502
    body = response.json()
    validate(body, "ErrorResponse")
    assert body["error"]["code"] == "members_failed"
    assert body["error"]["type"] == "upstream_error"
    assert "alpha overloaded" in body["error"]["message"]
    assert not [e for e in fake.log() if e["model"] == "judge"]  # no synthesis of nothing


def test_all_members_failing_through_the_sdk(service: Service, fake: FakeUpstream) -> None:
    fake.configure({name: {"status": 500} for name in ("alpha", "beta", "gamma")})
    client = openai.OpenAI(base_url=service.base_url, api_key=TOKEN, max_retries=0)
    with pytest.raises(openai.APIStatusError) as info:
        client.chat.completions.create(model="mom", messages=QUESTION)  # type: ignore[arg-type]
    assert info.value.status_code == 502


@pytest.mark.parametrize("stream", [False, True])
def test_concluding_failing_before_answering_is_a_502(service: Service, fake: FakeUpstream, stream: bool) -> None:
    fake.configure({"judge": {"status": 500, "error_message": "judge crashed"}})
    response = service.chat(messages=QUESTION, stream=stream)
    assert response.status_code == 502
    body = response.json()
    validate(body, "ErrorResponse")
    assert body["error"]["code"] == "concluding_failed"
    assert "judge crashed" in body["error"]["message"]


def failed_stream(response: httpx.Response) -> tuple[dict[str, Any], str]:
    """(the error event, the content streamed before it) of a 200 stream that ended with an error then [DONE]."""
    assert response.status_code == 200
    frames = [f.removeprefix("data: ") for f in response.text.split("\n\n") if f.strip()]
    assert frames[-1] == "[DONE]"
    error: dict[str, Any] = orjson.loads(frames[-2])
    validate(error, "ErrorResponse")
    chunks = [orjson.loads(f) for f in frames[:-2]]
    return error, "".join(c["choices"][0]["delta"].get("content") or "" for c in chunks if c.get("choices"))


def test_concluding_failing_mid_stream_ends_with_an_error_event_then_done(service: Service, fake: FakeUpstream) -> None:
    fake.configure({"judge": {"text": "one two three four five six", "stop_after_tokens": 3, "token_delay_ms": 100}})
    error, content = failed_stream(service.chat(messages=QUESTION, stream=True))
    assert error["error"]["code"] == "concluding_failed"
    assert content == "one two three "


def test_concluding_failing_mid_stream_through_the_sdk(service: Service, fake: FakeUpstream) -> None:
    # the connection dies when the third token is due: what came before it was delivered (aiohttp, on the lean
    # path, drops what it has buffered when the connection's loss arrives before the data is read)
    fake.configure({"judge": {"text": "one two three four five six", "stop_after_tokens": 2, "token_delay_ms": 100}})
    client = openai.OpenAI(base_url=service.base_url, api_key=TOKEN, max_retries=0)
    stream = client.chat.completions.create(model="mom", messages=QUESTION, stream=True)  # type: ignore[arg-type]
    parts = []
    with pytest.raises(openai.APIError):
        for chunk in stream:
            if chunk.choices:
                parts.append(chunk.choices[0].delta.content or "")
    assert "".join(parts) == "one two "


def test_member_timing_out_is_reported_within_its_timeout(service: Service, fake: FakeUpstream) -> None:
    fake.configure({"sloth": {"hang": True}, "alpha": {"text": "Fast answer."}})
    started = time.monotonic()
    response = service.chat(messages=QUESTION, model="mom-slow-member")
    elapsed = time.monotonic() - started
    assert response.status_code == 200
    members = {m["name"]: m for m in response.json()["mom"]["members"]}
    assert members["sloth"]["status"] == "error"
    assert "timed out" in members["sloth"]["error"]
    assert members["alpha"]["status"] == "ok"
    assert elapsed < 5  # the sloth's timeout is 1 s
    # the hung upstream call was abandoned, not left open
    fake.wait_for(lambda log: any(e["model"] == "sloth" and e["outcome"] == "disconnected" for e in log))


def test_all_members_hanging_answers_502_within_the_timeout(service: Service, fake: FakeUpstream) -> None:
    fake.configure({"sloth": {"hang": True}, "alpha": {"status": 500}})
    started = time.monotonic()
    response = service.chat(messages=QUESTION, model="mom-slow-member", stream=True)
    assert response.status_code == 502
    assert response.json()["error"]["code"] == "members_failed"
    assert time.monotonic() - started < 5


def _disconnect_after(service: Service, body: dict[str, Any], seconds: float) -> None:
    """Send a request and drop the connection after `seconds`, like a user closing the tab."""

    def run() -> None:
        try:
            with httpx.Client(timeout=seconds) as client:
                client.post(f"{service.base_url}/chat/completions", headers=service.headers(), json=body)
        except httpx.TimeoutException:
            pass

    thread = threading.Thread(target=run)
    thread.start()
    thread.join(seconds + 5)


@pytest.mark.parametrize("stream", [False, True])
def test_disconnect_during_the_panel_cancels_every_member_call(
    service: Service, fake: FakeUpstream, stream: bool
) -> None:
    fake.configure({name: {"hang": True} for name in ("alpha", "beta", "gamma")})
    _disconnect_after(service, {"model": "mom", "messages": QUESTION, "stream": stream}, 0.5)
    left = time.time()
    log = fake.wait_for(lambda log: len(log) == 3 and all(e["outcome"] == "disconnected" for e in log), timeout=5)
    assert max(e["disconnected_at"] for e in log) - left < 1.0
    assert not [e for e in log if e["model"] == "judge"]


def test_disconnect_during_the_synthesis_stream_cancels_the_concluding_call(
    service: Service, fake: FakeUpstream
) -> None:
    fake.configure({"judge": {"text": " ".join(["token"] * 200), "token_delay_ms": 50}})
    tokens = 0
    for _, payload in service.sse({"model": "mom", "messages": QUESTION, "stream": True}):
        tokens += payload.count("token")
        if tokens >= 5:
            break  # leave mid-stream: the connection closes here
    left = time.time()
    log = fake.wait_for(
        lambda log: any(e["model"] == "judge" and e["outcome"] == "disconnected" for e in log), timeout=5
    )
    judge = next(e for e in log if e["model"] == "judge")
    assert judge["disconnected_at"] - left < 1.0
    assert judge["tokens_sent"] < 200


# ---------------------------------------------------------------------------------- streams cut short, cleanly


@pytest.mark.parametrize("stream", [False, True])
def test_a_concluding_stream_ending_without_its_end_is_a_failure(
    service: Service, fake: FakeUpstream, stream: bool
) -> None:
    """The server ends its response properly after two tokens, with neither a finish_reason nor [DONE]: no
    transport error says so, but the answer is not complete (on either call path)."""
    fake.configure({"judge": {"text": "one two three four", "end_after_tokens": 2}})
    assert_cut_short(service.chat(messages=QUESTION, stream=stream), stream)


def assert_cut_short(response: httpx.Response, stream: bool) -> None:
    """A 502 (or, streamed, an error event after what was sent) saying the concluding LLM's stream ended early."""
    if stream:
        error, content = failed_stream(response)
        assert content == "one two "
    else:
        assert response.status_code == 502
        error = response.json()
        validate(error, "ErrorResponse")
    assert error["error"]["code"] == "concluding_failed"
    assert "the stream ended before the LLM finished its answer" in error["error"]["message"]


@pytest.fixture(scope="module")
def claude_concludes(fake_server: FakeUpstream, start_service: StartService) -> Service:
    """A concluding LLM on LiteLLM's Anthropic provider (the fake speaks the Messages API too): another stream
    format, with its own way of ending, on the LiteLLM path."""
    config: dict[str, Any] = {
        "llm_definitions": [
            llm("fa-member", fake_server),
            {
                "name": "fa-claude",
                "model": "anthropic/fa-claude",
                "api_base": fake_server.root_url,
                "api_key_env": "FAKE_KEY",
                "retries": 0,
            },
        ],
        "models": [{"name": "fa-mom", "llms_to_query": ["fa-member"], "concluding_llm": "fa-claude"}],
    }
    return start_service(config)


@pytest.mark.parametrize("stream", [False, True])
def test_an_anthropic_stream_ending_without_its_end_is_a_failure(
    claude_concludes: Service, fake: FakeUpstream, stream: bool
) -> None:
    fake.configure({"fa-claude": {"text": "one two three four", "end_after_tokens": 2}})
    response = claude_concludes.chat("fa-mom", messages=QUESTION, stream=stream)
    (call,) = [e for e in fake.log() if e["model"] == "fa-claude"]
    assert (call["protocol"], call["outcome"]) == ("anthropic", "ended")
    assert_cut_short(response, stream)
