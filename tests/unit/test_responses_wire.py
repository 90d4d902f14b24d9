"""The Responses request model (api/schemas/responses.py, responses_input.py) without a service: the engine's
request it makes is the equivalent Chat Completions request's (so both surfaces share the cache), and a wrong input
is a 400 naming the parameter as the client wrote it."""

from __future__ import annotations

from typing import Any

import pytest

from mom_service.api.schemas.openai import parse_chat_request
from mom_service.api.schemas.responses import parse_responses_request
from mom_service.api.schemas.responses_input import translate
from mom_service.errors import InvalidRequest

PARAMETERS = {"type": "object", "properties": {"city": {"type": "string"}}}
CALL = {"id": "call_1", "type": "function", "function": {"name": "get_weather", "arguments": '{"city":"Paris"}'}}


def test_the_engine_request_is_the_equivalent_chat_requests() -> None:
    responses = parse_responses_request(
        {
            "model": "mom",
            "instructions": "Be brief.",
            "input": [
                {"role": "user", "content": "Weather?"},
                {"type": "reasoning", "id": "rs_1", "summary": []},
                {"type": "message", "role": "assistant", "content": [{"type": "output_text", "text": "Checking."}]},
                {"type": "function_call", "call_id": "call_1", "name": "get_weather", "arguments": '{"city":"Paris"}'},
                {"type": "function_call_output", "call_id": "call_1", "output": "18 C"},
            ],
            "tools": [{"type": "function", "name": "get_weather", "parameters": PARAMETERS, "strict": True}],
            "tool_choice": {"type": "function", "name": "get_weather"},
            "parallel_tool_calls": False,
            "text": {"format": {"type": "json_schema", "name": "W", "schema": PARAMETERS, "strict": True}},
            "max_output_tokens": 99,
            "temperature": 0.5,
            "top_p": 0.9,
            "safety_identifier": "u-1",
            "reasoning": {"effort": "high"},
            "include": ["reasoning.encrypted_content"],
        }
    )
    chat = parse_chat_request(
        {
            "model": "mom",
            "messages": [
                {"role": "system", "content": "Be brief."},
                {"role": "user", "content": "Weather?"},
                {"role": "assistant", "content": "Checking.", "tool_calls": [CALL]},
                {"role": "tool", "tool_call_id": "call_1", "content": "18 C"},
            ],
            "tools": [
                {"type": "function", "function": {"name": "get_weather", "parameters": PARAMETERS, "strict": True}}
            ],
            "tool_choice": {"type": "function", "function": {"name": "get_weather"}},
            "parallel_tool_calls": False,
            "response_format": {
                "type": "json_schema",
                "json_schema": {"name": "W", "schema": PARAMETERS, "strict": True},
            },
            "max_tokens": 99,
            "temperature": 0.5,
            "top_p": 0.9,
            "user": "u-1",
        }
    )
    assert translate(responses.instructions, responses.input).messages == chat.upstream_messages()
    assert responses.sampling_params() == chat.sampling_params()
    assert responses.final_params() == chat.final_params()
    assert responses.upstream_tools() == chat.upstream_tools()


REFUSED: list[tuple[dict[str, Any], str, str]] = [
    ({"input": 5}, "input", "invalid_type"),
    ({"input": [{"role": "robot", "content": "x"}]}, "input[0].role", "invalid_value"),
    (
        {"input": [{"role": "user", "content": [{"type": "input_text"}]}]},
        "input[0].content[0].text",
        "missing_required_parameter",
    ),
    (
        {"input": [{"role": "user", "content": [{"type": "input_file", "file_id": "f"}]}]},
        "input[0].content[0].type",
        "unsupported_value",
    ),
    ({"tools": [{"type": "code_interpreter"}]}, "tools[0].type", "unsupported_tool_type"),
    ({"tools": [{"type": "function"}]}, "tools[0].name", "missing_required_parameter"),
    ({"tool_choice": {"type": "function", "name": "nope"}}, "tool_choice", "invalid_value"),
    ({"prompt": {"id": "pmpt_1"}}, "prompt", "unsupported_parameter"),
    ({"top_logprobs": 3}, "top_logprobs", "unsupported_parameter"),
    ({"input": [{"role": "system", "content": "only a system message"}]}, "input", "invalid_value"),
]


@pytest.mark.parametrize(("fields", "param", "code"), REFUSED)
def test_refused_naming_the_parameter(fields: dict[str, Any], param: str, code: str | None) -> None:
    with pytest.raises(InvalidRequest) as caught:
        request = parse_responses_request({"model": "mom", "input": "x"} | fields)
        translate(request.instructions, request.input)
    assert (caught.value.param, caught.value.code) == (param, code)
