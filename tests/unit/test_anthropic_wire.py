"""Anthropic's Messages surface without a service: requests validated and translated into the engine's request (the
same as the equivalent Chat Completions request's), errors named Anthropic's way, thinking signatures, and the
engine's events encoded as a `message` and as its stream (the stream accumulated by the SDK equals the body)."""

from __future__ import annotations

from typing import Any

import orjson
import pytest
from anthropic.lib.streaming._messages import accumulate_event
from anthropic.types import Message, RawMessageStreamEvent
from pydantic import SecretStr, TypeAdapter

from mom_service.api.encoders.anthropic import MessageCollector, MessageStreamEncoder, tool_input, usage_object
from mom_service.api.schemas.anthropic import CountTokensRequest, MessagesRequest, parse_request
from mom_service.api.schemas.anthropic_engine import EngineParts, translate
from mom_service.api.schemas.openai import RequestLimits, parse_chat_request
from mom_service.api.signing import ThinkingSigner
from mom_service.engine.events import (
    Breakdown,
    CallReport,
    Completed,
    ContentDelta,
    Event,
    MemberFinished,
    PanelDone,
    ToolCallDelta,
    Usage,
)
from mom_service.errors import InvalidRequest
from mom_service.settings import Settings

SIGNER = ThinkingSigner(b"test-key")
LIMITS = RequestLimits()
TOOL = {"name": "get_weather", "description": "Weather.", "input_schema": {"type": "object"}}
EVENTS: TypeAdapter[RawMessageStreamEvent] = TypeAdapter(RawMessageStreamEvent)


def parts(body: dict[str, Any], model: type[CountTokensRequest] = MessagesRequest) -> EngineParts:
    return translate(parse_request(body, model, LIMITS), SIGNER.verify, LIMITS.max_text_chars)


def refused(body: dict[str, Any]) -> str:
    with pytest.raises(InvalidRequest) as error:
        parts(body)
    assert error.value.status_code == 400
    return error.value.message


def ask(messages: list[dict[str, Any]], **fields: Any) -> dict[str, Any]:
    return {"model": "mom", "max_tokens": 100, "messages": messages, **fields}


# ---------------------------------------------------------------------------------------------- translation


def test_a_conversation_becomes_the_engines() -> None:
    signed = {"type": "thinking", "thinking": "members said", "signature": SIGNER.sign("members said")}
    image = {"type": "image", "source": {"type": "url", "url": "https://example.com/a.png"}}
    body = ask(
        [
            {"role": "user", "content": [{"type": "text", "text": "Weather?", "cache_control": {"type": "ephemeral"}}]},
            {
                "role": "assistant",
                "content": [
                    signed,
                    {"type": "redacted_thinking", "data": "opaque"},
                    {"type": "text", "text": "Let me look."},
                    {"type": "tool_use", "id": "toolu_1", "name": "get_weather", "input": {"city": "Paris"}},
                    {"type": "tool_use", "id": "toolu_2", "name": "get_weather", "input": {"city": "Oslo"}},
                ],
            },
            {
                "role": "user",
                "content": [
                    {"type": "text", "text": "Here:"},
                    {"type": "tool_result", "tool_use_id": "toolu_1", "content": "18 C"},
                    {
                        "type": "tool_result",
                        "tool_use_id": "toolu_2",
                        "is_error": True,
                        "content": [
                            {"type": "text", "text": "no station"},
                            image,
                        ],
                    },
                ],
            },
        ],
        system=[{"type": "text", "text": "One."}, {"type": "text", "text": "Two."}],
        tools=[TOOL],
        tool_choice={"type": "any", "disable_parallel_tool_use": True},
        stop_sequences=["END"],
        temperature=0.5,
        top_p=0.9,
        top_k=40,
        metadata={"user_id": "u-1"},
    )
    out = parts(body)
    assert out.messages == [
        {"role": "system", "content": "One.\n\nTwo."},
        {"role": "user", "content": "Weather?"},
        {
            "role": "assistant",
            "content": "Let me look.",
            "tool_calls": [
                {
                    "id": "toolu_1",
                    "type": "function",
                    "function": {"name": "get_weather", "arguments": '{"city":"Paris"}'},
                },
                {
                    "id": "toolu_2",
                    "type": "function",
                    "function": {"name": "get_weather", "arguments": '{"city":"Oslo"}'},
                },
            ],
        },
        {"role": "tool", "content": "18 C", "tool_call_id": "toolu_1"},
        {"role": "tool", "content": "Error: no station", "tool_call_id": "toolu_2"},
        {
            "role": "user",
            "content": [
                {"type": "text", "text": "Here:"},
                {"type": "text", "text": "(An image from the tool result toolu_2:)"},
                {"type": "image_url", "image_url": {"url": "https://example.com/a.png"}},
            ],
        },
    ]
    assert out.images == {(5, 2): "messages.2.content.2.content.1.source"}
    assert out.params == {"temperature": 0.5, "top_p": 0.9, "user": "u-1"}  # top_k: not forwarded
    assert out.final_params == {
        "max_tokens": 100,
        "stop": ["END"],
        "tool_choice": "required",
        "parallel_tool_calls": False,
    }
    assert out.tools == [
        {
            "type": "function",
            "function": {"name": "get_weather", "description": "Weather.", "parameters": {"type": "object"}},
        }
    ]


def test_the_engine_request_is_the_equivalent_chat_requests() -> None:
    """What makes the response cache shared between the surfaces."""
    anthropic_body = ask(
        [
            {"role": "user", "content": "Weather?"},
            {"role": "assistant", "content": [{"type": "tool_use", "id": "c1", "name": "get_weather", "input": {}}]},
            {"role": "user", "content": [{"type": "tool_result", "tool_use_id": "c1", "content": "sunny"}]},
        ],
        system="Be brief.",
        tools=[TOOL],
        tool_choice={"type": "tool", "name": "get_weather"},
        temperature=0.3,
        stop_sequences=["X"],
    )
    chat = parse_chat_request(
        {
            "model": "mom",
            "max_tokens": 100,
            "messages": [
                {"role": "system", "content": "Be brief."},
                {"role": "user", "content": "Weather?"},
                {
                    "role": "assistant",
                    "content": None,
                    "tool_calls": [
                        {"id": "c1", "type": "function", "function": {"name": "get_weather", "arguments": "{}"}}
                    ],
                },
                {"role": "tool", "tool_call_id": "c1", "content": "sunny"},
            ],
            "tools": [
                {
                    "type": "function",
                    "function": {"name": "get_weather", "description": "Weather.", "parameters": {"type": "object"}},
                }
            ],
            "tool_choice": {"type": "function", "function": {"name": "get_weather"}},
            "temperature": 0.3,
            "stop": ["X"],
        }
    )
    out = parts(anthropic_body)
    assert out.messages == chat.upstream_messages()
    assert out.params == chat.sampling_params()
    assert out.final_params == chat.final_params()
    assert out.tools == chat.upstream_tools()


def test_count_tokens_takes_no_max_tokens() -> None:
    out = parts({"model": "mom", "messages": [{"role": "user", "content": "Hi"}]}, CountTokensRequest)
    assert out.final_params == {}


@pytest.mark.parametrize(
    ("body", "message"),
    [
        (
            ask([{"role": "user", "content": "x"}], max_tokens=0),
            "max_tokens: Input should be greater than or equal to 1.",
        ),
        ({"model": "m", "messages": [{"role": "user", "content": "x"}]}, "max_tokens: Field required"),
        (
            ask([{"role": "tool", "content": "x"}]),
            "messages.0.role: Input should be 'user', 'assistant' or 'system'.",
        ),
        (
            ask([{"role": "system", "content": [{"type": "image", "source": {"type": "url", "url": "https://a/b"}}]}]),
            "messages.0.content.0.type: a `image` block is not allowed in a message with the role 'system'.",
        ),
        (
            ask([{"role": "user", "content": [{"type": "image", "source": {"type": "url"}}]}]),
            "messages.0.content.0.source.url: Field required",
        ),
        (
            ask([{"role": "user", "content": "x"}], temperature=1.5),
            "temperature: Input should be less than or equal to 1.",
        ),
        (ask([{"role": "user", "content": "x"}], tools=[{"name": "t"}]), "tools.0.input_schema: Field required"),
        (
            ask([{"role": "user", "content": "x"}], tools=[{"type": "bash_20250124", "name": "bash"}]),
            "tools.0.type: the tool type 'bash_20250124' is not supported: a MoM model takes custom tools only "
            "(name, description, input_schema).",
        ),
        (
            ask([{"role": "user", "content": "x"}], tools=[TOOL], tool_choice={"type": "tool", "name": "nope"}),
            "tool_choice.name: no tool is named 'nope'.",
        ),
        (
            ask([{"role": "user", "content": "x"}], stop_sequences=list("abcde")),
            "stop_sequences: array too long. Expected an array with maximum length 4, but got an array with length "
            "5 instead.",
        ),
        (
            ask([{"role": "user", "content": "x"}], mcp_servers=[{}]),
            "mcp_servers: the MCP connector (server-side MCP servers) is not supported.",
        ),
        (
            ask([{"role": "user", "content": "x"}], output_config={"format": {"type": "json_schema"}}),
            "output_config.format.schema: Field required",
        ),
        (
            ask([{"role": "user", "content": "x"}], output_config={"format": {"type": "json_schema", "schema": 1}}),
            "output_config.format.schema: expected an object, but got an integer instead.",
        ),
        (
            ask(
                [{"role": "user", "content": "x"}],
                output_config={"format": {"type": "json_schema", "schema": {"type": "nope"}}},
            ),
            "output_config.format.schema: Invalid schema: at type: 'nope' is not valid under any of the given schemas.",
        ),
        (
            ask([{"role": "user", "content": "x"}], output_format={"type": "json_schema", "schema": {}}),
            "output_format: `output_format` is the structured outputs beta's name: send `output_config.format`.",
        ),
        (
            ask([{"role": "user", "content": [{"type": "tool_use", "id": "a", "name": "b", "input": {}}]}]),
            "messages.0.content.0.type: a `tool_use` block is not allowed in a message with the role 'user'.",
        ),
        (
            ask([{"role": "user", "content": "x"}], thinking={"type": "enabled"}),
            "thinking.enabled.budget_tokens: Field required",
        ),
        (
            ask(
                [
                    {"role": "user", "content": "x"},
                    {"role": "assistant", "content": [{"type": "thinking", "thinking": "t", "signature": "forged"}]},
                ]
            ),
            "messages.1.content.0: Invalid `signature` in `thinking` block.",
        ),
    ],
)
def test_errors_name_the_field_anthropics_way(body: dict[str, Any], message: str) -> None:
    assert refused(body) == message


def test_thinking_adaptive_and_display_are_accepted() -> None:
    assert parts(ask([{"role": "user", "content": "x"}], thinking={"type": "adaptive", "display": "omitted"})).messages
    assert parts(ask([{"role": "user", "content": "x"}], thinking={"type": "adaptive", "display": "updates"})).messages


def test_system_messages_join_the_system_prompt_and_stand_between_no_call_and_its_result() -> None:
    """Claude Code sends its environment as a `system` message among the others (a string, or text blocks)."""
    call = {"role": "assistant", "content": [{"type": "tool_use", "id": "c1", "name": "get_weather", "input": {}}]}
    result = {"role": "user", "content": [{"type": "tool_result", "tool_use_id": "c1", "content": "sunny"}]}
    out = parts(
        ask(
            [
                {"role": "user", "content": "Weather?"},
                {"role": "system", "content": [{"type": "text", "text": "# Environment", "cache_control": {}}]},
                call,
                {"role": "system", "content": "Later."},
                result,
            ],
            system=[{"type": "text", "text": "Be brief."}],
            tools=[TOOL],
        )
    )
    assert [m["role"] for m in out.messages] == ["system", "user", "assistant", "tool"]
    assert out.messages[0] == {"role": "system", "content": "Be brief.\n\n# Environment\n\nLater."}
    alone = parts(ask([{"role": "system", "content": "Env."}, {"role": "user", "content": "Hi"}]))
    assert alone.messages == [{"role": "system", "content": "Env."}, {"role": "user", "content": "Hi"}]


def test_deferred_tools_reach_the_llms_once_a_tool_reference_loads_them() -> None:
    """Claude Code's tool search: deferred tools (and its placeholder) stay out until a result references them."""
    deferred = {**TOOL, "name": "web_fetch", "defer_loading": True}
    placeholder = {"name": "DeferredToolPlaceholder", "input_schema": {"type": "object"}, "defer_loading": True}
    tools = [TOOL, deferred, placeholder]
    first = parts(ask([{"role": "user", "content": "Fetch it."}], tools=tools))
    assert [t["function"]["name"] for t in first.tools or []] == ["get_weather"]
    search = {"role": "assistant", "content": [{"type": "tool_use", "id": "c1", "name": "ToolSearch", "input": {}}]}
    found = {
        "role": "user",
        "content": [
            {
                "type": "tool_result",
                "tool_use_id": "c1",
                "content": [{"type": "tool_reference", "tool_name": "web_fetch"}],
            }
        ],
    }
    later = parts(ask([{"role": "user", "content": "Fetch it."}, search, found], tools=tools))
    assert [t["function"]["name"] for t in later.tools or []] == ["get_weather", "web_fetch"]
    assert later.messages[-1] == {
        "role": "tool",
        "content": "(The tool web_fetch is loaded: it can be called now.)",
        "tool_call_id": "c1",
    }
    assert parts(ask([{"role": "user", "content": "Hi"}], tools=[placeholder])).tools is None


def test_output_config_format_is_the_equivalent_chat_requests_response_format() -> None:
    schema = {"type": "object", "properties": {"title": {"type": "string"}}, "required": ["title"]}
    out = parts(
        ask(
            [{"role": "user", "content": "Name it."}],
            output_config={"effort": "high", "format": {"type": "json_schema", "schema": schema}},
        )
    )
    chat = parse_chat_request(
        {
            "model": "mom",
            "max_tokens": 100,
            "messages": [{"role": "user", "content": "Name it."}],
            "response_format": {"type": "json_schema", "json_schema": {"name": "output", "schema": schema}},
        }
    )
    assert out.final_params == chat.final_params()
    assert out.final_params["response_format"]["json_schema"]["schema"] == schema


def test_the_signing_key_is_the_setting_else_derived_from_the_tokens() -> None:
    keyed = ThinkingSigner.from_settings(Settings(api_token="a,b", mom_signing_key=SecretStr("the-signing-key")))
    assert keyed.sign("x") == ThinkingSigner(b"the-signing-key").sign("x")
    derived = ThinkingSigner.from_settings(Settings(api_token="b,a"))
    assert derived.sign("x") == ThinkingSigner.from_settings(Settings(api_token="a, b")).sign("x")  # same tokens
    assert derived.sign("x") != ThinkingSigner.from_settings(Settings(api_token="a,c")).sign("x")
    assert derived.verify("x", derived.sign("x")) and not derived.verify("y", derived.sign("x"))
    assert "the-signing-key" not in repr(keyed)


# ------------------------------------------------------------------------------------------------ encoding


def report(name: str, text: str, prompt: int = 10, completion: int = 5) -> CallReport:
    return CallReport(name=name, model=f"openai/{name}", text=text, usage=Usage(prompt, completion, 0, 2))


def answer_events(*, tool: bool) -> list[Event]:
    members = [report("a", "A says."), report("b", "B says.")]
    breakdown = Breakdown(members=members, concluding=report("judge", "", 30, 7))
    events: list[Event] = [MemberFinished(members[0]), MemberFinished(members[1]), PanelDone(members)]
    events += [ContentDelta("Hello "), ContentDelta(""), ContentDelta("world.")]
    if tool:
        events += [
            ToolCallDelta(0, "", id="call_9", name="get_weather"),
            ToolCallDelta(0, '{"city":'),
            ToolCallDelta(0, '"Oslo"}'),
        ]
    events.append(Completed("tool_calls" if tool else "stop", breakdown, breakdown.usage()))
    return events


def frames(data: bytes) -> list[dict[str, Any]]:
    out = []
    for frame in data.decode().split("\n\n")[:-1]:
        kind, payload = frame.split("\n")
        event = orjson.loads(payload.removeprefix("data: "))
        assert kind == f"event: {event['type']}"
        out.append(event)
    return out


@pytest.mark.parametrize("thinking", [True, False])
@pytest.mark.parametrize("tool", [True, False])
def test_the_stream_accumulates_to_the_body(thinking: bool, tool: bool) -> None:
    stream = MessageStreamEncoder("mom", thinking=thinking, sign=SIGNER.sign)
    body = MessageCollector("mom", thinking=thinking, sign=SIGNER.sign)
    sent = b""
    whole: dict[str, Any] | None = None
    for event in answer_events(tool=tool):
        sent += stream.feed(event)
        whole = body.feed(event) or whole
    assert whole is not None
    events = frames(sent)
    kinds = [e["type"] for e in events]
    assert kinds.count("ping") == (0 if thinking else 2)
    snapshot = None
    bufs: dict[int, bytes] = {}
    for event in events:
        if event["type"] != "ping":
            snapshot = accumulate_event(event=EVENTS.validate_python(event), current_snapshot=snapshot, json_bufs=bufs)
    assert snapshot is not None
    message = Message.model_validate(whole)

    def dumped(blocks: list[Any]) -> list[dict[str, Any]]:
        return [b.model_dump(exclude={"parsed_output"}, exclude_none=True) for b in blocks]

    assert dumped(snapshot.content) == dumped(message.content)
    assert snapshot.stop_reason == message.stop_reason == ("tool_use" if tool else "end_turn")
    assert snapshot.usage.output_tokens == message.usage.output_tokens == 17
    assert message.usage.input_tokens == 50 - 6 and message.usage.cache_read_input_tokens == 6
    types = [b.type for b in message.content]
    assert types == [*(["thinking"] if thinking else []), "text", *(["tool_use"] if tool else [])]
    if thinking:
        block = message.content[0]
        assert block.type == "thinking" and SIGNER.verify(block.thinking, block.signature)
        assert block.thinking == "Model: a\nContent: A says.\n---\nModel: b\nContent: B says.\n---\n"
    if tool:
        assert message.content[-1].type == "tool_use" and message.content[-1].input == {"city": "Oslo"}
    assert events[-2]["mom"] == whole["mom"]


def test_usage_and_tool_input_edges() -> None:
    assert usage_object(Usage(prompt_tokens=3, completion_tokens=4, cached_tokens=1)) == {
        "input_tokens": 2,
        "output_tokens": 4,
        "cache_creation_input_tokens": 0,
        "cache_read_input_tokens": 1,
    }
    assert tool_input("") == {}
    assert tool_input("[1]") == {"_invalid_arguments": "[1]"}
    assert tool_input("{oops") == {"_invalid_arguments": "{oops"}


def test_the_text_of_a_request_is_bounded_as_chats_is() -> None:
    body = {
        "model": "m",
        "max_tokens": 5,
        "system": "ab",
        "messages": [
            {"role": "user", "content": "cdef"},
            {"role": "assistant", "content": [{"type": "tool_use", "id": "t1", "name": "f", "input": {"x": 1}}]},
            {"role": "user", "content": [{"type": "tool_result", "tool_use_id": "t1", "content": "gh"}]},
        ],
    }
    request = parse_request(body, MessagesRequest, LIMITS)
    # system 2 + user 4 + the call's arguments {"x":1} 7 + the result 2: what MOM_MAX_TEXT_CHARS counts
    assert translate(request, SIGNER.verify, 15).messages
    with pytest.raises(InvalidRequest) as error:
        translate(request, SIGNER.verify, 14)
    assert error.value.code == "request_too_large"
