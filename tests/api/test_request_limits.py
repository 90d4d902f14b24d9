"""What one request may cost, bounded before any provider is called: the operator's output limit is a ceiling no
client can raise, and the size of a conversation is capped (messages, stop sequences, text)."""

from __future__ import annotations

from typing import Any

import httpx
import pytest

from tests.conftest import CallPath, Service, StartService, llm
from tests.fake_upstream import FakeUpstream
from tests.openai_schema import validate

QUESTION = [{"role": "user", "content": "How long may the answer be?"}]
LIMITS = ("max_tokens", "max_completion_tokens")


@pytest.fixture(scope="module")
def capped(fake_server: FakeUpstream, start_service: StartService, call_path: CallPath) -> Service:
    config: dict[str, Any] = {
        "llm_definitions": [
            llm("cap-fifty", fake_server, params={"max_tokens": 50, "temperature": 0.3}),
            llm("cap-forty", fake_server, params={"max_completion_tokens": 40}),
            llm("cap-free", fake_server),
            llm("cap-thirty", fake_server, params={"max_tokens": 30}),
        ],
        "models": [
            {"name": "cap-mom", "llms_to_query": ["cap-fifty", "cap-forty"], "concluding_llm": "cap-free"},
            {"name": "cap-capped-judge", "llms_to_query": ["cap-free"], "concluding_llm": "cap-thirty"},
        ],
    }
    environment = {"MOM_MAX_MESSAGES": "4", "MOM_MAX_TEXT_CHARS": "1000"}
    return start_service(config, call_path.env | environment)


def limits_sent(fake: FakeUpstream) -> dict[str, dict[str, Any]]:
    """Per upstream model: the output limits its request carried, under each name."""
    return {e["model"]: {k: e["body"][k] for k in LIMITS if k in e["body"]} for e in fake.log()}


@pytest.mark.parametrize(
    ("client", "expected"),
    [
        ({}, {"cap-fifty": 50, "cap-forty": 40, "cap-free": None}),
        ({"max_tokens": 1000}, {"cap-fifty": 50, "cap-forty": 40, "cap-free": 1000}),
        ({"max_completion_tokens": 1000}, {"cap-fifty": 50, "cap-forty": 40, "cap-free": 1000}),
        ({"max_tokens": 10}, {"cap-fifty": 50, "cap-forty": 40, "cap-free": 10}),
        ({"max_tokens": 30, "max_completion_tokens": 20}, {"cap-fifty": 50, "cap-forty": 40, "cap-free": 20}),
    ],
    ids=["none", "higher", "higher-new-name", "lower", "both-names"],
)
def test_each_call_carries_one_limit_and_the_clients_reaches_the_concluding_call_only(
    capped: Service, fake: FakeUpstream, client: dict[str, int], expected: dict[str, int | None]
) -> None:
    """Members keep their configured limits (a short answer asked for does not truncate the panel's reasoning);
    the concluding call gets the smaller of the client's and its own; each call carries one limit, max_tokens."""
    response = capped.chat("cap-mom", messages=QUESTION, **client)
    assert response.status_code == 200, response.text
    sent = limits_sent(fake)
    for model, limit in expected.items():
        assert sent[model] == ({} if limit is None else {"max_tokens": limit}), (model, sent[model])
    fifty = next(e for e in fake.log() if e["model"] == "cap-fifty")
    assert fifty["body"]["temperature"] == 0.3  # the rest of the operator's params still go


@pytest.mark.parametrize(("client", "expected"), [({"max_tokens": 1000}, 30), ({"max_tokens": 10}, 10)])
def test_a_concluding_llm_with_its_own_limit_is_never_raised(
    capped: Service, fake: FakeUpstream, client: dict[str, int], expected: int
) -> None:
    assert capped.chat("cap-capped-judge", messages=QUESTION, **client).status_code == 200
    assert limits_sent(fake)["cap-thirty"] == {"max_tokens": expected}


def refused(response: httpx.Response, param: str, code: str) -> dict[str, Any]:
    assert response.status_code == 400, response.text
    error: dict[str, Any] = response.json()
    validate(error, "ErrorResponse")
    assert (error["error"]["param"], error["error"]["code"]) == (param, code)
    return error


def test_too_many_messages_are_refused_before_any_call(capped: Service, fake: FakeUpstream) -> None:
    assert capped.chat("cap-mom", messages=QUESTION * 4).status_code == 200
    fake.clear_log()
    error = refused(capped.chat("cap-mom", messages=QUESTION * 5), "messages", "array_above_max_length")
    assert "maximum length 4, but got an array with length 5" in error["error"]["message"]
    assert fake.log() == []


def test_more_than_four_stop_sequences_are_refused(capped: Service, fake: FakeUpstream) -> None:
    refused(capped.chat("cap-mom", messages=QUESTION, stop=["1", "2", "3", "4", "5"]), "stop", "array_above_max_length")
    assert fake.log() == []


def test_too_much_text_is_refused_before_any_call(capped: Service, fake: FakeUpstream) -> None:
    long = [{"role": "system", "content": "x" * 990}, *QUESTION]  # 990 + 27 characters
    error = refused(capped.chat("cap-mom", messages=long), "messages", "request_too_large")
    assert "at most 1000" in error["error"]["message"]
    assert fake.log() == []


@pytest.mark.parametrize(
    ("fields", "param"),
    [({"stream": "yes"}, "stream"), ({"temperature": "0.5"}, "temperature"), ({"max_tokens": "100"}, "max_tokens")],
)
def test_wrong_json_types_are_refused_before_any_call(
    capped: Service, fake: FakeUpstream, fields: dict[str, Any], param: str
) -> None:
    error = refused(capped.chat("cap-mom", messages=QUESTION, **fields), param, "invalid_type")
    assert error["error"]["message"].startswith(f"Invalid type for '{param}': expected ")
    assert fake.log() == []
