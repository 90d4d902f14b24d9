"""OpenAI's tool-calling and structured-output shapes: accepted as OpenAI takes them, refused with OpenAI's 400s."""

from __future__ import annotations

from typing import Any

import pytest

from mom_service.api.schemas.openai import parse_chat_request
from mom_service.errors import InvalidRequest

WEATHER = {
    "type": "function",
    "function": {
        "name": "get_weather",
        "description": "The weather in a city.",
        "parameters": {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]},
    },
}
CALL = {"id": "call_1", "type": "function", "function": {"name": "get_weather", "arguments": '{"city": "Paris"}'}}
LOOP = [
    {"role": "user", "content": "Weather in Paris?"},
    {"role": "assistant", "content": None, "tool_calls": [CALL]},
    {"role": "tool", "tool_call_id": "call_1", "content": "18 C, sunny"},
]


def request(**fields: Any) -> dict[str, Any]:
    return {"model": "mom", "messages": [{"role": "user", "content": "Hi"}], **fields}


def rejected(data: dict[str, Any]) -> InvalidRequest:
    with pytest.raises(InvalidRequest) as info:
        parse_chat_request(data)
    assert info.value.status_code == 400
    return info.value


def test_a_tool_loop_is_accepted_and_passed_on_in_openais_shapes() -> None:
    parsed = parse_chat_request(request(messages=LOOP, tools=[WEATHER], tool_choice="auto", parallel_tool_calls=False))
    assert parsed.upstream_messages() == [
        {"role": "user", "content": "Weather in Paris?"},
        {"role": "assistant", "content": None, "tool_calls": [CALL]},
        {"role": "tool", "content": "18 C, sunny", "tool_call_id": "call_1"},
    ]
    assert parsed.upstream_tools() == [WEATHER]
    assert parsed.final_params() == {"tool_choice": "auto", "parallel_tool_calls": False}


def test_a_named_tool_choice_and_a_json_schema_format_reach_the_final_params() -> None:
    schema = {"type": "object", "properties": {"answer": {"type": "string"}}}
    parsed = parse_chat_request(
        request(
            tools=[WEATHER],
            tool_choice={"type": "function", "function": {"name": "get_weather"}},
            response_format={"type": "json_schema", "json_schema": {"name": "out", "schema": schema, "strict": True}},
        )
    )
    assert parsed.final_params() == {
        "tool_choice": {"type": "function", "function": {"name": "get_weather"}},
        "response_format": {"type": "json_schema", "json_schema": {"name": "out", "schema": schema, "strict": True}},
    }


@pytest.mark.parametrize(
    ("fields", "param", "code"),
    [
        ({"tools": [{"type": "web_search"}]}, "tools[0].type", "unsupported_tool_type"),
        ({"tools": [WEATHER, {"type": "code_interpreter"}]}, "tools[1].type", "unsupported_tool_type"),
        ({"tools": [{"type": "function"}]}, "tools[0].function", "missing_required_parameter"),
        ({"functions": [WEATHER["function"]]}, "functions", "unsupported_parameter"),
        ({"function_call": "auto"}, "function_call", "unsupported_parameter"),
        ({"audio": {"voice": "alloy", "format": "wav"}}, "audio", "unsupported_parameter"),
        ({"modalities": ["text", "audio"]}, "modalities", "unsupported_parameter"),
        ({"prediction": {"type": "content", "content": "x"}}, "prediction", "unsupported_parameter"),
        ({"web_search_options": {}}, "web_search_options", "unsupported_parameter"),
        ({"tool_choice": "required"}, "tool_choice", "invalid_value"),
        (
            {"tools": [WEATHER], "tool_choice": {"type": "function", "function": {"name": "nope"}}},
            "tool_choice",
            "invalid_value",
        ),
        ({"response_format": {"type": "json_schema"}}, "response_format.json_schema", "missing_required_parameter"),
        ({"response_format": {"type": "xml"}}, "response_format.type", "invalid_value"),
        ({"top_logprobs": 2}, "top_logprobs", "invalid_value"),
    ],
)
def test_what_cannot_be_honoured_is_a_400_naming_the_parameter(fields: dict[str, Any], param: str, code: str) -> None:
    error = rejected(request(**fields))
    assert (error.param, error.code) == (param, code), error.message


def test_an_unsupported_tool_type_is_named() -> None:
    error = rejected(request(tools=[WEATHER, {"type": "code_interpreter"}]))
    assert "'code_interpreter'" in error.message


def test_legacy_functions_say_to_use_tools() -> None:
    assert "use 'tools'" in rejected(request(functions=[WEATHER["function"]])).message


def test_a_tool_result_that_answers_no_call_is_refused() -> None:
    orphan = [{"role": "user", "content": "Hi"}, {"role": "tool", "tool_call_id": "call_9", "content": "42"}]
    error = rejected(request(messages=orphan))
    assert (error.param, error.code) == ("messages[1].role", "invalid_tool_message")
    assert "call_9" in error.message


@pytest.mark.parametrize(
    ("message", "param"),
    [
        ({"role": "assistant"}, "messages[0].content"),
        ({"role": "user", "content": None}, "messages[0].content"),
        ({"role": "tool", "content": "x"}, "messages[0].tool_call_id"),
        ({"role": "user", "content": "x", "tool_calls": [CALL]}, "messages[0].tool_calls"),
    ],
)
def test_each_role_has_what_it_needs(message: dict[str, Any], param: str) -> None:
    assert rejected(request(messages=[message])).param == param


def test_a_tool_result_with_text_parts_is_accepted() -> None:
    messages = [*LOOP[:2], {"role": "tool", "tool_call_id": "call_1", "content": [{"type": "text", "text": "18 C"}]}]
    assert parse_chat_request(request(messages=messages)).upstream_messages()[2]["content"] == [
        {"type": "text", "text": "18 C"}
    ]


def test_a_response_schema_that_cannot_be_used_is_refused_up_front() -> None:
    remote = {"type": "json_schema", "json_schema": {"name": "out", "schema": {"$ref": "http://169.254.169.254/"}}}
    error = rejected(request(response_format=remote))
    assert (error.param, error.code) == ("response_format.json_schema.schema", "invalid_value")
    assert "only local references" in error.message
    broken = {"type": "json_schema", "json_schema": {"name": "out", "schema": {"type": "foo"}}}
    assert "Invalid schema for response_format 'out'" in rejected(request(response_format=broken)).message
