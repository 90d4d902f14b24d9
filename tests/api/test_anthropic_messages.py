"""Anthropic's Messages surface (`/v1/messages`, `/v1/messages/count_tokens`, docs/anthropic.md) through the live
service and the fake upstream, with the official `anthropic` SDK (sync and async) and raw httpx: answers and streams
parsed with the SDK's types and every stream event checked in order, a tool loop, images, token counts, thinking
blocks and their signatures, errors in Anthropic's shape before and during a stream, the surface in records and
metrics, and the response cache shared with Chat Completions. The LLMs are this module's own (`am-*`)."""

from __future__ import annotations

import asyncio
import base64
from typing import Any

import anthropic
import httpx
import orjson
import pytest
from anthropic.types import Message, RawMessageStreamEvent, ThinkingBlock, ToolUseBlock
from pydantic import TypeAdapter

from tests.api.test_metrics import grew, scrape
from tests.conftest import TOKEN, Service, StartService, cl100k, llm, wait_until
from tests.fake_upstream import FakeUpstream

PNG = base64.b64encode(b"\x89PNG\r\n\x1a\n" + b"\x00" * 32).decode()
QUESTION = [{"role": "user", "content": "What is the capital of France?"}]
WEATHER = {
    "name": "get_weather",
    "description": "Current weather in a city.",
    "input_schema": {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]},
}
PARIS_CALL = {"name": "get_weather", "arguments": {"city": "Paris"}, "id": "call_w1"}
JUDGE_PROMPT = "AM-PROMPT: combine the panel's answers."
MAX_BODY = 100_000
EVENTS: TypeAdapter[RawMessageStreamEvent] = TypeAdapter(RawMessageStreamEvent)


def am_config(fake: FakeUpstream) -> dict[str, Any]:
    no_retry = {"retries": 0}
    return {
        "llm_definitions": [
            llm("am-a", fake, multimodal=True, **no_retry),
            llm("am-b", fake, multimodal=False, **no_retry),
            llm("am-judge", fake, capabilities={"tools": True}, **no_retry),
        ],
        "prompt_definitions": [{"name": "am", "content": JUDGE_PROMPT}],
        "models": [
            {"name": "am", "llms_to_query": ["am-a", "am-b"], "concluding_llm": "am-judge", "concluding_prompt": "am"},
            {
                "name": "am-think",
                "llms_to_query": ["am-a", "am-b"],
                "concluding_llm": "am-judge",
                "concluding_prompt": "am",
                "include_thinking_context": True,
            },
        ],
    }


@pytest.fixture(scope="module")
def svc(fake_server: FakeUpstream, start_service: StartService) -> Service:
    return start_service(am_config(fake_server), {"MOM_MAX_BODY_BYTES": str(MAX_BODY)})


def client(service: Service, key: str = TOKEN) -> anthropic.Anthropic:
    return anthropic.Anthropic(base_url=service.url, api_key=key, max_retries=0, timeout=30)


def raw_stream(service: Service, body: dict[str, Any]) -> list[dict[str, Any]]:
    """A streamed answer's events, as sent: each frame's `event:` line is its data's type."""
    response = httpx.post(
        f"{service.url}/v1/messages",
        headers={"x-api-key": TOKEN, "anthropic-version": "2023-06-01"},
        json={**body, "stream": True},
        timeout=30,
    )
    assert response.status_code == 200, response.text
    assert response.headers["content-type"].startswith("text/event-stream")
    events = []
    for frame in response.text.split("\n\n"):
        if not frame:
            continue
        kind, data = frame.split("\n")
        event = orjson.loads(data.removeprefix("data: "))
        assert kind == f"event: {event['type']}"
        events.append(event)
    return events


def check_order(events: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Anthropic's documented order: message_start; per block, content_block_start, its deltas,
    content_block_stop (blocks numbered from 0); message_delta; message_stop; pings anywhere after the start.
    Every event but ping parses with the SDK's types. Returns the events without the pings."""
    assert events[0]["type"] == "message_start"
    body = [e for e in events if e["type"] != "ping"]
    assert [e["type"] for e in body[-2:]] == ["message_delta", "message_stop"]
    for event in body:
        EVENTS.validate_python(event)
    open_index: int | None = None
    next_index = 0
    for event in body[1:-2]:
        kind = event["type"]
        if kind == "content_block_start":
            assert open_index is None and event["index"] == next_index
            open_index, next_index = next_index, next_index + 1
        elif kind in ("content_block_delta", "content_block_stop"):
            assert event["index"] == open_index, event
            open_index = None if kind == "content_block_stop" else open_index
        else:
            raise AssertionError(f"unexpected event {event}")
    assert open_index is None
    return body


def blocks(events: list[dict[str, Any]]) -> list[tuple[str, list[dict[str, Any]]]]:
    """(block type, its deltas) of each content block, in order."""
    out: list[tuple[str, list[dict[str, Any]]]] = []
    for event in events:
        if event["type"] == "content_block_start":
            out.append((event["content_block"]["type"], []))
        elif event["type"] == "content_block_delta":
            out[-1][1].append(event["delta"])
    return out


def sent_to(fake: FakeUpstream, model: str) -> list[dict[str, Any]]:
    return [entry["body"] for entry in fake.log() if entry["model"] == model]


def error_of(exc: anthropic.APIStatusError) -> dict[str, Any]:
    """The error object of an Anthropic-shaped error body."""
    assert isinstance(exc.body, dict) and exc.body["type"] == "error", exc.body
    error: dict[str, Any] = exc.body["error"]
    return error


def mom_of(message: Message) -> dict[str, Any]:
    extra = message.model_extra or {}
    breakdown: dict[str, Any] = extra["mom"]
    return breakdown


# --------------------------------------------------------------------------------------------------- answers


def test_create_sync_translates_the_request_and_answers_a_message(svc: Service, fake: FakeUpstream) -> None:
    fake.configure({"am-judge": {"text": "Paris is the capital.", "cached_tokens": 2}})
    message = client(svc).messages.create(
        model="am",
        max_tokens=300,
        system=[{"type": "text", "text": "Be brief.", "cache_control": {"type": "ephemeral"}}],
        messages=[{"role": "user", "content": [{"type": "text", "text": "What is the capital of France?"}]}],
        stop_sequences=["END"],
        metadata={"user_id": "user-7"},
        cache_control={"type": "ephemeral"},
        extra_body={"temperature": 0.2, "top_k": 5},  # (sampling parameters are no longer among the SDK's arguments)
    )
    assert isinstance(message, Message) and message.id.startswith("msg_")
    assert (message.role, message.model, message.stop_reason, message.stop_sequence) == (
        "assistant",
        "am",
        "end_turn",
        None,
    )
    assert [(b.type, getattr(b, "text", None)) for b in message.content] == [("text", "Paris is the capital.")]
    breakdown = mom_of(message)
    calls = [*breakdown["members"], breakdown["concluding"]]
    prompt = sum(c["usage"]["prompt_tokens"] for c in calls)
    cached = sum(c["usage"]["prompt_tokens_details"]["cached_tokens"] for c in calls)
    assert cached == 2
    assert message.usage.input_tokens == prompt - cached
    assert message.usage.cache_read_input_tokens == cached
    assert message.usage.output_tokens == sum(c["usage"]["completion_tokens"] for c in calls)

    judge = sent_to(fake, "am-judge")[0]
    assert judge["messages"][0] == {"role": "system", "content": JUDGE_PROMPT}
    assert judge["messages"][1:3] == [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": "What is the capital of France?"},
    ]
    assert (judge["max_tokens"], judge["stop"], judge["temperature"]) == (300, ["END"], 0.2)
    assert "top_k" not in judge
    for member in ("am-a", "am-b"):
        body = sent_to(fake, member)[0]
        assert body["temperature"] == 0.2 and "max_tokens" not in body and "stop" not in body
        assert body["messages"] == judge["messages"][1:3]


def test_create_async(svc: Service, fake: FakeUpstream) -> None:
    async def ask() -> Message:
        async with anthropic.AsyncAnthropic(base_url=svc.url, api_key=TOKEN, max_retries=0) as aclient:
            return await aclient.messages.create(model="am", max_tokens=50, messages=QUESTION)

    message = asyncio.run(ask())
    assert message.content[0].type == "text" and message.content[0].text == "Answer from am-judge."
    assert mom_of(message)["answered"] == 2


def test_stream_events_in_anthropic_order_with_pings_while_the_panel_works(svc: Service, fake: FakeUpstream) -> None:
    fake.configure({"am-judge": {"text": "Paris, on the Seine."}})
    events = raw_stream(svc, {"model": "am", "max_tokens": 50, "messages": QUESTION})
    body = check_order(events)
    kinds = [e["type"] for e in events]
    assert kinds[:3] == ["message_start", "ping", "ping"]  # one per member settled
    assert kinds.count("ping") == 2
    assert events[0]["message"]["content"] == [] and events[0]["message"]["stop_reason"] is None
    [(kind, deltas)] = blocks(body)
    assert kind == "text" and len(deltas) == 4  # the fake's tokens: "Paris, ", "on ", "the ", "Seine."
    assert "".join(d["text"] for d in deltas) == "Paris, on the Seine."
    end = body[-2]
    assert end["delta"] == {"stop_reason": "end_turn", "stop_sequence": None}
    assert end["usage"]["output_tokens"] == sum(
        c["usage"]["completion_tokens"] for c in [*end["mom"]["members"], end["mom"]["concluding"]]
    )


def test_sdk_stream_helper_and_thinking_block_with_a_verified_signature(svc: Service, fake: FakeUpstream) -> None:
    sdk = client(svc)
    with sdk.messages.stream(model="am-think", max_tokens=50, messages=QUESTION) as stream:
        kinds = [event.type for event in stream]
        final = stream.get_final_message()
    assert kinds[0] == "message_start" and kinds[-1] == "message_stop"
    thinking, text = final.content
    assert isinstance(thinking, ThinkingBlock) and text.type == "text"
    assert text.text == "Answer from am-judge."
    assert "Model: am-a\nContent: Answer from am-a.\n---\n" in thinking.thinking
    assert "Model: am-b\nContent: Answer from am-b.\n---\n" in thinking.thinking
    assert thinking.signature

    events = raw_stream(svc, {"model": "am-think", "max_tokens": 50, "messages": QUESTION})
    body = check_order(events)
    assert "ping" not in [e["type"] for e in events]  # the thinking deltas show the panel's progress
    (first, thinking_deltas), (second, _) = blocks(body)
    assert (first, second) == ("thinking", "text")
    assert [d["type"] for d in thinking_deltas] == ["thinking_delta", "thinking_delta", "signature_delta"]

    # the block sent back as it came is accepted; changed, it is refused as Anthropic refuses it
    turn = [*QUESTION, {"role": "assistant", "content": final.content}, {"role": "user", "content": "And Italy?"}]
    again = sdk.messages.create(model="am", max_tokens=50, messages=turn)
    assert again.stop_reason == "end_turn"
    assert sent_to(fake, "am-judge")[-1]["messages"][2] == {"role": "assistant", "content": "Answer from am-judge."}
    forged = thinking.model_dump() | {"thinking": thinking.thinking.replace("am-a", "am-z")}
    turn[1] = {"role": "assistant", "content": [forged, text.model_dump()]}
    with pytest.raises(anthropic.BadRequestError) as refused:
        sdk.messages.create(model="am", max_tokens=50, messages=turn)
    assert refused.value.body == {
        "type": "error",
        "error": {
            "type": "invalid_request_error",
            "message": "messages.1.content.0: Invalid `signature` in `thinking` block.",
        },
    }


def test_thinking_asked_by_the_client(svc: Service, fake: FakeUpstream) -> None:
    message = client(svc).messages.create(
        model="am", max_tokens=2048, thinking={"type": "enabled", "budget_tokens": 1024}, messages=QUESTION
    )
    assert [b.type for b in message.content] == ["thinking", "text"]
    with pytest.raises(anthropic.BadRequestError) as refused:
        client(svc).messages.create(
            model="am", max_tokens=1000, thinking={"type": "enabled", "budget_tokens": 1024}, messages=QUESTION
        )
    assert error_of(refused.value)["message"].startswith("max_tokens: ")


# -------------------------------------------------------------------------------------------------- tools


def test_a_tool_loop(svc: Service, fake: FakeUpstream) -> None:
    fake.configure({"am-judge": {"tool_calls": [PARIS_CALL], "after_tool_text": "In Paris: {tool_results}."}})
    sdk = client(svc)
    ask = {"model": "am", "max_tokens": 200, "tools": [WEATHER], "tool_choice": {"type": "auto"}}
    with sdk.messages.stream(**ask, messages=QUESTION) as stream:
        first = stream.get_final_message()
    assert first.stop_reason == "tool_use"
    [call] = [b for b in first.content if isinstance(b, ToolUseBlock)]
    assert (call.id, call.name, call.input) == ("call_w1", "get_weather", {"city": "Paris"})
    judge = sent_to(fake, "am-judge")[0]
    assert judge["tools"] == [
        {
            "type": "function",
            "function": {
                "name": "get_weather",
                "description": WEATHER["description"],
                "parameters": WEATHER["input_schema"],
            },
        }
    ]
    assert judge["tool_choice"] == "auto"

    events = raw_stream(svc, {**ask, "messages": QUESTION})
    [(kind, deltas)] = blocks(check_order(events))
    assert kind == "tool_use" and {d["type"] for d in deltas} == {"input_json_delta"}
    assert orjson.loads("".join(d["partial_json"] for d in deltas)) == {"city": "Paris"}
    assert events[-2]["delta"]["stop_reason"] == "tool_use"

    result = {"type": "tool_result", "tool_use_id": call.id, "content": [{"type": "text", "text": "18 C and sunny"}]}
    turn = [*QUESTION, {"role": "assistant", "content": first.content}, {"role": "user", "content": [result]}]
    fake.clear_log()
    final = sdk.messages.create(**ask, messages=turn)
    assert final.stop_reason == "end_turn"
    assert [(b.type, getattr(b, "text", None)) for b in final.content] == [("text", "In Paris: 18 C and sunny.")]
    assert mom_of(final)["turn"] == "relay"
    [relayed] = [entry["body"] for entry in fake.log()]  # the loop's next step: the concluding LLM alone
    assert relayed["model"] == "am-judge"
    assert relayed["messages"][-2:] == [
        {
            "role": "assistant",
            "content": None,
            "tool_calls": [
                {
                    "id": "call_w1",
                    "type": "function",
                    "function": {"name": "get_weather", "arguments": '{"city":"Paris"}'},
                }
            ],
        },
        {"role": "tool", "content": "18 C and sunny", "tool_call_id": "call_w1"},
    ]


def test_tool_options_and_errors(svc: Service, fake: FakeUpstream) -> None:
    sdk = client(svc)
    sdk.messages.create(
        model="am",
        max_tokens=50,
        tools=[WEATHER],
        tool_choice={"type": "tool", "name": "get_weather", "disable_parallel_tool_use": True},
        messages=QUESTION,
    )
    judge = sent_to(fake, "am-judge")[0]
    assert judge["tool_choice"] == {"type": "function", "function": {"name": "get_weather"}}
    assert judge["parallel_tool_calls"] is False
    with pytest.raises(anthropic.BadRequestError) as refused:
        sdk.messages.create(
            model="am",
            max_tokens=50,
            tools=[{"type": "web_search_20250305", "name": "web_search"}],
            messages=QUESTION,
        )
    assert error_of(refused.value)["message"].startswith(
        "tools.0.type: the tool type 'web_search_20250305' is not supported"
    )
    orphan = [{"role": "user", "content": [{"type": "tool_result", "tool_use_id": "toolu_x", "content": "1"}]}]
    with pytest.raises(anthropic.BadRequestError) as refused:
        sdk.messages.create(model="am", max_tokens=50, messages=orphan)
    assert error_of(refused.value)["message"].startswith("messages.0.content.0: unexpected `tool_use_id`")


# -------------------------------------------------------------------------------------------------- images


def test_images_base64_sent_and_a_private_url_refused(svc: Service, fake: FakeUpstream) -> None:
    sdk = client(svc)
    image = {"type": "image", "source": {"type": "base64", "media_type": "image/png", "data": PNG}}
    question = [{"role": "user", "content": [{"type": "text", "text": "What is this?"}, image]}]
    message = sdk.messages.create(model="am", max_tokens=50, messages=question)
    assert [m["status"] for m in mom_of(message)["members"]] == ["ok", "skipped"]  # am-b cannot see images
    [sent] = sent_to(fake, "am-a")
    assert sent["messages"][0]["content"][1] == {
        "type": "image_url",
        "image_url": {"url": f"data:image/png;base64,{PNG}"},
    }

    private = {"type": "image", "source": {"type": "url", "url": "http://127.0.0.1:9/cat.png"}}
    fake.clear_log()
    with pytest.raises(anthropic.BadRequestError) as refused:
        sdk.messages.create(
            model="am", max_tokens=50, messages=[{"role": "user", "content": [{"type": "text", "text": "?"}, private]}]
        )
    assert error_of(refused.value)["type"] == "invalid_request_error"
    assert error_of(refused.value)["message"].startswith(
        "messages.0.content.1.source: The image URL points to a private"
    )
    assert fake.log() == []
    with pytest.raises(anthropic.BadRequestError) as refused:
        bad = {"type": "image", "source": {"type": "base64", "media_type": "image/png"}}
        sdk.messages.create(
            model="am", max_tokens=50, messages=[{"role": "user", "content": [{"type": "text", "text": "?"}, bad]}]
        )
    assert error_of(refused.value)["message"] == "messages.0.content.1.source.data: Field required"


# ------------------------------------------------------------------------------------------- count_tokens


def test_count_tokens_counts_the_concluding_llms_conversation(svc: Service, fake: FakeUpstream) -> None:
    sdk = client(svc)
    short = sdk.messages.count_tokens(model="am", messages=QUESTION).input_tokens
    extra = " apple" * 100
    longer = [{"role": "user", "content": QUESTION[0]["content"] + extra}]
    grown = sdk.messages.count_tokens(model="am", messages=longer).input_tokens
    encoding = cl100k()
    assert grown - short == len(encoding.encode(longer[0]["content"])) - len(encoding.encode(QUESTION[0]["content"]))
    # the concluding prompt, then the conversation: more than the question alone
    assert short > len(encoding.encode(JUDGE_PROMPT)) + len(encoding.encode(QUESTION[0]["content"]))
    with_tools = sdk.messages.count_tokens(model="am", messages=QUESTION, tools=[WEATHER]).input_tokens
    assert with_tools > short
    assert fake.log() == []  # no upstream call
    with pytest.raises(anthropic.NotFoundError) as missing:
        sdk.messages.count_tokens(model="nope", messages=QUESTION)
    assert error_of(missing.value)["type"] == "not_found_error"


# -------------------------------------------------------------------------------------------------- errors


def test_errors_in_anthropics_shape(svc: Service, fake: FakeUpstream) -> None:
    with pytest.raises(anthropic.AuthenticationError) as denied:
        client(svc, key="wrong-key").messages.create(model="am", max_tokens=5, messages=QUESTION)
    assert error_of(denied.value)["type"] == "authentication_error"
    with pytest.raises(anthropic.NotFoundError) as missing:
        client(svc).messages.create(model="no-such-model", max_tokens=5, messages=QUESTION)
    assert missing.value.body == {
        "type": "error",
        "error": {"type": "not_found_error", "message": "The model 'no-such-model' does not exist."},
    }
    headers = {"x-api-key": TOKEN, "anthropic-version": "2023-06-01", "anthropic-beta": "anything"}
    url = f"{svc.url}/v1/messages"
    no_max = httpx.post(url, headers=headers, json={"model": "am", "messages": QUESTION})
    assert no_max.status_code == 400
    assert no_max.json() == {
        "type": "error",
        "error": {"type": "invalid_request_error", "message": "max_tokens: Field required"},
    }
    too_big = httpx.post(
        url,
        headers=headers,
        json={"model": "am", "max_tokens": 5, "messages": [{"role": "user", "content": "x" * MAX_BODY}]},
    )
    assert too_big.status_code == 413 and too_big.json()["error"]["type"] == "request_too_large"
    assert fake.log() == []


def test_upstream_failures_before_and_during_a_stream(svc: Service, fake: FakeUpstream) -> None:
    sdk = client(svc)
    fake.configure({"am-a": {"status": 500}, "am-b": {"status": 500}})
    with pytest.raises(anthropic.InternalServerError) as failed:
        sdk.messages.create(model="am", max_tokens=50, messages=QUESTION)
    assert failed.value.status_code == 502 and error_of(failed.value)["type"] == "api_error"
    # streamed too: nothing is sent before a member answers, so a panel that all fails is an HTTP error
    with pytest.raises(anthropic.InternalServerError) as failed:
        sdk.messages.create(model="am", max_tokens=50, messages=QUESTION, stream=True)
    assert failed.value.status_code == 502 and error_of(failed.value)["type"] == "api_error"

    # a tool loop's next step goes to the concluding LLM alone: its failure comes before the stream's first byte
    fake.configure({"am-judge": {"status": 500}})
    turn = [
        *QUESTION,
        {"role": "assistant", "content": [{"type": "tool_use", "id": "call_1", "name": "get_weather", "input": {}}]},
        {"role": "user", "content": [{"type": "tool_result", "tool_use_id": "call_1", "content": "sunny"}]},
    ]
    with pytest.raises(anthropic.InternalServerError) as failed:
        sdk.messages.create(model="am", max_tokens=50, tools=[WEATHER], messages=turn, stream=True)
    assert failed.value.status_code == 502 and error_of(failed.value)["type"] == "api_error"

    # the concluding LLM fails after its first tokens: the stream's last event is an error
    fake.configure(
        {
            "am-a": {"text": "A"},
            "am-b": {"text": "B"},
            "am-judge": {"text": "one two three four", "stop_after_tokens": 2, "token_delay_ms": 100},
        }
    )
    events = raw_stream(svc, {"model": "am", "max_tokens": 50, "messages": QUESTION})
    assert events[-1]["type"] == "error" and events[-1]["error"]["type"] == "api_error"
    assert "message_stop" not in [e["type"] for e in events]
    with pytest.raises(anthropic.APIStatusError) as during:
        for _ in sdk.messages.create(model="am", max_tokens=50, messages=QUESTION, stream=True):
            pass
    assert error_of(during.value)["type"] == "api_error"


def test_rate_limit(fake_server: FakeUpstream, start_service: StartService, fake: FakeUpstream) -> None:
    limited = start_service(am_config(fake_server), {"MOM_RATE_LIMIT_RPM": "1"})
    sdk = client(limited)
    sdk.messages.create(model="am", max_tokens=5, messages=QUESTION)
    with pytest.raises(anthropic.RateLimitError) as limit:
        sdk.messages.create(model="am", max_tokens=5, messages=QUESTION)
    assert error_of(limit.value)["type"] == "rate_limit_error"
    assert int(limit.value.response.headers["retry-after"]) >= 1


def test_over_capacity_is_overloaded(
    fake_server: FakeUpstream, start_service: StartService, fake: FakeUpstream
) -> None:
    crowded = start_service(am_config(fake_server), {"MOM_MAX_IN_FLIGHT": "1"})
    fake.configure({"am-a": {"hang": True}})  # am-b answers: the stream begins (a ping), and stays in flight

    async def crowd() -> anthropic.APIStatusError:
        body = {"model": "am", "max_tokens": 5, "messages": QUESTION, "stream": True}
        async with (
            httpx.AsyncClient(timeout=30) as holding,
            holding.stream("POST", f"{crowded.url}/v1/messages", headers={"x-api-key": TOKEN}, json=body) as held,
        ):
            first = await anext(held.aiter_raw())
            assert first.startswith(b"event: message_start\n")
            async with anthropic.AsyncAnthropic(base_url=crowded.url, api_key=TOKEN, max_retries=0) as sdk:
                try:
                    await sdk.messages.create(model="am", max_tokens=5, messages=QUESTION)
                except anthropic.APIStatusError as exc:
                    return exc
        raise AssertionError("a second answer was admitted")

    refused = asyncio.run(crowd())
    assert isinstance(refused, anthropic.OverloadedError) and refused.status_code == 529
    assert error_of(refused)["type"] == "overloaded_error"
    wait_until(lambda: fake.log()[0]["outcome"] == "disconnected")  # the held answer let go of its member's call


# ------------------------------------------------------------------------------- models, records, cache


def test_models_list_in_anthropics_shape(svc: Service) -> None:
    ids = [model.id for model in client(svc).models.list()]
    assert ids == ["am", "am-think"]


def test_records_and_metrics_carry_the_surface(svc: Service, fake: FakeUpstream) -> None:
    before = scrape(svc)
    client(svc).messages.create(model="am", max_tokens=5, messages=QUESTION)
    delta = grew(before, scrape(svc))
    assert delta("mom_requests_total", model="am", surface="messages", outcome="ok") == 1
    assert delta("mom_requests_total", model="am", surface="chat", outcome="ok") == 0

    def by_surface() -> dict[str, Any]:
        report = httpx.get(f"{svc.base_url}/metrics/usage", headers=svc.headers(), params={"group_by": "surface"})
        return {group["key"]: group for group in report.json()["groups"]}

    wait_until(lambda: by_surface().get("messages", {}).get("requests", 0) >= 1)


def test_the_cache_is_shared_with_chat_completions(
    fake_server: FakeUpstream, start_service: StartService, fake: FakeUpstream
) -> None:
    cached = start_service(am_config(fake_server), {"MOM_CACHE_ENABLED": "true", "REDIS_URL": ""})
    question = [{"role": "user", "content": "Shared between the surfaces?"}]
    chat = cached.chat("am", question, max_tokens=40)
    assert chat.status_code == 200 and chat.json()["mom"]["cache"] == "miss"
    calls = len(fake.log())
    message = client(cached).messages.create(model="am", max_tokens=40, messages=question)
    assert mom_of(message)["cache"] == "hit"
    assert (
        message.content[0].type == "text" and message.content[0].text == chat.json()["choices"][0]["message"]["content"]
    )
    assert len(fake.log()) == calls
    other = client(cached).messages.create(model="am", max_tokens=41, messages=question)
    assert mom_of(other)["cache"] == "miss"


# ------------------------------------------------------------------ what Claude Code sends (tests/agents)

CLAUDE_CODE_HEADERS = {
    "x-api-key": TOKEN,
    "anthropic-version": "2023-06-01",
    "anthropic-beta": "claude-code-20250219,interleaved-thinking-2025-05-14,context-management-2025-06-27,"
    "advanced-tool-use-2025-11-20,effort-2025-11-24",
    "x-app": "cli",
}
BASH = {
    "name": "Bash",
    "description": "Executes a bash command.",
    "input_schema": {
        "$schema": "https://json-schema.org/draft/2020-12/schema",
        "type": "object",
        "properties": {"command": {"type": "string"}, "description": {"type": "string"}},
        "required": ["command"],
        "additionalProperties": False,
    },
}
TOOL_SEARCH = {
    "name": "ToolSearch",
    "description": "Fetches full schema definitions for deferred tools.",
    "input_schema": {"type": "object", "properties": {"query": {"type": "string"}}, "required": ["query"]},
}
PLACEHOLDER = {
    "name": "DeferredToolPlaceholder",
    "description": "Reserved placeholder that keeps deferred tool loading active; never call this tool.",
    "input_schema": {"type": "object", "properties": {}},
    "defer_loading": True,
}


def claude_code_body(messages: list[dict[str, Any]], tools: list[dict[str, Any]], **extra: Any) -> dict[str, Any]:
    """A request shaped as Claude Code 2.1.332 (`claude -p`) sends it (/tmp captures of tests/agents' CLI)."""
    ephemeral = {"type": "ephemeral"}
    return {
        "model": "am",
        "max_tokens": 32000,
        "stream": True,
        "system": [
            {"type": "text", "text": "x-anthropic-billing-header: cc_version=2.1.332; cc_entrypoint=sdk-cli;"},
            {"type": "text", "text": "You are a Claude agent.", "cache_control": ephemeral},
        ],
        "messages": messages,
        "tools": tools,
        "metadata": {"user_id": '{"device_id":"d1","account_uuid":"","session_id":"s1"}'},
        "thinking": {"type": "adaptive", "display": "omitted"},
        "context_management": {"edits": [{"type": "clear_thinking_20251015", "keep": "all"}]},
        "output_config": {"effort": "high"},
        **extra,
    }


def claude_code_stream(service: Service, body: dict[str, Any]) -> list[dict[str, Any]]:
    response = httpx.post(
        f"{service.url}/v1/messages", params={"beta": "true"}, headers=CLAUDE_CODE_HEADERS, json=body, timeout=30
    )
    assert response.status_code == 200, response.text
    return [orjson.loads(frame.split("\n")[1].removeprefix("data: ")) for frame in response.text.split("\n\n") if frame]


def test_claude_codes_request_its_system_messages_and_deferred_tools(svc: Service, fake: FakeUpstream) -> None:
    """Its environment comes as a `system` message among the others (blocks, later a string): it joins the system
    prompt. Its placeholder tool (`defer_loading`) reaches no LLM; the other options are accepted."""
    fake.configure({"am-judge": {"tool_calls": [{"name": "Bash", "arguments": {"command": "ls"}, "id": "toolu_1"}]}})
    ephemeral = {"type": "ephemeral"}
    question = {"role": "user", "content": [{"type": "text", "text": "List the files.", "cache_control": ephemeral}]}
    environment = {"role": "system", "content": [{"type": "text", "text": "# Environment", "cache_control": ephemeral}]}
    events = claude_code_stream(svc, claude_code_body([question, environment], [BASH, PLACEHOLDER]))
    body = check_order(events)
    assert body[-2]["delta"]["stop_reason"] == "tool_use"
    judge = sent_to(fake, "am-judge")[0]
    assert judge["messages"][1:3] == [
        {
            "role": "system",
            "content": "x-anthropic-billing-header: cc_version=2.1.332; cc_entrypoint=sdk-cli;\n\n"
            "You are a Claude agent.\n\n# Environment",
        },
        {"role": "user", "content": "List the files."},
    ]
    assert [tool["function"]["name"] for tool in judge["tools"]] == ["Bash"]
    assert judge["tools"][0]["function"]["parameters"] == BASH["input_schema"]
    for member in ("am-a", "am-b"):
        assert [tool["function"]["name"] for tool in sent_to(fake, member)[0]["tools"]] == ["Bash"]

    # the next turn: the environment as a string, the result with `is_error` and `cache_control`
    call = {"role": "assistant", "content": [{"type": "tool_use", "id": "toolu_1", "name": "Bash", "input": {}}]}
    result = {"type": "tool_result", "tool_use_id": "toolu_1", "content": "a.txt", "is_error": False}
    turn = [question, {"role": "system", "content": "# Environment"}, call, {"role": "user", "content": [result]}]
    fake.configure({"am-judge": {"after_tool_text": "Files: {tool_results}"}})
    events = claude_code_stream(svc, claude_code_body(turn, [BASH, PLACEHOLDER]))
    assert [d["text"] for _, deltas in blocks(check_order(events)) for d in deltas] == ["Files: ", "a.txt"]
    relayed = sent_to(fake, "am-judge")[-1]
    assert [m["role"] for m in relayed["messages"]] == ["system", "user", "assistant", "tool"]
    assert relayed["messages"][0]["content"].endswith("You are a Claude agent.\n\n# Environment")


def test_claude_codes_tool_search_loads_a_deferred_tool(svc: Service, fake: FakeUpstream) -> None:
    """Its tool search answers with `tool_reference` blocks: the tool they name is callable from then on."""
    web_fetch = {**WEATHER, "name": "WebFetch", "defer_loading": True}
    search = {"role": "assistant", "content": [{"type": "tool_use", "id": "t1", "name": "ToolSearch", "input": {}}]}
    reference = {"type": "tool_reference", "tool_name": "WebFetch"}
    found = {"role": "user", "content": [{"type": "tool_result", "tool_use_id": "t1", "content": [reference]}]}
    fake.configure({"am-judge": {"after_tool_text": "Loaded."}})
    messages = [{"role": "user", "content": "Fetch the page."}, search, found]
    events = claude_code_stream(svc, claude_code_body(messages, [TOOL_SEARCH, web_fetch, PLACEHOLDER]))
    assert [d["text"] for _, deltas in blocks(check_order(events)) for d in deltas] == ["Loaded."]
    [relayed] = sent_to(fake, "am-judge")
    assert [tool["function"]["name"] for tool in relayed["tools"]] == ["ToolSearch", "WebFetch"]
    assert relayed["messages"][-1] == {
        "role": "tool",
        "content": "(The tool WebFetch is loaded: it can be called now.)",
        "tool_call_id": "t1",
    }


def test_structured_outputs_by_output_config_format(svc: Service, fake: FakeUpstream) -> None:
    """As Claude Code names a session: `output_config.format` is the concluding call's `response_format`."""
    schema = {
        "type": "object",
        "properties": {"title": {"type": "string"}},
        "required": ["title"],
        "additionalProperties": False,
    }
    fake.configure({"am-judge": {"text": '{"title": "Listing files"}'}})
    form = {"effort": "high", "format": {"type": "json_schema", "schema": schema}}
    message = client(svc).messages.create(
        model="am", max_tokens=100, messages=QUESTION, extra_body={"output_config": form}
    )
    assert [(b.type, getattr(b, "text", None)) for b in message.content] == [("text", '{"title": "Listing files"}')]
    assert mom_of(message)["structured_output"] == "valid"
    judge = sent_to(fake, "am-judge")[0]
    assert judge["response_format"] == {"type": "json_schema", "json_schema": {"name": "output", "schema": schema}}
    assert all("response_format" not in body for member in ("am-a", "am-b") for body in sent_to(fake, member))
    with pytest.raises(anthropic.BadRequestError) as refused:
        client(svc).messages.create(
            model="am",
            max_tokens=100,
            messages=QUESTION,
            extra_body={"output_config": {"format": {"type": "json_schema", "schema": {"type": "nope"}}}},
        )
    assert error_of(refused.value)["message"].startswith("output_config.format.schema: Invalid schema: ")
