"""Langfuse tracing through the real Langfuse SDK, exporting OTLP to a capture server the test runs."""

from __future__ import annotations

import base64
import json
import statistics
import time
from collections.abc import Iterator
from typing import Any

import pytest

from tests.conftest import FAKE_KEY, TOKEN, Service, StartService, panel_config
from tests.fake_upstream import FakeUpstream
from tests.otlp_capture import CaptureServer

PUBLIC_KEY = "pk-lf-test-public"
SECRET_KEY = "sk-lf-test-secret-0123456789"
QUESTION = [{"role": "user", "content": "Trace me."}]
PNG = "data:image/png;base64," + base64.b64encode(b"\x89PNG\r\n\x1a\n" + b"\x00" * 16).decode()


@pytest.fixture
def capture() -> Iterator[CaptureServer]:
    server = CaptureServer()
    server.start()
    yield server
    server.stop()


def traced_service(start_service: StartService, fake: FakeUpstream, capture: CaptureServer, **env: str) -> Service:
    return start_service(
        panel_config(fake),
        {
            "LANGFUSE_PUBLIC_KEY": PUBLIC_KEY,
            "LANGFUSE_SECRET_KEY": SECRET_KEY,
            "LANGFUSE_HOST": capture.url,
            "LANGFUSE_FLUSH_INTERVAL": "0.2",
            **env,
        },
    )


def observation(span: dict[str, Any], key: str) -> Any:
    value = span["attributes"].get(f"langfuse.observation.{key}")
    return json.loads(value) if isinstance(value, str) and value[:1] in '{["' else value


def test_one_trace_per_request_with_one_generation_per_call(
    fake_server: FakeUpstream, start_service: StartService, capture: CaptureServer
) -> None:
    service = traced_service(start_service, fake_server, capture)
    fake_server.reset()
    fake_server.configure(
        {
            "alpha": {"text": "alpha says", "prompt_tokens": 11, "reasoning_tokens": 2, "cached_tokens": 5},
            "beta": {"status": 500, "error_message": "beta broke"},
            "judge": {"text": "the synthesis", "token_delay_ms": 20},
        }
    )
    response = service.chat(
        "mom", messages=QUESTION, user="user-7", stream=True, stream_options={"include_usage": True}
    )
    assert response.status_code == 200
    spans = capture.wait_for(lambda s: {"mom", "alpha", "beta", "gamma", "judge"} <= {x["name"] for x in s})
    by_name = {s["name"]: s for s in spans}
    root = by_name["mom"]
    assert {s["trace_id"] for s in spans} == {root["trace_id"]}  # one trace
    assert root["parent_id"] not in {x["span_id"] for x in spans}  # the top of its trace
    for name in ("alpha", "beta", "gamma", "judge"):
        span = by_name[name]
        assert span["parent_id"] == root["span_id"]
        assert observation(span, "type") == "generation"
        assert span["attributes"]["langfuse.trace.name"] == "mom"
        assert span["attributes"]["user.id"] == "user-7"
        assert span["attributes"]["langfuse.trace.tags"] == ["mom"]
    assert json.loads(root["attributes"]["langfuse.trace.metadata.mom_model"]) == "mom"
    request_id = json.loads(root["attributes"]["langfuse.trace.metadata.request_id"])
    assert len(request_id) == 36

    alpha = by_name["alpha"]
    assert observation(alpha, "model.name") == "openai/alpha"
    assert observation(alpha, "input") == QUESTION
    assert observation(alpha, "output") == "alpha says"
    usage = observation(alpha, "usage_details")
    assert usage["input"] == 11 and usage["reasoning"] == 2 and usage["cached"] == 5
    assert usage["output"] == 2 + 2  # two words and two reasoning tokens
    body_usage = next(c for c in _chunks(response.text) if not c["choices"])
    alpha_cost = next(m["cost"] for m in body_usage["mom"]["members"] if m["name"] == "alpha")
    assert observation(alpha, "cost_details") == {"total": alpha_cost}
    assert observation(alpha, "level") == "DEFAULT"

    beta = by_name["beta"]
    assert observation(beta, "level") == "ERROR"
    assert "beta broke" in observation(beta, "status_message")

    judge = by_name["judge"]
    assert observation(judge, "metadata.role") == "concluding"
    assert observation(judge, "output") == "the synthesis"
    assert observation(judge, "completion_start_time")  # time to first token of the streamed call
    assert "alpha says" in json.dumps(observation(judge, "input"))
    assert root["attributes"]["langfuse.observation.output"] == "the synthesis"

    # the SDK authenticated with our keys; no provider key or bearer token travels in a span
    assert capture.authorization == {"Basic " + base64.b64encode(f"{PUBLIC_KEY}:{SECRET_KEY}".encode()).decode()}
    everything = json.dumps(spans)
    assert FAKE_KEY not in everything and TOKEN not in everything and SECRET_KEY not in everything


def _chunks(text: str) -> list[dict[str, Any]]:
    frames = [f.removeprefix("data: ") for f in text.split("\n\n") if f.strip()]
    return [json.loads(f) for f in frames if f != "[DONE]"]


def test_skipped_member_is_noted(
    fake_server: FakeUpstream, start_service: StartService, capture: CaptureServer
) -> None:
    service = traced_service(start_service, fake_server, capture)
    fake_server.reset()
    image = [
        {
            "role": "user",
            "content": [{"type": "text", "text": "Look."}, {"type": "image_url", "image_url": {"url": PNG}}],
        }
    ]
    assert service.chat("mom", messages=image).status_code == 200
    spans = capture.wait_for(lambda s: {"mom", "alpha", "beta", "gamma", "judge"} <= {x["name"] for x in s})
    beta = next(s for s in spans if s["name"] == "beta")
    assert observation(beta, "level") == "WARNING"
    assert observation(beta, "status_message").startswith("skipped: cannot see images")


WEATHER_TOOL = {
    "type": "function",
    "function": {
        "name": "get_weather",
        "parameters": {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]},
    },
}


def test_generations_show_tool_calls_and_the_trace_its_turn(
    fake_server: FakeUpstream, start_service: StartService, capture: CaptureServer
) -> None:
    service = traced_service(start_service, fake_server, capture)
    fake_server.reset()
    paris = {"name": "get_weather", "arguments": {"city": "Paris"}}
    fake_server.configure(
        {
            "alpha": {"text": "I would look it up.", "tool_calls": [paris]},
            "judge": {"tool_calls": [paris], "after_tool_text": "Sunny in Paris."},
        }
    )
    asked = [{"role": "user", "content": "Weather in Paris?"}]
    first = service.chat("mom", messages=asked, tools=[WEATHER_TOOL])
    assert first.status_code == 200
    call = first.json()["choices"][0]["message"]["tool_calls"][0]
    spans = capture.wait_for(lambda s: {"mom", "alpha", "beta", "gamma", "judge"} <= {x["name"] for x in s})
    by_name = {s["name"]: s for s in spans}

    alpha = observation(by_name["alpha"], "output")  # the member's proposal: its text and its call, as a message
    assert alpha["content"] == "I would look it up."
    assert [(c["function"]["name"], json.loads(c["function"]["arguments"])) for c in alpha["tool_calls"]] == [
        ("get_weather", {"city": "Paris"})
    ]
    assert observation(by_name["alpha"], "metadata.tools") == ["get_weather"]  # what the member was offered
    judge = observation(by_name["judge"], "output")
    assert judge["content"] is None and judge["tool_calls"][0]["function"]["name"] == "get_weather"
    root = by_name["mom"]
    assert observation(root, "output")["tool_calls"] == [call]  # the trace's answer is the client's answer
    assert observation(root, "metadata.turn") == "ensemble"

    # the agent comes back with the tool's result: a relay turn, one generation (the concluding call) in its trace
    result = [
        *asked,
        {"role": "assistant", "content": None, "tool_calls": [call]},
        {"role": "tool", "tool_call_id": call["id"], "content": "sunny, 24 C"},
    ]
    second = service.chat("mom", messages=result, tools=[WEATHER_TOOL])
    assert second.status_code == 200 and second.json()["choices"][0]["message"]["content"] == "Sunny in Paris."
    spans = capture.wait_for(lambda s: len([x for x in s if x["name"] == "mom"]) == 2 and len(s) >= 7)
    relay = next(x for x in spans if x["name"] == "mom" and x["trace_id"] != root["trace_id"])
    assert observation(relay, "metadata.turn") == "relay"
    assert observation(relay, "output") == "Sunny in Paris."
    assert sorted(x["name"] for x in spans if x["trace_id"] == relay["trace_id"]) == ["judge", "mom"]


def test_the_trace_records_the_callers_overrides_and_notices(
    fake_server: FakeUpstream, start_service: StartService, capture: CaptureServer
) -> None:
    service = traced_service(start_service, fake_server, capture)
    fake_server.reset()
    steered = service.chat("mom", messages=QUESTION, mom={"exclude": ["gamma", "betta"]})
    assert steered.status_code == 200
    spans = capture.wait_for(lambda s: {"mom", "alpha", "beta", "judge"} <= {x["name"] for x in s})
    root = next(s for s in spans if s["name"] == "mom")
    assert observation(root, "metadata.overrides") == {"exclude": ["gamma"]}
    assert observation(root, "metadata.notices") == ["mom.exclude: 'betta' is not asked; ignored. Did you mean 'beta'?"]
    assert "gamma" not in {s["name"] for s in spans}


@pytest.mark.parametrize("mode", ["fail", "hang"])
def test_a_broken_langfuse_never_slows_or_fails_an_answer(
    fake_server: FakeUpstream, start_service: StartService, capture: CaptureServer, mode: str
) -> None:
    fake_server.reset()
    plain = start_service(panel_config(fake_server))
    capture.mode = mode  # type: ignore[assignment]
    traced = traced_service(start_service, fake_server, capture)

    def median_latency(service: Service) -> float:
        latencies = []
        for _ in range(8):
            started = time.monotonic()
            assert service.chat("mom", messages=QUESTION).status_code == 200
            latencies.append(time.monotonic() - started)
        return statistics.median(latencies)

    median_latency(traced)  # warm both up
    median_latency(plain)
    baseline, with_tracing = median_latency(plain), median_latency(traced)
    assert capture.wait_for(lambda _: capture.posts > 0) is not None and capture.posts > 0  # it did try to export
    # generous bound: the benchmarks measure the real overhead; here a blocked exporter would add seconds
    assert with_tracing < baseline + 0.1, (with_tracing, baseline)
    started = time.monotonic()
    traced.stop()
    assert time.monotonic() - started < 15  # the shutdown flush is bounded too
    assert traced.process is not None and traced.process.returncode == 0


def test_traces_are_flushed_at_shutdown(
    fake_server: FakeUpstream, start_service: StartService, capture: CaptureServer
) -> None:
    service = traced_service(start_service, fake_server, capture, LANGFUSE_FLUSH_INTERVAL="300")
    fake_server.reset()
    assert service.chat("mom", messages=QUESTION).status_code == 200
    service.stop()  # SIGTERM: the batch still buffered must be sent before the process exits
    names = {s["name"] for s in capture.spans}
    assert {"mom", "alpha", "beta", "gamma", "judge"} <= names


def test_tracing_is_off_without_keys(
    fake_server: FakeUpstream, start_service: StartService, capture: CaptureServer
) -> None:
    service = start_service(panel_config(fake_server), {"LANGFUSE_HOST": capture.url, "LANGFUSE_FLUSH_INTERVAL": "0.1"})
    fake_server.reset()
    assert service.chat("mom", messages=QUESTION).status_code == 200
    service.stop()
    assert capture.posts == 0
