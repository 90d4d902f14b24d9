"""Fast checks of the fake OpenAI-compatible upstream (tests/fake_upstream.py) over real HTTP."""

from __future__ import annotations

import os
import socket
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import httpx
import openai
import pytest
from openai import OpenAI
from openai.types.chat import ChatCompletionMessageParam

from tests.fake_upstream import Behaviour, FakeUpstream


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


@pytest.fixture(scope="module")
def fake() -> Iterator[FakeUpstream]:
    upstream = FakeUpstream(_free_port())
    upstream.start()
    try:
        yield upstream
    finally:
        upstream.stop()


@pytest.fixture(autouse=True)
def _reset_fake(fake: FakeUpstream) -> None:
    fake.reset()


@pytest.fixture
def client(fake: FakeUpstream) -> Iterator[OpenAI]:
    with OpenAI(base_url=fake.base_url, api_key="k", max_retries=0, timeout=5.0) as sdk:
        yield sdk


def _post(fake: FakeUpstream, body: dict[str, Any], timeout: float = 5.0) -> httpx.Response:
    with httpx.Client(timeout=timeout, trust_env=False) as http:
        return http.post(f"{fake.base_url}/chat/completions", json=body)


def test_default_answer_and_log(fake: FakeUpstream, client: OpenAI) -> None:
    result = client.chat.completions.create(
        model="plain-model", messages=[{"role": "user", "content": "hello there friend"}]
    )
    assert result.object == "chat.completion"
    assert result.model == "plain-model"
    choice = result.choices[0]
    assert choice.message.role == "assistant"
    assert choice.message.content == "Answer from plain-model."
    assert choice.finish_reason == "stop"
    assert result.usage is not None
    assert result.usage.prompt_tokens == 3
    assert result.usage.completion_tokens == 3
    assert result.usage.total_tokens == 6

    (entry,) = fake.log()
    assert entry["protocol"] == "openai"
    assert entry["model"] == "plain-model"
    assert entry["path"] == "/v1/chat/completions"
    assert entry["stream"] is False
    assert entry["outcome"] == "ok"
    assert entry["status"] == 200
    assert entry["body"]["messages"] == [{"role": "user", "content": "hello there friend"}]
    assert entry["headers"]["authorization"] == "Bearer k"
    assert entry["received_at"] <= entry["first_token_at"] <= entry["finished_at"]


def test_configured_text_with_last_user(fake: FakeUpstream, client: OpenAI) -> None:
    fake.configure({"echo": {"text": "You said: {last_user}", "prompt_tokens": 42}})
    result = client.chat.completions.create(
        model="echo",
        messages=[
            {"role": "system", "content": "be nice"},
            {"role": "user", "content": "first"},
            {"role": "assistant", "content": "ok"},
            {"role": "user", "content": [{"type": "text", "text": "second question"}]},
        ],
    )
    assert result.choices[0].message.content == "You said: second question"
    assert result.usage is not None
    assert result.usage.prompt_tokens == 42


def test_streaming_tokens_pacing_and_usage(fake: FakeUpstream, client: OpenAI) -> None:
    fake.configure({"streamer": {"text": "one two  three four", "ttft_ms": 150, "token_delay_ms": 40}})
    started = time.monotonic()
    stream = client.chat.completions.create(
        model="streamer",
        messages=[{"role": "user", "content": "count"}],
        stream=True,
        stream_options={"include_usage": True},
    )
    chunks = list(stream)
    pieces = [c.choices[0].delta.content for c in chunks if c.choices and c.choices[0].delta.content]
    assert pieces == ["one ", "two  ", "three ", "four"]
    assert chunks[0].choices[0].delta.role == "assistant"
    assert chunks[-2].choices[0].finish_reason == "stop"
    last = chunks[-1]
    assert last.choices == []
    assert last.usage is not None
    assert last.usage.completion_tokens == 4
    assert last.usage.prompt_tokens == 1
    assert time.monotonic() - started >= 0.15 + 3 * 0.04

    (entry,) = fake.log()
    assert entry["stream"] is True
    assert entry["outcome"] == "ok"
    assert entry["tokens_sent"] == 4
    assert entry["first_token_at"] - entry["received_at"] >= 0.14
    assert entry["finished_at"] - entry["first_token_at"] >= 3 * 0.04 - 0.01


def test_streaming_chunks_arrive_incrementally(fake: FakeUpstream) -> None:
    fake.configure({"slow": {"text": "a b c", "token_delay_ms": 120}})
    arrivals: list[float] = []
    body = {"model": "slow", "stream": True, "messages": [{"role": "user", "content": "x"}]}
    with (
        httpx.Client(timeout=5.0, trust_env=False) as http,
        http.stream("POST", f"{fake.base_url}/chat/completions", json=body) as response,
    ):
        assert response.headers["content-type"].startswith("text/event-stream")
        for line in response.iter_lines():
            if '"content":"' in line and '"role"' not in line:
                arrivals.append(time.monotonic())
            if line == "data: [DONE]":
                break
    assert len(arrivals) == 3
    assert arrivals[1] - arrivals[0] >= 0.09
    assert arrivals[2] - arrivals[1] >= 0.09


def test_scripted_pieces_stream_as_given_with_usage_only_when_asked(fake: FakeUpstream, client: OpenAI) -> None:
    pieces = [{"text": "Half a sen"}, {"text": "tence. Then", "delay_ms": 50}, {"text": " more."}]
    fake.configure({"writer": {"pieces": pieces, "ttft_ms": 20}})
    asked: list[ChatCompletionMessageParam] = [{"role": "user", "content": "write"}]
    for include_usage in (True, False):
        options = openai.NOT_GIVEN if not include_usage else {"include_usage": True}
        chunks = list(
            client.chat.completions.create(model="writer", messages=asked, stream=True, stream_options=options)
        )
        texts = [c.choices[0].delta.content for c in chunks if c.choices and c.choices[0].delta.content]
        assert texts == ["Half a sen", "tence. Then", " more."]
        usage = [c.usage for c in chunks if c.usage is not None]
        assert [u.completion_tokens for u in usage] == ([5] if include_usage else [])  # the text's words
    whole = client.chat.completions.create(model="writer", messages=asked)
    assert whole.choices[0].message.content == "Half a sentence. Then more."
    assert [e["tokens_sent"] for e in fake.log()] == [3, 3, 3]


@pytest.mark.parametrize(
    "behaviour",
    [
        {"pieces": []},
        {"pieces": [{"text": 1}]},
        {"pieces": [{"text": "a", "delay_ms": -1}]},
        {"pieces": [{"text": "a", "after": 1}]},
        {"pieces": [{"text": "a"}], "text": "a"},
    ],
)
def test_scripted_pieces_are_checked(fake: FakeUpstream, behaviour: dict[str, Any]) -> None:
    with pytest.raises(ValueError, match="pieces"):
        fake.configure({"writer": behaviour})


def test_status_500_error_body(fake: FakeUpstream, client: OpenAI) -> None:
    fake.configure({"broken": {"status": 500, "error_message": "kaputt", "retry_after": 2}})
    with pytest.raises(openai.InternalServerError) as excinfo:
        client.chat.completions.create(model="broken", messages=[{"role": "user", "content": "x"}])
    assert excinfo.value.status_code == 500

    response = _post(fake, {"model": "broken", "messages": [{"role": "user", "content": "x"}]})
    assert response.status_code == 500
    assert response.headers["retry-after"] == "2"
    error = response.json()["error"]
    assert error == {"message": "kaputt", "type": "server_error", "param": None, "code": None}
    assert [e["outcome"] for e in fake.log()] == ["error", "error"]


def test_fail_times_then_success(fake: FakeUpstream) -> None:
    fake.configure({"flaky": {"fail_times": 2, "status": 429}})
    body = {"model": "flaky", "messages": [{"role": "user", "content": "x"}]}
    statuses = [_post(fake, body).status_code for _ in range(4)]
    assert statuses == [429, 429, 200, 200]
    # configure resets the counter
    fake.configure({"flaky": {"fail_times": 1}})
    assert [_post(fake, body).status_code for _ in range(2)] == [500, 200]


def test_fail_rate_is_deterministic(fake: FakeUpstream) -> None:
    body = {"model": "rnd", "messages": [{"role": "user", "content": "x"}]}
    runs = []
    for _ in range(2):
        fake.configure({"rnd": {"fail_rate": 0.5, "seed": 7, "status": 503}})
        runs.append([_post(fake, body).status_code for _ in range(12)])
    assert runs[0] == runs[1]
    assert set(runs[0]) == {200, 503}


def test_fail_rate_and_hang_rate_share_one_draw(fake: FakeUpstream) -> None:
    fake.configure({"chaos": {"fail_rate": 0.3, "hang_rate": 0.3, "seed": 3, "status": 502}})
    body = {"model": "chaos", "messages": [{"role": "user", "content": "x"}]}
    outcomes: list[int | str] = []
    for _ in range(40):
        try:
            outcomes.append(_post(fake, body, timeout=0.3).status_code)
        except httpx.ReadTimeout:
            outcomes.append("hung")
    assert set(outcomes) == {200, 502, "hung"}
    assert 4 <= outcomes.count("hung") <= 20 and 4 <= outcomes.count(502) <= 20
    with pytest.raises(ValueError, match="at most 1"):
        Behaviour.parse({"fail_rate": 0.6, "hang_rate": 0.6})


def test_hang_client_timeout_is_recorded_as_disconnected(fake: FakeUpstream) -> None:
    fake.configure({"stuck": {"hang": True}})
    with pytest.raises(httpx.ReadTimeout):
        _post(fake, {"model": "stuck", "messages": [{"role": "user", "content": "x"}]}, timeout=0.3)
    gave_up = time.time()
    (entry,) = fake.wait_for(lambda log: bool(log) and log[0]["outcome"] == "disconnected", timeout=2.0)
    assert entry["status"] is None
    assert entry["disconnected_at"] - gave_up < 0.3


def test_disconnect_while_streaming_is_recorded(fake: FakeUpstream) -> None:
    fake.configure({"long": {"text": "t " * 50, "token_delay_ms": 50}})
    body = {"model": "long", "stream": True, "messages": [{"role": "user", "content": "x"}]}
    with (
        httpx.Client(timeout=5.0, trust_env=False) as http,
        http.stream("POST", f"{fake.base_url}/chat/completions", json=body) as response,
    ):
        seen = 0
        for line in response.iter_lines():
            seen += line.startswith("data: ")
            if seen >= 3:
                break
    closed = time.time()
    (entry,) = fake.wait_for(lambda log: log[0]["outcome"] == "disconnected", timeout=2.0)
    assert entry["status"] == 200
    assert 2 <= entry["tokens_sent"] < 50
    assert entry["disconnected_at"] - closed < 0.3


def test_a_gate_holds_requests_until_it_opens(fake: FakeUpstream, client: OpenAI) -> None:
    fake.configure({"held": {"text": "Let through.", "gate": "g1"}, "other": {"gate": "g2"}})
    with ThreadPoolExecutor(1) as pool:
        answer = pool.submit(client.chat.completions.create, model="held", messages=[{"role": "user", "content": "x"}])
        fake.wait_for(lambda log: len(log) == 1)  # logged on arrival, and held there
        assert not answer.done() and fake.log()[0]["finished_at"] is None
        fake.open_gate("g2")  # another gate: still held
        assert fake.log()[0]["finished_at"] is None and not answer.done()
        fake.open_gate("g1")
        assert answer.result(timeout=5).choices[0].message.content == "Let through."
    # open from now on, until a reset closes it again
    held = client.chat.completions.create(model="held", messages=[{"role": "user", "content": "x"}])
    assert held.choices[0].message.content == "Let through."
    fake.reset()
    fake.configure({"held": {"gate": "g1"}})
    with pytest.raises(httpx.ReadTimeout):
        _post(fake, {"model": "held", "messages": [{"role": "user", "content": "x"}]}, timeout=0.3)
    fake.wait_for(lambda log: log[-1]["outcome"] == "disconnected", timeout=2.0)


def test_stop_after_tokens_breaks_the_stream(fake: FakeUpstream, client: OpenAI) -> None:
    fake.configure({"cut": {"text": "alpha beta gamma delta", "stop_after_tokens": 2}})
    received: list[str] = []
    finished = False
    with pytest.raises((openai.APIError, httpx.HTTPError)):
        messages: list[ChatCompletionMessageParam] = [{"role": "user", "content": "x"}]
        stream = client.chat.completions.create(model="cut", messages=messages, stream=True)
        for chunk in stream:
            if chunk.choices and chunk.choices[0].delta.content:
                received.append(chunk.choices[0].delta.content)
            if chunk.choices and chunk.choices[0].finish_reason:
                finished = True
    assert received == ["alpha ", "beta "]
    assert not finished
    (entry,) = fake.log()
    assert entry["outcome"] == "stopped"
    assert entry["tokens_sent"] == 2


def test_reset_connection(fake: FakeUpstream) -> None:
    fake.configure({"rst": {"reset_connection": True}})
    with pytest.raises(httpx.TransportError):
        _post(fake, {"model": "rst", "messages": [{"role": "user", "content": "x"}]})
    assert [e["outcome"] for e in fake.log()] == ["reset"]


def test_reasoning_tokens_and_text(fake: FakeUpstream, client: OpenAI) -> None:
    fake.configure(
        {
            "thinker": {
                "text": "The answer.",
                "reasoning_text": "let me think",
                "reasoning_tokens": 5,
                "cached_tokens": 2,
            }
        }
    )
    result = client.chat.completions.create(model="thinker", messages=[{"role": "user", "content": "q"}])
    assert result.choices[0].message.content == "The answer."
    assert (result.choices[0].message.model_extra or {}).get("reasoning_content") == "let me think"
    usage = result.usage
    assert usage is not None
    assert usage.completion_tokens == 2 + 5
    assert usage.completion_tokens_details is not None
    assert usage.completion_tokens_details.reasoning_tokens == 5
    assert usage.prompt_tokens_details is not None
    assert usage.prompt_tokens_details.cached_tokens == 2

    stream = client.chat.completions.create(
        model="thinker",
        messages=[{"role": "user", "content": "q"}],
        stream=True,
        stream_options={"include_usage": True},
    )
    reasoning, content = [], []
    for chunk in stream:
        if chunk.choices:
            extra = chunk.choices[0].delta.model_extra or {}
            if extra.get("reasoning_content"):
                reasoning.append(extra["reasoning_content"])
            if chunk.choices[0].delta.content:
                content.append(chunk.choices[0].delta.content)
    assert "".join(reasoning) == "let me think"
    assert "".join(content) == "The answer."


def test_control_rejects_unknown_fields(fake: FakeUpstream) -> None:
    with pytest.raises(ValueError, match="ttft"):
        fake.configure({"typo": {"ttft": 10}})


def test_litellm_streaming_roundtrip(fake: FakeUpstream) -> None:
    os.environ["LITELLM_LOCAL_MODEL_COST_MAP"] = "True"
    import litellm

    fake.configure({"x1": {"text": "Hello from {last_user}", "prompt_tokens": 11}})
    stream = litellm.completion(
        model="openai/x1",
        api_base=fake.base_url,
        api_key="k",
        messages=[{"role": "user", "content": "litellm"}],
        stream=True,
        stream_options={"include_usage": True},
        max_retries=0,
    )
    text = ""
    usage: Any = None
    for chunk in stream:
        if chunk.choices and chunk.choices[0].delta.content:
            text += chunk.choices[0].delta.content
        if getattr(chunk, "usage", None):
            usage = chunk.usage
    assert text == "Hello from litellm"
    assert usage is not None
    assert usage.prompt_tokens == 11
    assert usage.completion_tokens == 3

    (entry,) = fake.log()
    assert entry["model"] == "x1"
    assert entry["path"] == "/v1/chat/completions"
    assert entry["headers"]["authorization"] == "Bearer k"
    assert entry["body"]["stream_options"] == {"include_usage": True}


def test_no_usage_streams_without_usage_but_whole_answers_keep_it(fake: FakeUpstream, client: OpenAI) -> None:
    fake.configure({"local": {"text": "One two three.", "no_usage": True, "finish_reason": "length"}})
    asked: list[ChatCompletionMessageParam] = [{"role": "user", "content": "count"}]
    chunks = list(
        client.chat.completions.create(
            model="local", messages=asked, stream=True, stream_options={"include_usage": True}
        )
    )
    assert [c.usage for c in chunks if c.usage is not None] == []
    assert all(c.choices for c in chunks)  # no usage chunk (it has no choices)
    assert chunks[-1].choices[0].finish_reason == "length"
    assert chunks[-1].choices[0].delta.content is None
    whole = client.chat.completions.create(model="local", messages=asked)
    assert whole.choices[0].finish_reason == "length"
    assert whole.usage is not None and whole.usage.completion_tokens == 3


def test_context_window_refuses_as_llama_cpp_does(fake: FakeUpstream) -> None:
    fake.configure({"small": {"context_window": 10}})
    long = {"model": "small", "messages": [{"role": "user", "content": "word " * 8}], "max_tokens": 4}
    response = _post(fake, long)
    assert response.status_code == 400
    assert response.json() == {
        "error": {
            "message": "This model's maximum context length is 10 tokens. However, you requested 12 tokens "
            "(8 in the messages, 4 in the completion). Please reduce the length of the messages or completion.",
            "type": "invalid_request_error",
            "param": "messages",
            "code": "context_length_exceeded",
        }
    }
    streamed = _post(fake, {**long, "stream": True})
    assert streamed.status_code == 200
    assert streamed.headers["content-type"].startswith("text/event-stream")
    assert streamed.content == b""
    fits = _post(fake, {**long, "max_tokens": 2})
    assert fits.status_code == 200
    assert [e["outcome"] for e in fake.log()] == ["error", "ended", "ok"]
