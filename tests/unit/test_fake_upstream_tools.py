"""The fake upstream's tool calls, scripted texts, answers after tool results and logprobs (OpenAI route).

Raw HTTP checks every body and chunk against OpenAI's published schemas; the official SDK checks that it parses
and assembles what the fake sends.
"""

from __future__ import annotations

import json
import time
from collections.abc import Iterator
from typing import Any

import httpx
import openai
import pydantic
import pytest
from openai import OpenAI
from openai.types.chat import ChatCompletionFunctionToolParam

from tests.fake_upstream import FakeUpstream, split_fragments
from tests.openai_schema import validate

WEATHER_TOOL: ChatCompletionFunctionToolParam = {
    "type": "function",
    "function": {
        "name": "get_weather",
        "description": "Current weather in a city.",
        "parameters": {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]},
    },
}
TIME_TOOL: ChatCompletionFunctionToolParam = {
    "type": "function",
    "function": {"name": "get_time", "parameters": {"type": "object", "properties": {"zone": {"type": "string"}}}},
}
TWO_CALLS: list[dict[str, Any]] = [
    {"name": "get_weather", "arguments": {"city": "Paris"}},
    {"name": "get_time", "arguments": '{"zone": "Europe/Paris"}', "id": "call_explicit"},
]


@pytest.fixture
def client(fake: FakeUpstream) -> Iterator[OpenAI]:
    with OpenAI(base_url=fake.base_url, api_key="k", max_retries=0, timeout=5.0) as sdk:
        yield sdk


def _body(model: str, **extra: Any) -> dict[str, Any]:
    return {"model": model, "messages": [{"role": "user", "content": "weather and time in Paris?"}], **extra}


def _post(fake: FakeUpstream, body: dict[str, Any]) -> dict[str, Any]:
    with httpx.Client(timeout=5.0, trust_env=False) as http:
        response = http.post(f"{fake.base_url}/chat/completions", json=body)
    assert response.status_code == 200, response.text
    payload: dict[str, Any] = response.json()
    validate(payload, "CreateChatCompletionResponse")
    return payload


def _stream(fake: FakeUpstream, body: dict[str, Any]) -> tuple[list[dict[str, Any]], list[float]]:
    """The chunks of a streamed answer (each checked against OpenAI's schema) and their arrival times."""
    chunks: list[dict[str, Any]] = []
    arrivals: list[float] = []
    lines: list[str] = []
    with (
        httpx.Client(timeout=5.0, trust_env=False) as http,
        http.stream("POST", f"{fake.base_url}/chat/completions", json={**body, "stream": True}) as response,
    ):
        assert response.status_code == 200
        for line in response.iter_lines():
            if line.startswith("data: "):
                lines.append(line)
                if line != "data: [DONE]":
                    chunks.append(json.loads(line.removeprefix("data: ")))
                    arrivals.append(time.monotonic())
    assert lines[-1] == "data: [DONE]"
    for chunk in chunks:
        validate(chunk, "CreateChatCompletionStreamResponse")
    return chunks, arrivals


def _tool_deltas(chunks: list[dict[str, Any]]) -> list[dict[str, Any]]:
    return [d for c in chunks if c["choices"] for d in c["choices"][0]["delta"].get("tool_calls", [])]


def _reassemble(chunks: list[dict[str, Any]]) -> list[dict[str, str]]:
    """Tool calls put together from their stream deltas, as a client does."""
    calls: dict[int, dict[str, str]] = {}
    for delta in _tool_deltas(chunks):
        call = calls.setdefault(delta["index"], {"id": "", "name": "", "arguments": ""})
        call["id"] += delta.get("id", "")
        call["name"] += delta.get("function", {}).get("name", "")
        call["arguments"] += delta.get("function", {}).get("arguments", "")
    return [calls[index] for index in sorted(calls)]


# ----- tool calls -----


def test_tool_calls_non_streamed(fake: FakeUpstream) -> None:
    fake.configure({"caller": {"tool_calls": TWO_CALLS}})
    body = _body("caller", tools=[WEATHER_TOOL, TIME_TOOL], tool_choice="auto", parallel_tool_calls=True)
    payload = _post(fake, body)
    (choice,) = payload["choices"]
    assert choice["finish_reason"] == "tool_calls"
    assert choice["message"]["content"] is None
    assert choice["message"]["tool_calls"] == [
        {
            "id": "call_caller_1",
            "type": "function",
            "function": {"name": "get_weather", "arguments": '{"city":"Paris"}'},
        },
        {
            "id": "call_explicit",
            "type": "function",
            "function": {"name": "get_time", "arguments": '{"zone": "Europe/Paris"}'},
        },
    ]
    # words of name + arguments: get_weather city Paris = 3; get_time zone Europe Paris = 4
    assert payload["usage"]["completion_tokens"] == 7

    (entry,) = fake.log()
    assert entry["tools"] == ["get_weather", "get_time"]
    assert entry["tool_choice"] == "auto"
    assert entry["body"]["parallel_tool_calls"] is True
    assert entry["outcome"] == "ok"
    assert entry["tokens_sent"] == 2 * (1 + 3)  # per call: its head and 3 fragments

    # default ids number the model's calls since it was configured
    second = _post(fake, body)["choices"][0]["message"]["tool_calls"]
    assert [call["id"] for call in second] == ["call_caller_3", "call_explicit"]


def test_tool_calls_streamed_in_fragments(fake: FakeUpstream) -> None:
    fake.configure({"caller": {"tool_calls": TWO_CALLS, "token_delay_ms": 40}})
    started = time.monotonic()
    chunks, _ = _stream(fake, _body("caller", tools=[WEATHER_TOOL, TIME_TOOL], stream_options={"include_usage": True}))
    elapsed = time.monotonic() - started

    # no role chunk of its own: the first call's head carries the role and a null content, as OpenAI sends it
    first = chunks[0]["choices"][0]["delta"]
    assert first["role"] == "assistant"
    assert first["content"] is None
    deltas = _tool_deltas(chunks)
    assert all(len(c["choices"][0]["delta"].get("tool_calls", [])) <= 1 for c in chunks if c["choices"])
    heads = [d for d in deltas if "id" in d]
    assert heads == [
        {"index": 0, "id": "call_caller_1", "type": "function", "function": {"name": "get_weather", "arguments": ""}},
        {"index": 1, "id": "call_explicit", "type": "function", "function": {"name": "get_time", "arguments": ""}},
    ]
    fragments = [d for d in deltas if "id" not in d]
    assert all(set(d) == {"index", "function"} and set(d["function"]) == {"arguments"} for d in fragments)
    assert [d["index"] for d in fragments] == [0, 0, 0, 1, 1, 1]
    assert _reassemble(chunks) == [
        {"id": "call_caller_1", "name": "get_weather", "arguments": '{"city":"Paris"}'},
        {"id": "call_explicit", "name": "get_time", "arguments": '{"zone": "Europe/Paris"}'},
    ]
    assert [d["index"] for d in deltas] == sorted(d["index"] for d in deltas)  # call after call, in order

    *_, finish, usage = chunks
    assert finish["choices"][0]["delta"] == {}
    assert finish["choices"][0]["finish_reason"] == "tool_calls"
    assert usage["choices"] == []
    assert usage["usage"]["completion_tokens"] == 7
    assert elapsed >= 7 * 0.04  # 8 pieces, a token delay between each two

    (entry,) = fake.log()
    assert entry["outcome"] == "ok"
    assert entry["tokens_sent"] == 8
    assert entry["tools"] == ["get_weather", "get_time"]
    assert entry["tool_choice"] is None


def test_text_comes_before_the_tool_calls(fake: FakeUpstream) -> None:
    fake.configure({"chatty": {"text": "Let me check.", "tool_calls": TWO_CALLS[:1]}})
    message = _post(fake, _body("chatty", tools=[WEATHER_TOOL]))["choices"][0]["message"]
    assert message["content"] == "Let me check."
    assert [call["function"]["name"] for call in message["tool_calls"]] == ["get_weather"]

    chunks, _ = _stream(fake, _body("chatty", tools=[WEATHER_TOOL]))
    deltas = [c["choices"][0]["delta"] for c in chunks]
    assert deltas[0] == {"role": "assistant", "content": ""}
    assert [d["content"] for d in deltas[1:3]] == ["Let ", "me "]
    first_call = next(i for i, d in enumerate(deltas) if "tool_calls" in d)
    assert "".join(d.get("content") or "" for d in deltas[:first_call]) == "Let me check."
    assert all("content" not in d and "role" not in d for d in deltas[first_call:])
    assert chunks[-1]["choices"][0]["finish_reason"] == "tool_calls"


def test_arguments_fragments_reassemble() -> None:
    for text in ['{"city":"Paris"}', "{}", "x", "", '{"a": [1, 2, {"b": "é"}]}']:
        fragments = split_fragments(text)
        assert "".join(fragments) == text
        assert len(fragments) == min(3, len(text))
        assert all(fragments)


def test_a_cut_tool_call_stream_has_no_finish(fake: FakeUpstream) -> None:
    fake.configure({"cut": {"tool_calls": TWO_CALLS[:1], "end_after_tokens": 2}})
    with httpx.Client(timeout=5.0, trust_env=False) as http:
        text = http.post(f"{fake.base_url}/chat/completions", json=_body("cut", stream=True)).text
    chunks = [json.loads(line[6:]) for line in text.splitlines() if line.startswith("data: {")]
    assert len(chunks) == 2  # the call's head and its first fragment
    assert "[DONE]" not in text
    assert all(c["choices"][0]["finish_reason"] is None for c in chunks)
    assert fake.log()[0]["outcome"] == "ended"


# ----- answers after tool results -----


def _after_tools(model: str, **extra: Any) -> dict[str, Any]:
    messages = [
        {"role": "user", "content": "weather and time in Paris?"},
        {
            "role": "assistant",
            "content": None,
            "tool_calls": [
                {"id": "c1", "type": "function", "function": {"name": "get_weather", "arguments": '{"city":"Paris"}'}},
                {"id": "c2", "type": "function", "function": {"name": "get_time", "arguments": "{}"}},
            ],
        },
        {"role": "tool", "tool_call_id": "c1", "content": "Sunny, 21 C."},
        {"role": "tool", "tool_call_id": "c2", "content": [{"type": "text", "text": "14:05"}]},
    ]
    return {"model": model, "messages": messages, "tools": [WEATHER_TOOL, TIME_TOOL], **extra}


def test_after_tool_text_answers_the_tool_results(fake: FakeUpstream) -> None:
    fake.configure(
        {"agent": {"tool_calls": TWO_CALLS, "after_tool_text": "Results: {tool_results} (for: {last_user})"}}
    )
    expected = "Results: Sunny, 21 C. 14:05 (for: weather and time in Paris?)"
    (choice,) = _post(fake, _after_tools("agent"))["choices"]
    assert choice["message"]["content"] == expected
    assert "tool_calls" not in choice["message"]
    assert choice["finish_reason"] == "stop"

    chunks, _ = _stream(fake, _after_tools("agent"))
    text = "".join(c["choices"][0]["delta"].get("content") or "" for c in chunks)
    assert text == expected
    assert not _tool_deltas(chunks)
    assert chunks[-1]["choices"][0]["finish_reason"] == "stop"

    # the first turn of the same model still proposes the calls
    assert _post(fake, _body("agent"))["choices"][0]["finish_reason"] == "tool_calls"


def test_without_after_tool_text_tool_results_get_the_normal_answer(fake: FakeUpstream) -> None:
    fake.configure({"looper": {"tool_calls": TWO_CALLS[:1]}, "plain": {}})
    assert _post(fake, _after_tools("looper"))["choices"][0]["finish_reason"] == "tool_calls"
    assert _post(fake, _after_tools("plain"))["choices"][0]["message"]["content"] == "Answer from plain."


# ----- scripted texts -----


def test_texts_answer_in_turn_then_repeat_the_last(fake: FakeUpstream) -> None:
    fake.configure({"retry": {"texts": ["not json", '{"ok": true}']}})
    answers = [_post(fake, _body("retry"))["choices"][0]["message"]["content"] for _ in range(3)]
    assert answers == ["not json", '{"ok": true}', '{"ok": true}']
    fake.configure({"retry": {"texts": ["first {last_user}", "second"]}})  # configure restarts the count
    chunks, _ = _stream(fake, _body("retry"))
    assert "".join(c["choices"][0]["delta"].get("content") or "" for c in chunks) == "first weather and time in Paris?"


def test_texts_count_failed_requests_too(fake: FakeUpstream) -> None:
    fake.configure({"flaky": {"texts": ["one", "two", "three"], "fail_times": 1}})
    with httpx.Client(timeout=5.0, trust_env=False) as http:
        assert http.post(f"{fake.base_url}/chat/completions", json=_body("flaky")).status_code == 500
    assert _post(fake, _body("flaky"))["choices"][0]["message"]["content"] == "two"


# ----- logprobs -----


def test_logprobs_non_streamed(fake: FakeUpstream) -> None:
    fake.configure({"lp": {"text": "one two three"}})
    choice = _post(fake, _body("lp", logprobs=True, top_logprobs=2))["choices"][0]
    content = choice["logprobs"]["content"]
    assert choice["logprobs"]["refusal"] is None
    assert [t["token"] for t in content] == ["one ", "two ", "three"]
    assert [t["logprob"] for t in content] == [-0.01, -0.02, -0.03]
    assert content[2]["bytes"] == list(b"three")
    assert content[0]["top_logprobs"] == [
        {"token": "one ", "logprob": -0.01, "bytes": list(b"one ")},
        {"token": "<alt1>", "logprob": -1.01, "bytes": list(b"<alt1>")},
    ]
    no_top = _post(fake, _body("lp", logprobs=True))["choices"][0]["logprobs"]["content"]
    assert [t["top_logprobs"] for t in no_top] == [[], [], []]
    assert _post(fake, _body("lp"))["choices"][0]["logprobs"] is None


def test_logprobs_streamed(fake: FakeUpstream) -> None:
    fake.configure({"lp": {"text": "one two three"}})
    chunks, _ = _stream(fake, _body("lp", logprobs=True, top_logprobs=3, stream_options={"include_usage": True}))
    choices = [c["choices"][0] for c in chunks if c["choices"]]
    assert choices[0]["logprobs"] == {"content": [], "refusal": None}  # the role chunk: no token yet
    tokens = [choice for choice in choices if choice["delta"].get("content")]
    assert [c["logprobs"]["content"][0]["token"] for c in tokens] == [c["delta"]["content"] for c in tokens]
    assert [c["logprobs"]["content"][0]["logprob"] for c in tokens] == [-0.01, -0.02, -0.03]
    assert [len(c["logprobs"]["content"][0]["top_logprobs"]) for c in tokens] == [3, 3, 3]
    assert choices[-1]["logprobs"] is None  # the finish chunk

    plain, _ = _stream(fake, _body("lp"))
    assert all(c["choices"][0]["logprobs"] is None for c in plain)


# ----- control API -----


@pytest.mark.parametrize(
    "behaviour",
    [
        {"tool_calls": {"name": "f"}},
        {"tool_calls": ["f"]},
        {"tool_calls": [{"arguments": {}}]},
        {"tool_calls": [{"name": ""}]},
        {"tool_calls": [{"name": "f", "arguments": [1, 2]}]},
        {"tool_calls": [{"name": "f", "arguments": 3}]},
        {"tool_calls": [{"name": "f", "id": 7}]},
        {"tool_calls": [{"name": "f", "type": "function"}]},
        {"texts": []},
        {"texts": "one"},
        {"texts": ["one", 2]},
        {"texts": ["one"], "text": "two"},
        {"after_tool_text": 5},
        {"after_tool_txt": "x"},
    ],
)
def test_control_rejects_bad_new_fields(fake: FakeUpstream, behaviour: dict[str, Any]) -> None:
    response = fake.client.post("/_control/models", json={"m": behaviour})
    assert response.status_code == 400
    assert response.json()["error"]


def test_log_without_tools(fake: FakeUpstream) -> None:
    _post(fake, _body("plain"))
    _post(fake, _body("plain", tools=[], tool_choice="none"))
    assert [(e["tools"], e["tool_choice"]) for e in fake.log()] == [(None, None), ([], "none")]


# ----- the Anthropic route -----


def test_anthropic_route_answers_text_and_after_tool_text(fake: FakeUpstream) -> None:
    fake.configure({"claude": {"tool_calls": TWO_CALLS, "after_tool_text": "Got {tool_results}"}})
    tools = [{"name": "get_weather", "input_schema": {"type": "object"}}]
    first: dict[str, Any] = {
        "model": "claude",
        "max_tokens": 50,
        "tools": tools,
        "messages": [{"role": "user", "content": "hi"}],
    }
    results = [{"type": "tool_result", "tool_use_id": "t1", "content": "sunny"}]
    second = {**first, "messages": [*first["messages"], {"role": "user", "content": results}]}
    with httpx.Client(timeout=5.0, trust_env=False) as http:
        answers = [http.post(f"{fake.root_url}/v1/messages", json=body).json() for body in (first, second)]
    assert [a["content"] for a in answers] == [
        [{"type": "text", "text": "Answer from claude."}],
        [{"type": "text", "text": "Got sunny"}],
    ]
    assert [e["tools"] for e in fake.log()] == [["get_weather"], ["get_weather"]]


# ----- the official SDK -----


class GetWeather(pydantic.BaseModel):
    """Current weather in a city."""

    city: str


class Verdict(pydantic.BaseModel):
    ok: bool


def test_sdk_parses_non_streamed_tool_calls(fake: FakeUpstream, client: OpenAI) -> None:
    fake.configure({"caller": {"tool_calls": TWO_CALLS}})
    result = client.chat.completions.create(
        model="caller",
        messages=[{"role": "user", "content": "weather?"}],
        tools=[WEATHER_TOOL, TIME_TOOL],
        tool_choice="required",
    )
    choice = result.choices[0]
    assert choice.finish_reason == "tool_calls"
    assert choice.message.content is None
    calls = choice.message.tool_calls or []
    assert [(c.id, c.type) for c in calls] == [("call_caller_1", "function"), ("call_explicit", "function")]
    assert [c.function.name for c in calls if c.type == "function"] == ["get_weather", "get_time"]
    assert [json.loads(c.function.arguments) for c in calls if c.type == "function"] == [
        {"city": "Paris"},
        {"zone": "Europe/Paris"},
    ]
    assert fake.log()[0]["tool_choice"] == "required"


def test_sdk_streams_tool_calls_raw_and_through_its_helper(fake: FakeUpstream, client: OpenAI) -> None:
    fake.configure({"caller": {"tool_calls": [{"name": "GetWeather", "arguments": {"city": "Oslo"}}] * 2}})
    messages: list[Any] = [{"role": "user", "content": "weather?"}]

    raw = client.chat.completions.create(model="caller", messages=messages, tools=[WEATHER_TOOL], stream=True)
    pieces: dict[int, str] = {}
    finish = None
    for chunk in raw:
        for delta in chunk.choices[0].delta.tool_calls or []:
            fragment = (delta.function.arguments or "") if delta.function else ""
            pieces[delta.index] = pieces.get(delta.index, "") + fragment
        finish = chunk.choices[0].finish_reason or finish
    assert pieces == {0: '{"city":"Oslo"}', 1: '{"city":"Oslo"}'}
    assert finish == "tool_calls"

    tool = openai.pydantic_function_tool(GetWeather)
    with client.chat.completions.stream(model="caller", messages=messages, tools=[tool]) as stream:
        events = [event.type for event in stream]
        final = stream.get_final_completion()
    assert events.count("tool_calls.function.arguments.delta") == 2 * (1 + 3)  # the SDK counts each head too
    assert events.count("tool_calls.function.arguments.done") == 2
    calls = final.choices[0].message.tool_calls or []
    assert final.choices[0].finish_reason == "tool_calls"
    assert [c.id for c in calls] == ["call_caller_3", "call_caller_4"]
    assert [c.function.parsed_arguments for c in calls] == [GetWeather(city="Oslo")] * 2


def test_sdk_stream_helper_collects_logprobs(fake: FakeUpstream, client: OpenAI) -> None:
    fake.configure({"lp": {"text": "alpha beta"}})
    messages: list[Any] = [{"role": "user", "content": "x"}]
    with client.chat.completions.stream(model="lp", messages=messages, logprobs=True, top_logprobs=1) as stream:
        final = stream.get_final_completion()
    logprobs = final.choices[0].logprobs
    assert logprobs is not None and logprobs.content is not None
    assert [(t.token, t.logprob) for t in logprobs.content] == [("alpha ", -0.01), ("beta", -0.02)]


def test_sdk_structured_answer_after_an_invalid_one(fake: FakeUpstream, client: OpenAI) -> None:
    fake.configure({"judge": {"texts": ["not json at all", '{"ok": true}']}})
    messages: list[Any] = [{"role": "user", "content": "is it ok?"}]
    with pytest.raises(pydantic.ValidationError):
        client.chat.completions.parse(model="judge", messages=messages, response_format=Verdict)
    parsed = client.chat.completions.parse(model="judge", messages=messages, response_format=Verdict)
    assert parsed.choices[0].message.parsed == Verdict(ok=True)
    response_format = fake.log()[-1]["body"]["response_format"]
    assert response_format["type"] == "json_schema"
    assert response_format["json_schema"]["name"] == "Verdict"


# ----- LiteLLM (how the service reaches its upstreams) -----


def test_litellm_reads_the_tool_calls(fake: FakeUpstream, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("LITELLM_LOCAL_MODEL_COST_MAP", "True")
    import litellm

    fake.configure({"x1": {"tool_calls": TWO_CALLS}})
    common: dict[str, Any] = {
        "model": "openai/x1",
        "api_base": fake.base_url,
        "api_key": "k",
        "messages": [{"role": "user", "content": "weather and time?"}],
        "tools": [WEATHER_TOOL, TIME_TOOL],
        "max_retries": 0,
    }
    response: Any = litellm.completion(**common)
    choice = response.choices[0]
    assert choice.finish_reason == "tool_calls"
    assert [(c.id, c.function.name, c.function.arguments) for c in choice.message.tool_calls] == [
        ("call_x1_1", "get_weather", '{"city":"Paris"}'),
        ("call_explicit", "get_time", '{"zone": "Europe/Paris"}'),
    ]

    chunks = list(litellm.completion(**common, stream=True))
    assembled: Any = litellm.stream_chunk_builder(chunks, messages=common["messages"])
    calls = assembled.choices[0].message.tool_calls
    assert [(c.function.name, json.loads(c.function.arguments)) for c in calls] == [
        ("get_weather", {"city": "Paris"}),
        ("get_time", {"zone": "Europe/Paris"}),
    ]
    assert assembled.choices[0].finish_reason == "tool_calls"
