"""The request model: what is accepted, what reaches the panel, and OpenAI-shaped 400s naming the parameter."""

from __future__ import annotations

from typing import Any

import pytest

from mom_service.api.schemas.openai import SAMPLING_PARAMS, RequestLimits, parse_chat_request
from mom_service.errors import InvalidRequest

USER = [{"role": "user", "content": "Hello"}]


def request(**fields: Any) -> dict[str, Any]:
    body: dict[str, Any] = {"model": "mom", "messages": USER}
    body.update(fields)
    return body


def rejected(data: Any) -> InvalidRequest:
    with pytest.raises(InvalidRequest) as info:
        parse_chat_request(data)
    assert info.value.status_code == 400
    assert info.value.to_dict()["error"]["type"] == "invalid_request_error"
    return info.value


def test_minimal_request() -> None:
    parsed = parse_chat_request(request())
    assert parsed.model == "mom"
    assert parsed.stream is False
    assert parsed.include_usage is False
    assert parsed.sampling_params() == {}
    assert parsed.upstream_messages() == [{"role": "user", "content": "Hello"}]


def test_include_usage() -> None:
    assert parse_chat_request(request(stream=True, stream_options={"include_usage": True})).include_usage is True


def test_n_equal_one_is_accepted() -> None:
    assert parse_chat_request(request(n=1)).n == 1


def test_sampling_and_final_params_keep_only_allowlisted_params_that_were_set() -> None:
    sampling = {
        "temperature": 0.5,
        "top_p": 0.9,
        "seed": 7,
        "user": "user-1",
        "presence_penalty": 0.1,
        "frequency_penalty": -0.2,
    }
    final = {
        "max_tokens": 100,
        "max_completion_tokens": 200,
        "stop": ["\n\n", "END"],
        "logit_bias": {"1": 100},
        "logprobs": True,
        "top_logprobs": 2,
        "parallel_tool_calls": False,
        "response_format": {"type": "json_object"},
    }
    assert set(sampling) == set(SAMPLING_PARAMS)
    dangerous = {
        "api_base": "http://attacker.example/v1",
        "api_key": "sk-attacker-key-123456",
        "base_url": "http://attacker.example/v1",
        "mock_response": "pwned",
        "custom_llm_provider": "openai",
        "fallbacks": ["gpt-4o"],
        "metadata": {"x": "y"},
    }
    tools = [{"type": "function", "function": {"name": "f", "parameters": {"type": "object"}}}]
    parsed = parse_chat_request(request(**sampling, **final, **dangerous, tools=tools, tool_choice="required"))
    assert parsed.sampling_params() == sampling
    assert parsed.final_params() == final | {"tool_choice": "required"}
    assert parsed.upstream_tools() == tools
    # without tools, the tool options mean nothing: accepted, passed to no one
    untooled = parse_chat_request(request(**sampling, **final, **dangerous, tool_choice="none"))
    assert untooled.final_params() == {k: v for k, v in final.items() if k != "parallel_tool_calls"}
    assert untooled.upstream_tools() is None


def test_sampling_params_only_those_set() -> None:
    parsed = parse_chat_request(request(temperature=0, stop="END"))
    assert (parsed.sampling_params(), parsed.final_params()) == ({"temperature": 0}, {"stop": "END"})


def test_upstream_messages_drop_unknown_fields() -> None:
    parsed = parse_chat_request(
        request(
            messages=[
                {"role": "system", "content": "Be brief.", "api_base": "http://attacker.example"},
                {
                    "role": "user",
                    "name": "bob",
                    "api_key": "sk-attacker-key-123456",
                    "content": [
                        {"type": "text", "text": "What is this?", "evil": 1},
                        {
                            "type": "image_url",
                            "image_url": {"url": "https://example.com/cat.png", "detail": "low", "evil": 2},
                            "evil": 3,
                        },
                        {"type": "image_url", "image_url": {"url": "data:image/png;base64,iVBORw0KGgo="}},
                    ],
                },
                {"role": "assistant", "content": "A cat.", "mock_response": "x"},
                {"role": "developer", "content": "Dev note."},
            ]
        )
    )
    assert parsed.upstream_messages() == [
        {"role": "system", "content": "Be brief."},
        {
            "role": "user",
            "content": [
                {"type": "text", "text": "What is this?"},
                {"type": "image_url", "image_url": {"url": "https://example.com/cat.png", "detail": "low"}},
                {"type": "image_url", "image_url": {"url": "data:image/png;base64,iVBORw0KGgo="}},
            ],
            "name": "bob",
        },
        {"role": "assistant", "content": "A cat."},
        {"role": "developer", "content": "Dev note."},
    ]


# ---------------------------------------------------------------------------------------------------- errors


def test_body_not_an_object() -> None:
    error = rejected([{"model": "mom", "messages": USER}])
    assert error.param is None
    assert error.code == "invalid_request_body"


def test_missing_model() -> None:
    error = rejected({"messages": USER})
    assert error.param == "model"
    assert error.code == "missing_required_parameter"
    assert error.message == "Missing required parameter: 'model'."


def test_empty_messages() -> None:
    error = rejected(request(messages=[]))
    assert error.param == "messages"
    assert error.code == "invalid_value"


def test_missing_messages() -> None:
    error = rejected({"model": "mom"})
    assert error.param == "messages"
    assert error.code == "missing_required_parameter"


@pytest.mark.parametrize(
    ("message", "param"),
    [
        ({"role": "wizard", "content": "x"}, "messages[0].role"),
        ({"role": "function", "content": "x", "name": "f"}, "messages[0].role"),
        ({"content": "x"}, "messages[0].role"),
        ({"role": "user"}, "messages[0].content"),
        ({"role": "user", "content": 42}, "messages[0].content"),
        ({"role": "user", "content": [{"type": "audio", "input_audio": {}}]}, "messages[0].content[0]"),
        ({"role": "user", "content": [{"type": "text", "text": 5}]}, "messages[0].content[0].text"),
        ({"role": "user", "content": [{"type": "text"}]}, "messages[0].content[0].text"),
    ],
    ids=[
        "unknown-role",
        "function-role",
        "missing-role",
        "missing-content",
        "content-number",
        "unknown-part-type",
        "text-not-string",
        "text-missing",
    ],
)
def test_bad_message(message: dict[str, Any], param: str) -> None:
    error = rejected(request(messages=[message]))
    assert error.param == param
    assert f"'{param}'" in error.message


def test_bad_second_message_is_named() -> None:
    error = rejected(request(messages=[*USER, {"role": "function", "content": "x"}]))
    assert error.param == "messages[1].role"


@pytest.mark.parametrize(
    ("field", "value"),
    [
        ("temperature", 2.5),
        ("temperature", -0.1),
        ("top_p", 1.5),
        ("max_tokens", 0),
        ("presence_penalty", 3),
        ("model", ""),
    ],
)
def test_bad_parameter(field: str, value: Any) -> None:
    error = rejected(request(**{field: value}))
    assert error.param == field
    assert error.code == "invalid_value"
    assert error.message.startswith(f"Invalid value for '{field}': ")


@pytest.mark.parametrize(
    ("fields", "param", "expected", "got"),
    [
        ({"stream": "yes"}, "stream", "a boolean", "a string"),
        ({"stream": "true"}, "stream", "a boolean", "a string"),
        ({"stream": 1}, "stream", "a boolean", "an integer"),
        ({"stream": "maybe"}, "stream", "a boolean", "a string"),
        ({"temperature": "1"}, "temperature", "a number", "a string"),
        ({"temperature": "hot"}, "temperature", "a number", "a string"),
        ({"max_tokens": "100"}, "max_tokens", "an integer", "a string"),
        ({"max_tokens": 100.5}, "max_tokens", "an integer", "a decimal number"),
        ({"n": 1.0}, "n", "an integer", "a decimal number"),
        ({"seed": True}, "seed", "an integer", "a boolean"),
        (
            {"stream": True, "stream_options": {"include_usage": "true"}},
            "stream_options.include_usage",
            "a boolean",
            "a string",
        ),
        ({"user": 42}, "user", "a string", "an integer"),
    ],
)
def test_wrong_json_types_are_refused_as_openai_refuses_them(
    fields: dict[str, Any], param: str, expected: str, got: str
) -> None:
    """Strict types, as OpenAI's API validates them: no string where a boolean or a number belongs (a lax parser
    would read "yes" as true and "1" as 1.0)."""
    error = rejected(request(**fields))
    assert (error.param, error.code) == (param, "invalid_type")
    assert error.message == f"Invalid type for '{param}': expected {expected}, but got {got} instead."


def test_numbers_take_integers_where_a_number_belongs() -> None:
    parsed = parse_chat_request(request(temperature=1, top_p=1, presence_penalty=0))
    assert parsed.sampling_params() == {"temperature": 1, "top_p": 1, "presence_penalty": 0}


def test_at_most_four_stop_sequences() -> None:
    assert parse_chat_request(request(stop=["a", "b", "c", "d"])).final_params()["stop"] == ["a", "b", "c", "d"]
    error = rejected(request(stop=["a", "b", "c", "d", "e"]))
    assert (error.param, error.code) == ("stop", "array_above_max_length")
    assert error.message == (
        "Invalid 'stop': array too long. Expected an array with maximum length 4, but got an array with length 5 "
        "instead."
    )


def test_the_number_of_messages_is_bounded_before_they_are_validated() -> None:
    limits = RequestLimits(max_messages=3)
    assert len(parse_chat_request(request(messages=USER * 3), limits).messages) == 3
    # over the limit: refused at once, even where every message is wrong (they are not validated one by one)
    with pytest.raises(InvalidRequest) as info:
        parse_chat_request(request(messages=[{"role": "wizard"}] * 4), limits)
    assert (info.value.param, info.value.code) == ("messages", "array_above_max_length")
    assert "maximum length 3, but got an array with length 4" in info.value.message


def test_the_text_of_a_request_is_bounded() -> None:
    limits = RequestLimits(max_text_chars=10)
    parts = [
        {"type": "text", "text": "12345"},
        {"type": "image_url", "image_url": {"url": "data:image/png;base64,AA=="}},
    ]
    assert parse_chat_request(request(messages=[{"role": "user", "content": parts}] * 2), limits)  # 10: images free
    with pytest.raises(InvalidRequest) as info:
        parse_chat_request(request(messages=[{"role": "system", "content": "123456"}, *USER]), limits)
    assert (info.value.param, info.value.code, info.value.status_code) == ("messages", "request_too_large", 400)
    assert "11 characters of text; at most 10" in info.value.message


@pytest.mark.parametrize(("n", "code"), [(2, "unsupported_parameter"), (0, "invalid_value")])
def test_only_n_one(n: int, code: str) -> None:
    error = rejected(request(n=n))
    assert error.param == "n"
    assert error.code == code
