"""The fake upstream's Anthropic Messages API (tests/fake_upstream.py), over real HTTP and through LiteLLM."""

from __future__ import annotations

import json
import os
import time
from collections.abc import Iterator
from types import ModuleType
from typing import Any

import httpx
import pytest

from tests.fake_upstream import FakeUpstream

Event = tuple[str, dict[str, Any]]

ANTHROPIC_HEADERS = {"x-api-key": "sk-test", "anthropic-version": "2023-06-01"}


# `fake`: the session's fake upstream, reset for each test (tests/conftest.py)


@pytest.fixture(scope="module")
def llm() -> ModuleType:
    os.environ["LITELLM_LOCAL_MODEL_COST_MAP"] = "True"
    import litellm

    return litellm


def _body(model: str, stream: bool = False, **extra: Any) -> dict[str, Any]:
    return {"model": model, "max_tokens": 64, "stream": stream, "messages": [{"role": "user", "content": "x"}], **extra}


def _post(fake: FakeUpstream, body: dict[str, Any], timeout: float = 5.0) -> httpx.Response:
    with httpx.Client(timeout=timeout, trust_env=False) as http:
        return http.post(f"{fake.root_url}/v1/messages", json=body, headers=ANTHROPIC_HEADERS)


def _iter_events(response: httpx.Response) -> Iterator[Event]:
    """Anthropic SSE: every event is exactly an ``event:`` line naming the data's type and a ``data:`` line."""
    lines: list[str] = []
    for line in response.iter_lines():
        if line:
            lines.append(line)
            continue
        assert len(lines) == 2, lines
        assert lines[0].startswith("event: ") and lines[1].startswith("data: "), lines
        name, data = lines[0].removeprefix("event: "), json.loads(lines[1].removeprefix("data: "))
        assert data["type"] == name
        lines = []
        yield name, data
    assert not lines, f"unterminated event: {lines}"


def _stream_events(
    fake: FakeUpstream, body: dict[str, Any], timeout: httpx.Timeout | float = 5.0
) -> tuple[list[Event], Exception | None]:
    """All events of a streamed answer, and the error that ended it early if any."""
    events: list[Event] = []
    with httpx.Client(timeout=timeout, trust_env=False) as http:
        try:
            with http.stream("POST", f"{fake.root_url}/v1/messages", json=body, headers=ANTHROPIC_HEADERS) as response:
                assert response.status_code == 200
                assert response.headers["content-type"].startswith("text/event-stream")
                for event in _iter_events(response):
                    events.append(event)
        except httpx.TransportError as exc:
            return events, exc
    return events, None


def _text_deltas(index: int, tokens: list[str]) -> list[Event]:
    return [
        (
            "content_block_delta",
            {"type": "content_block_delta", "index": index, "delta": {"type": "text_delta", "text": t}},
        )
        for t in tokens
    ]


def _opening(msg_id: str, model: str, input_tokens: int, cached: int = 0) -> list[Event]:
    message: dict[str, Any] = {
        "id": msg_id,
        "type": "message",
        "role": "assistant",
        "model": model,
        "content": [],
        "stop_reason": None,
        "stop_sequence": None,
        "usage": {
            "input_tokens": input_tokens,
            "cache_read_input_tokens": cached,
            "cache_creation_input_tokens": 0,
            "output_tokens": 1,
        },
    }
    return [
        ("message_start", {"type": "message_start", "message": message}),
        (
            "content_block_start",
            {"type": "content_block_start", "index": 0, "content_block": {"type": "text", "text": ""}},
        ),
        ("ping", {"type": "ping"}),
    ]


def _names(events: list[Event]) -> list[str]:
    return [name for name, _ in events]


# ----- raw HTTP -----


def test_message_shape_and_log(fake: FakeUpstream) -> None:
    body = {
        "model": "plain",
        "max_tokens": 64,
        "system": "be brief",
        "messages": [{"role": "user", "content": [{"type": "text", "text": "hello there friend"}]}],
    }
    response = _post(fake, body)
    assert response.status_code == 200
    assert response.headers["content-type"] == "application/json"
    (entry,) = fake.log()
    assert response.json() == {
        "id": f"msg_fake_{entry['id']}",
        "type": "message",
        "role": "assistant",
        "model": "plain",
        "content": [{"type": "text", "text": "Answer from plain."}],
        "stop_reason": "end_turn",
        "stop_sequence": None,
        # the system prompt counts: 2 + 3 words
        "usage": {
            "input_tokens": 5,
            "cache_read_input_tokens": 0,
            "cache_creation_input_tokens": 0,
            "output_tokens": 3,
        },
    }
    assert entry["protocol"] == "anthropic"
    assert entry["model"] == "plain"
    assert entry["path"] == "/v1/messages"
    assert entry["stream"] is False
    assert entry["outcome"] == "ok"
    assert entry["status"] == 200
    assert entry["tokens_sent"] == 3
    assert entry["body"] == body
    assert entry["headers"]["x-api-key"] == "sk-test"
    assert entry["headers"]["anthropic-version"] == "2023-06-01"
    assert entry["received_at"] <= entry["first_token_at"] <= entry["finished_at"]


def test_anthropic_version_is_optional_and_both_litellm_paths_are_served(fake: FakeUpstream) -> None:
    with httpx.Client(timeout=5.0, trust_env=False) as http:
        for path in ("/v1/messages", "/v1/v1/messages"):
            response = http.post(f"{fake.root_url}{path}", json=_body("m"))
            assert response.status_code == 200
            assert response.json()["content"] == [{"type": "text", "text": "Answer from m."}]
    assert [(e["path"], e["protocol"]) for e in fake.log()] == [
        ("/v1/messages", "anthropic"),
        ("/v1/v1/messages", "anthropic"),
    ]


def test_text_last_user_and_usage_numbers(fake: FakeUpstream) -> None:
    fake.configure({"echo": {"text": "You said: {last_user}", "prompt_tokens": 42, "cached_tokens": 10}})
    body = _body("echo")
    body["messages"] = [
        {"role": "user", "content": "first"},
        {"role": "assistant", "content": "ok"},
        {"role": "user", "content": [{"type": "text", "text": "second question"}]},
    ]
    message = _post(fake, body).json()
    assert message["content"] == [{"type": "text", "text": "You said: second question"}]
    # prompt_tokens includes the cached ones; Anthropic's input_tokens do not
    assert message["usage"] == {
        "input_tokens": 32,
        "cache_read_input_tokens": 10,
        "cache_creation_input_tokens": 0,
        "output_tokens": 4,
    }


def test_stream_every_event_in_order_and_pacing(fake: FakeUpstream) -> None:
    fake.configure({"streamer": {"text": "one two  three four", "ttft_ms": 150, "token_delay_ms": 40}})
    started = time.monotonic()
    events, error = _stream_events(fake, _body("streamer", stream=True, system="be brief"))
    assert error is None
    assert time.monotonic() - started >= 0.15 + 3 * 0.04
    (entry,) = fake.log()
    assert events == [
        *_opening(f"msg_fake_{entry['id']}", "streamer", input_tokens=3),
        *_text_deltas(0, ["one ", "two  ", "three ", "four"]),
        ("content_block_stop", {"type": "content_block_stop", "index": 0}),
        (
            "message_delta",
            {
                "type": "message_delta",
                "delta": {"stop_reason": "end_turn", "stop_sequence": None},
                "usage": {"output_tokens": 4},
            },
        ),
        ("message_stop", {"type": "message_stop"}),
    ]
    assert entry["protocol"] == "anthropic"
    assert entry["stream"] is True
    assert entry["outcome"] == "ok"
    assert entry["tokens_sent"] == 4
    assert entry["first_token_at"] - entry["received_at"] >= 0.14
    assert entry["finished_at"] - entry["first_token_at"] >= 3 * 0.04 - 0.01


def test_reasoning_is_a_thinking_block(fake: FakeUpstream) -> None:
    fake.configure({"thinker": {"text": "The answer.", "reasoning_text": "let me", "reasoning_tokens": 5}})
    message = _post(fake, _body("thinker")).json()
    assert message["content"] == [
        {"type": "thinking", "thinking": "let me", "signature": "fake-signature"},
        {"type": "text", "text": "The answer."},
    ]
    assert message["usage"]["output_tokens"] == 2 + 5
    assert message["usage"]["output_tokens_details"] == {"thinking_tokens": 5}

    events, error = _stream_events(fake, _body("thinker", stream=True))
    assert error is None
    start, thinking_start, ping, *rest = events
    assert start[0] == "message_start" and ping[0] == "ping"
    assert thinking_start[1]["content_block"] == {"type": "thinking", "thinking": ""}

    def delta(delta: dict[str, str], index: int = 0) -> Event:
        return "content_block_delta", {"type": "content_block_delta", "index": index, "delta": delta}

    assert rest == [
        delta({"type": "thinking_delta", "thinking": "let "}),
        delta({"type": "thinking_delta", "thinking": "me"}),
        delta({"type": "signature_delta", "signature": "fake-signature"}),
        ("content_block_stop", {"type": "content_block_stop", "index": 0}),
        (
            "content_block_start",
            {"type": "content_block_start", "index": 1, "content_block": {"type": "text", "text": ""}},
        ),
        *_text_deltas(1, ["The ", "answer."]),
        ("content_block_stop", {"type": "content_block_stop", "index": 1}),
        (
            "message_delta",
            {
                "type": "message_delta",
                "delta": {"stop_reason": "end_turn", "stop_sequence": None},
                "usage": {"output_tokens": 7, "output_tokens_details": {"thinking_tokens": 5}},
            },
        ),
        ("message_stop", {"type": "message_stop"}),
    ]
    assert fake.log()[-1]["tokens_sent"] == 4


@pytest.mark.parametrize(
    ("status", "error_type"),
    [
        (400, "invalid_request_error"),
        (401, "authentication_error"),
        (403, "permission_error"),
        (404, "not_found_error"),
        (413, "request_too_large"),
        (418, "invalid_request_error"),
        (429, "rate_limit_error"),
        (500, "api_error"),
        (503, "api_error"),
        (529, "overloaded_error"),
    ],
)
def test_error_shape_by_status(fake: FakeUpstream, status: int, error_type: str) -> None:
    fake.configure({"broken": {"status": status}})
    response = _post(fake, _body("broken"))
    assert response.status_code == status
    assert response.headers["content-type"] == "application/json"
    assert response.json() == {
        "type": "error",
        "error": {"type": error_type, "message": f"Fake upstream error {status} for model broken."},
    }
    (entry,) = fake.log()
    assert (entry["outcome"], entry["status"], entry["protocol"]) == ("error", status, "anthropic")


def test_error_overrides_retry_after_and_fail_times(fake: FakeUpstream) -> None:
    fake.configure(
        {"flaky": {"status": 429, "fail_times": 2, "retry_after": 2, "error_message": "slow down", "error_type": "x"}}
    )
    responses = [_post(fake, _body("flaky", stream=stream)) for stream in (False, True, True)]
    assert [r.status_code for r in responses] == [429, 429, 200]
    assert responses[0].headers["retry-after"] == "2"
    assert responses[1].json() == {"type": "error", "error": {"type": "x", "message": "slow down"}}
    assert "event: message_stop" in responses[2].text
    assert [e["outcome"] for e in fake.log()] == ["error", "error", "ok"]


def test_invalid_body_is_an_anthropic_error(fake: FakeUpstream) -> None:
    response = _post(fake, {"model": "m"})
    assert response.status_code == 400
    assert response.json()["type"] == "error"
    assert response.json()["error"]["type"] == "invalid_request_error"


def test_fail_rate_draws_are_shared_with_the_openai_route(fake: FakeUpstream) -> None:
    fake.configure({"rnd": {"fail_rate": 0.5, "seed": 7, "status": 503}})
    anthropic = [_post(fake, _body("rnd")).status_code for _ in range(12)]
    fake.configure({"rnd": {"fail_rate": 0.5, "seed": 7, "status": 503}})
    with httpx.Client(timeout=5.0, trust_env=False) as http:
        body = {"model": "rnd", "messages": [{"role": "user", "content": "x"}]}
        openai = [http.post(f"{fake.base_url}/chat/completions", json=body).status_code for _ in range(12)]
    assert anthropic == openai
    assert set(anthropic) == {200, 503}
    assert {e["protocol"] for e in fake.log()} == {"anthropic", "openai"}


@pytest.mark.parametrize("behaviour", [{"hang": True}, {"hang_rate": 1.0}])
def test_hang_is_recorded_as_disconnected(fake: FakeUpstream, behaviour: dict[str, object]) -> None:
    fake.configure({"stuck": behaviour})
    with pytest.raises(httpx.ReadTimeout):
        _post(fake, _body("stuck"), timeout=0.3)
    (entry,) = fake.wait_for(lambda log: bool(log) and log[0]["outcome"] == "disconnected", timeout=2.0)
    assert entry["status"] is None


def test_hang_after_tokens(fake: FakeUpstream) -> None:
    fake.configure({"stall": {"text": "alpha beta gamma", "hang_after_tokens": 2}})
    events, error = _stream_events(fake, _body("stall", stream=True), timeout=httpx.Timeout(5.0, read=0.5))
    assert isinstance(error, httpx.ReadTimeout)
    assert events[3:] == _text_deltas(0, ["alpha ", "beta "])
    assert _names(events[:3]) == ["message_start", "content_block_start", "ping"]
    (entry,) = fake.wait_for(lambda log: log[0]["outcome"] == "disconnected", timeout=2.0)
    assert entry["tokens_sent"] == 2


def test_stop_after_tokens_closes_the_connection(fake: FakeUpstream) -> None:
    fake.configure({"cut": {"text": "alpha beta gamma delta", "stop_after_tokens": 2}})
    events, error = _stream_events(fake, _body("cut", stream=True))
    assert isinstance(error, httpx.RemoteProtocolError)
    assert _names(events) == [
        "message_start",
        "content_block_start",
        "ping",
        "content_block_delta",
        "content_block_delta",
    ]
    assert events[3:] == _text_deltas(0, ["alpha ", "beta "])
    with pytest.raises(httpx.TransportError):  # non-streaming: no response at all
        _post(fake, _body("cut"))
    assert [(e["outcome"], e["tokens_sent"]) for e in fake.log()] == [("stopped", 2), ("stopped", 0)]


def test_end_after_tokens_ends_the_body_cleanly_mid_stream(fake: FakeUpstream) -> None:
    fake.configure({"short": {"text": "alpha beta gamma delta", "end_after_tokens": 2}})
    events, error = _stream_events(fake, _body("short", stream=True))
    assert error is None  # the HTTP body is complete; only the missing message_delta / message_stop tell
    (entry,) = fake.log()
    assert events == [*_opening(f"msg_fake_{entry['id']}", "short", 1), *_text_deltas(0, ["alpha ", "beta "])]
    assert (entry["outcome"], entry["tokens_sent"], entry["status"]) == ("ended", 2, 200)
    # non-streaming: ignored
    assert _post(fake, _body("short")).json()["content"][0]["text"] == "alpha beta gamma delta"


def test_reset_connection(fake: FakeUpstream) -> None:
    fake.configure({"rst": {"reset_connection": True}})
    with pytest.raises(httpx.TransportError):
        _post(fake, _body("rst", stream=True))
    assert [e["outcome"] for e in fake.log()] == ["reset"]


# ----- parsed by client libraries -----


def test_message_parses_with_litellm_types(fake: FakeUpstream, llm: ModuleType) -> None:
    from litellm.types.llms.anthropic import AnthropicResponse  # after the llm fixture: the local cost map

    fake.configure({"typed": {"text": "Typed.", "reasoning_text": "hm", "cached_tokens": 1, "prompt_tokens": 3}})
    parsed = AnthropicResponse.model_validate(_post(fake, _body("typed")).json())
    assert parsed.type == "message" and parsed.role == "assistant" and parsed.stop_reason == "end_turn"
    assert [block.type for block in parsed.content] == ["thinking", "text"]
    assert parsed.usage.input_tokens == 2 and parsed.usage.output_tokens == 1


def test_message_parses_with_the_anthropic_sdk(fake: FakeUpstream) -> None:
    anthropic = pytest.importorskip("anthropic")
    fake.configure({"sdk": {"text": "Hi {last_user}", "prompt_tokens": 9, "cached_tokens": 2}})
    with anthropic.Anthropic(base_url=fake.root_url, api_key="k", max_retries=0) as client:
        message = client.messages.create(model="sdk", max_tokens=10, messages=[{"role": "user", "content": "there"}])
        assert message.content[0].text == "Hi there"
        assert message.stop_reason == "end_turn"
        assert (message.usage.input_tokens, message.usage.cache_read_input_tokens) == (7, 2)
        with client.messages.stream(
            model="sdk", max_tokens=10, messages=[{"role": "user", "content": "you"}]
        ) as stream:
            final = stream.get_final_message()
        assert final.content[0].text == "Hi you"
        assert final.usage.output_tokens == 2
        fake.configure({"sdk": {"status": 529}})
        with pytest.raises(anthropic.APIStatusError) as excinfo:
            client.messages.create(model="sdk", max_tokens=10, messages=[{"role": "user", "content": "x"}])
        assert excinfo.value.status_code == 529
        assert excinfo.value.body["error"]["type"] == "overloaded_error"


# ----- through LiteLLM's anthropic provider -----


@pytest.mark.parametrize("suffix", ["", "/v1/messages", "/v1"])
async def test_litellm_completion(fake: FakeUpstream, llm: ModuleType, suffix: str) -> None:
    fake.configure({"c1": {"text": "Hello from {last_user}", "prompt_tokens": 11, "cached_tokens": 4}})
    response = await llm.acompletion(
        model="anthropic/c1",
        api_base=fake.root_url + suffix,
        api_key="x",
        messages=[{"role": "system", "content": "sys"}, {"role": "user", "content": "litellm"}],
        max_retries=0,
    )
    assert response.choices[0].message.content == "Hello from litellm"
    assert response.choices[0].finish_reason == "stop"
    usage = response.usage
    assert (usage.prompt_tokens, usage.completion_tokens, usage.total_tokens) == (11, 3, 14)
    assert usage.prompt_tokens_details.cached_tokens == 4

    (entry,) = fake.log()
    assert entry["protocol"] == "anthropic"
    # LiteLLM appends /v1/messages unless the api_base ends with it: "<root>/v1" gives /v1/v1/messages
    assert entry["path"] == ("/v1/v1/messages" if suffix == "/v1" else "/v1/messages")
    assert entry["model"] == "c1"
    assert entry["headers"]["x-api-key"] == "x"
    assert "anthropic-version" in entry["headers"]
    assert entry["body"]["system"] == [{"type": "text", "text": "sys"}]


async def test_litellm_streaming(fake: FakeUpstream, llm: ModuleType) -> None:
    fake.configure(
        {"s1": {"text": "one two three", "reasoning_text": "hmm ok", "reasoning_tokens": 4, "prompt_tokens": 6}}
    )
    stream = await llm.acompletion(
        model="anthropic/s1",
        api_base=fake.root_url,
        api_key="x",
        messages=[{"role": "user", "content": "go"}],
        stream=True,
        stream_options={"include_usage": True},
        max_retries=0,
    )
    text, reasoning, finish_reasons, usage = "", "", [], None
    async for chunk in stream:
        if chunk.choices:
            text += chunk.choices[0].delta.content or ""
            reasoning += getattr(chunk.choices[0].delta, "reasoning_content", None) or ""
            if chunk.choices[0].finish_reason:
                finish_reasons.append(chunk.choices[0].finish_reason)
        if getattr(chunk, "usage", None):
            usage = chunk.usage
    assert text == "one two three"
    assert reasoning == "hmm ok"
    assert finish_reasons == ["stop"]
    assert usage is not None
    assert (usage.prompt_tokens, usage.completion_tokens) == (6, 3 + 4)
    assert usage.completion_tokens_details.reasoning_tokens == 4
    assert [(e["protocol"], e["stream"], e["outcome"]) for e in fake.log()] == [("anthropic", True, "ok")]


async def _litellm_stream_until_error(
    fake: FakeUpstream, llm: ModuleType, model: str
) -> tuple[list[tuple[str | None, str | None]], BaseException]:
    """What LiteLLM yields, as (content, finish_reason) per chunk, and the exception that ends it."""
    yielded: list[tuple[str | None, str | None]] = []
    try:
        stream = await llm.acompletion(
            model=f"anthropic/{model}",
            api_base=fake.root_url,
            api_key="x",
            messages=[{"role": "user", "content": "x"}],
            stream=True,
            max_retries=0,
        )
        async for chunk in stream:
            yielded.extend((choice.delta.content, choice.finish_reason) for choice in chunk.choices)
    except Exception as exc:
        return yielded, exc
    raise AssertionError(f"LiteLLM raised nothing; it yielded {yielded}")


async def test_litellm_end_after_tokens_raises_after_the_text_so_far(fake: FakeUpstream, llm: ModuleType) -> None:
    from litellm.exceptions import MidStreamFallbackError

    fake.configure({"short": {"text": "alpha beta gamma delta", "end_after_tokens": 2}})
    yielded, error = await _litellm_stream_until_error(fake, llm, "short")
    # LiteLLM 1.110.2 makes up no finish_reason: it yields the text so far, then raises on the clean EOF.
    assert yielded == [("alpha ", None), ("beta ", None)]
    assert type(error) is MidStreamFallbackError
    assert str(error) == (
        "litellm.MidStreamFallbackError: litellm.APIConnectionError: AnthropicException - Stream ended before a "
        "finish_reason was received Original exception: APIConnectionError: litellm.APIConnectionError: "
        "AnthropicException - Stream ended before a finish_reason was received"
    )
    (entry,) = fake.log()
    assert entry["outcome"] == "ended"


async def test_litellm_stop_after_tokens_raises_after_the_text_so_far(fake: FakeUpstream, llm: ModuleType) -> None:
    from litellm.exceptions import MidStreamFallbackError

    fake.configure({"cut": {"text": "alpha beta gamma delta", "stop_after_tokens": 2}})
    yielded, error = await _litellm_stream_until_error(fake, llm, "cut")
    assert yielded == [("alpha ", None), ("beta ", None)]
    assert type(error) is MidStreamFallbackError
    assert "Response payload is not completed" in str(error)
    (entry,) = fake.log()
    assert entry["outcome"] == "stopped"


@pytest.mark.parametrize(
    ("status", "exception", "reported_status"),
    [
        (401, "AuthenticationError", 401),
        (404, "NotFoundError", 404),
        (429, "RateLimitError", 429),
        (500, "InternalServerError", 500),
        (529, "InternalServerError", 500),
    ],
)
async def test_litellm_maps_anthropic_errors(
    fake: FakeUpstream, llm: ModuleType, status: int, exception: str, reported_status: int
) -> None:
    fake.configure({"err": {"status": status}})
    with pytest.raises(getattr(llm, exception)) as excinfo:
        await llm.acompletion(
            model="anthropic/err",
            api_base=fake.root_url,
            api_key="x",
            messages=[{"role": "user", "content": "x"}],
            max_retries=0,
        )
    assert excinfo.value.status_code == reported_status
    assert f"Fake upstream error {status} for model err." in str(excinfo.value)
