"""Structured outputs and the final answer's parameters through the live service: `response_format` reaches the
concluding call only, members are told of it; a whole answer that is not the JSON asked for gets one corrective
retry, then a 502; a streamed one is judged in `mom.structured_output`; the final answer's parameters (limits,
stops, tool options, logit bias, logprobs) reach the concluding call only, sampling every call; logprobs come back
as OpenAI returns them. The LLMs are this module's own (`so-*`)."""

from __future__ import annotations

import json
import sqlite3
from decimal import Decimal
from typing import Any

import orjson
import pydantic
import pytest
from openai import OpenAI

from tests.api.test_tools import TOOLS, Reply, ask, called, calls_to, pico, sent
from tests.conftest import TOKEN, CallPath, Service, StartService, llm, wait_until
from tests.fake_upstream import FakeUpstream, split_tokens

MEMBER_PRICE = {"input_per_million": "2", "output_per_million": "8"}
JUDGE_PRICE = {"input_per_million": "5", "output_per_million": "20"}
MEMBERS = ("so-a", "so-b")
QUESTION = [{"role": "user", "content": "Who wrote the first program?"}]
PERSON_SCHEMA = {
    "type": "object",
    "properties": {"name": {"type": "string"}, "age": {"type": "integer"}},
    "required": ["name", "age"],
    "additionalProperties": False,
}
JSON_SCHEMA = {"type": "json_schema", "json_schema": {"name": "person", "schema": PERSON_SCHEMA, "strict": True}}
JSON_OBJECT = {"type": "json_object"}
ADA = '{"name": "Ada", "age": 36}'


class Person(pydantic.BaseModel):
    name: str
    age: int


@pytest.fixture(scope="module")
def shaped(fake_server: FakeUpstream, start_service: StartService, call_path: CallPath) -> Service:
    config = {
        "llm_definitions": [
            *(llm(name, fake_server, retries=0, pricing=MEMBER_PRICE) for name in MEMBERS),
            llm("so-judge", fake_server, retries=0, pricing=JUDGE_PRICE),
        ],
        "models": [
            {"name": "so-mom", "llms_to_query": list(MEMBERS), "concluding_llm": "so-judge"},
            {
                "name": "so-think",
                "llms_to_query": list(MEMBERS),
                "concluding_llm": "so-judge",
                "include_thinking_context": True,
                "thinking_format": "think_tags",
            },
        ],
    }
    return start_service(config, call_path.env)


STREAMS = pytest.mark.parametrize("stream", [False, True], ids=["whole", "streamed"])


def note_of(body: dict[str, Any]) -> str:
    """The system note a member was given about the final answer's format (its last message)."""
    last = body["messages"][-1]
    assert last["role"] == "system", body["messages"]
    text: str = last["content"]
    return text


# ---------------------------------------------------------------------------------- the concluding call only


@STREAMS
@pytest.mark.parametrize(
    ("form", "told"),
    [
        (JSON_SCHEMA, f"JSON matching this schema: {orjson.dumps(PERSON_SCHEMA).decode()}"),
        (JSON_OBJECT, "a JSON object"),
    ],
    ids=["json_schema", "json_object"],
)
def test_the_format_reaches_the_concluding_call_and_members_are_told(
    shaped: Service, fake: FakeUpstream, stream: bool, form: dict[str, Any], told: str
) -> None:
    fake.configure({"so-a": {"text": "Ada Lovelace, at 36."}, "so-judge": {"text": ADA}})
    reply = ask(shaped, "so-mom", QUESTION, stream=stream, response_format=form)
    assert reply.status == 200, reply.body
    assert reply.content == ADA and json.loads(ADA) == {"name": "Ada", "age": 36}
    assert reply.mom["structured_output"] == "valid"
    assert reply.mom["concluding_fallbacks"] == []
    assert sent(fake, "so-judge")["response_format"] == form
    for member in MEMBERS:  # they answer freely, knowing what the final answer will be
        body = sent(fake, member)
        assert "response_format" not in body
        assert body["messages"][:-1] == QUESTION
        note = note_of(body)
        assert f"the final answer to the user will be {told}" in note
    assert "Ada Lovelace, at 36." in sent(fake, "so-judge")["messages"][-1]["content"]


def test_without_a_format_nothing_is_judged(shaped: Service, fake: FakeUpstream) -> None:
    reply = ask(shaped, "so-mom", QUESTION)
    assert reply.status == 200 and reply.mom["structured_output"] is None
    assert all(sent(fake, m)["messages"] == QUESTION for m in MEMBERS)
    assert "response_format" not in sent(fake, "so-judge")


# --------------------------------------------------------------------------------------- the corrective retry


INVALID = [
    # (format, the invalid answer, why (told to the concluding LLM), its summary (in the breakdown and records))
    (JSON_SCHEMA, "Ada, aged 36.", "the answer is not valid JSON", "not valid JSON"),
    (JSON_SCHEMA, '{"name": "Ada"}', "'age' is a required property", "at the top level: fails 'required'"),
    (JSON_SCHEMA, '{"name": "Ada", "age": "36"}', "at age: '36' is not of type 'integer'", "at age: fails 'type'"),
    (JSON_OBJECT, "[1, 2]", "the answer is not a JSON object", "not a JSON object"),
]


@pytest.mark.parametrize(
    ("form", "invalid", "why", "summary"), INVALID, ids=["not-json", "missing", "wrong-type", "not-object"]
)
def test_an_invalid_whole_answer_gets_one_corrective_retry(
    shaped: Service, fake: FakeUpstream, form: dict[str, Any], invalid: str, why: str, summary: str
) -> None:
    fake.configure({"so-judge": {"texts": [invalid, ADA]}})
    reply = ask(shaped, "so-mom", QUESTION, response_format=form)
    assert reply.status == 200, reply.body
    assert reply.content == ADA
    assert reply.mom["structured_output"] == "valid"

    first, second = (e["body"] for e in calls_to(fake, "so-judge"))
    assert second["response_format"] == first["response_format"] == form
    # the second request: the first, then the invalid answer, then why it is not what was asked for
    assert second["messages"][: len(first["messages"])] == first["messages"]
    invalid_answer, correction = second["messages"][len(first["messages"]) :]
    assert invalid_answer == {"role": "assistant", "content": invalid}
    assert correction["role"] == "user" and why in correction["content"]

    (attempt,) = reply.mom["concluding_fallbacks"]  # the invalid attempt, listed with its reason
    assert (attempt["name"], attempt["status"], attempt["reason"]) == ("so-judge", "error", "invalid_structured_output")
    assert summary in attempt["error"] and invalid not in attempt["error"]  # (the answer's content stays out)
    concluding = reply.mom["concluding"]
    assert (concluding["name"], concluding["status"]) == ("so-judge", "ok")
    # both attempts are paid and counted
    calls = [*reply.mom["members"], attempt, concluding]
    for key in ("prompt_tokens", "completion_tokens"):
        assert reply.body["usage"][key] == sum(c["usage"][key] for c in calls)
    assert attempt["usage"]["completion_tokens"] == len(split_tokens(invalid))
    expected = sum(pico(c["usage"], JUDGE_PRICE if c["name"] == "so-judge" else MEMBER_PRICE) for c in calls)
    assert Decimal(repr(reply.mom["cost"])) * 10**12 == expected
    with sqlite3.connect(shaped.workdir / "data" / "mom.db") as db:
        query = "SELECT status, error_type, error FROM mom_calls WHERE request_id = ? AND role = 'concluding'"
        wait_until(lambda: len(db.execute(query, (reply.request_id,)).fetchall()) == 2)
        assert sorted(db.execute(query, (reply.request_id,)).fetchall()) == [
            ("error", "invalid_structured_output", attempt["error"]),
            ("ok", None, None),
        ]


def test_an_answer_invalid_twice_is_a_502(shaped: Service, fake: FakeUpstream) -> None:
    fake.configure({"so-judge": {"texts": ["Ada.", "Still Ada, in prose."]}})
    reply = ask(shaped, "so-mom", QUESTION, response_format=JSON_SCHEMA)
    assert reply.status == 502, reply.body
    assert (reply.error["type"], reply.error["code"]) == ("upstream_error", "invalid_structured_output")
    assert "so-judge" in reply.error["message"]
    assert len(calls_to(fake, "so-judge")) == 2  # one retry, no more
    with sqlite3.connect(shaped.workdir / "data" / "mom.db") as db:
        query = "SELECT status, error_type FROM mom_requests WHERE id = ?"
        wait_until(lambda: db.execute(query, (reply.request_id,)).fetchone() is not None)
        assert db.execute(query, (reply.request_id,)).fetchone() == ("error", "invalid_structured_output")
        concluding = "SELECT count(*) FROM mom_calls WHERE request_id = ? AND role = 'concluding'"
        assert db.execute(concluding, (reply.request_id,)).fetchone() == (2,)


@pytest.mark.parametrize(("answer", "verdict"), [(ADA, "valid"), ("Ada, in prose.", "invalid")])
def test_a_streamed_answer_is_judged_in_the_usage_chunk(
    shaped: Service, fake: FakeUpstream, answer: str, verdict: str
) -> None:
    fake.configure({"so-judge": {"text": answer}})
    reply = ask(shaped, "so-mom", QUESTION, stream=True, response_format=JSON_SCHEMA)
    assert reply.status == 200, reply.body
    assert reply.content == answer  # streamed as it came: no retry once the client has it
    assert reply.body["choices"] == [] and reply.mom["structured_output"] == verdict
    assert len(calls_to(fake, "so-judge")) == 1
    assert reply.mom["concluding_fallbacks"] == []


def test_the_sdk_parse_returns_the_parsed_object_even_after_a_retry(shaped: Service, fake: FakeUpstream) -> None:
    fake.configure({"so-judge": {"texts": ["Ada Lovelace!", ADA]}})
    client = OpenAI(base_url=shaped.base_url, api_key=TOKEN, max_retries=0)
    completion = client.chat.completions.parse(model="so-mom", messages=QUESTION, response_format=Person)  # type: ignore[arg-type]
    assert completion.choices[0].message.parsed == Person(name="Ada", age=36)
    first, _ = calls_to(fake, "so-judge")
    form = first["body"]["response_format"]
    assert form["type"] == "json_schema" and form["json_schema"]["name"] == "Person"
    assert form["json_schema"]["strict"] is True
    assert all("response_format" not in sent(fake, m) for m in MEMBERS)


@STREAMS
def test_a_json_answers_thinking_goes_to_reasoning_content_not_into_the_json(
    shaped: Service, fake: FakeUpstream, stream: bool
) -> None:
    """With think_tags, the members' blocks would open `content`: a JSON answer's content is the JSON alone."""
    fake.configure({"so-a": {"text": "Ada Lovelace, at 36."}, "so-judge": {"text": ADA}})
    reply = ask(shaped, "so-think", QUESTION, stream=stream, response_format=JSON_SCHEMA)
    assert reply.status == 200, reply.body
    assert reply.content == ADA and reply.mom["structured_output"] == "valid"
    assert reply.reasoning is not None and "Model: so-a\nContent: Ada Lovelace, at 36." in reply.reasoning
    # without a JSON format the same model keeps its think tags in content
    plain = ask(shaped, "so-think", QUESTION, stream=stream)
    assert plain.content is not None and plain.content.startswith("<think>\n") and plain.reasoning is None


def test_the_sdk_parse_works_on_a_model_with_thinking_tags(shaped: Service, fake: FakeUpstream) -> None:
    fake.configure({"so-judge": {"text": ADA}})
    client = OpenAI(base_url=shaped.base_url, api_key=TOKEN, max_retries=0)
    completion = client.chat.completions.parse(model="so-think", messages=QUESTION, response_format=Person)  # type: ignore[arg-type]
    assert completion.choices[0].message.parsed == Person(name="Ada", age=36)


# -------------------------------------------------------------------------------------------------- parameters


@STREAMS
def test_tool_options_without_tools_are_not_sent(shaped: Service, fake: FakeUpstream, stream: bool) -> None:
    """`tool_choice: "none"` and `parallel_tool_calls` mean nothing without tools (and some providers refuse them
    then): accepted, not passed on."""
    reply = ask(shaped, "so-mom", QUESTION, stream=stream, tool_choice="none", parallel_tool_calls=False)
    assert reply.status == 200, reply.body
    for name in (*MEMBERS, "so-judge"):
        body = sent(fake, name)
        assert "tool_choice" not in body and "parallel_tool_calls" not in body and "tools" not in body, name


FINAL = {
    "max_completion_tokens": 300,
    "stop": ["END"],
    "response_format": JSON_OBJECT,
    "tool_choice": "auto",
    "parallel_tool_calls": False,
    "logit_bias": {"1734": -100},
    "logprobs": True,
    "top_logprobs": 2,
}
SAMPLING = {"temperature": 0.4, "top_p": 0.8, "seed": 11, "presence_penalty": 0.5, "frequency_penalty": 0.25}


@STREAMS
def test_the_final_answers_parameters_reach_the_concluding_call_only(
    shaped: Service, fake: FakeUpstream, stream: bool
) -> None:
    fake.configure({"so-judge": {"text": '{"a": 1}'}})
    reply = ask(shaped, "so-mom", QUESTION, stream=stream, tools=TOOLS, **FINAL, **SAMPLING)
    assert reply.status == 200, reply.body
    assert called(fake) == ["so-a", "so-b", "so-judge"]
    judge = sent(fake, "so-judge")
    for name, value in SAMPLING.items():
        assert judge[name] == value
    for name, value in FINAL.items():
        if name != "max_completion_tokens":
            assert judge[name] == value, name
    assert judge["max_tokens"] == 300  # one limit per call, as max_tokens
    assert judge["tools"] == TOOLS
    for member in MEMBERS:
        body = sent(fake, member)
        for name, value in SAMPLING.items():
            assert body[name] == value
        for name in (*FINAL, "max_tokens"):
            if name != "tool_choice":
                assert name not in body, name
        assert body["tool_choice"] == "auto" and body["tools"] == TOOLS  # (members choose freely)


def expected_logprobs(text: str, top: int) -> list[dict[str, Any]]:
    """The fake's logprobs for an answer: the n-th token -0.01 * (1 + n % 10), alternatives each 1 lower."""
    out = []
    for n, token in enumerate(split_tokens(text)):
        logprob = round(-0.01 * (1 + n % 10), 4)
        alternatives = ([(token, logprob)] + [(f"<alt{k}>", round(logprob - k, 4)) for k in range(1, top)])[:top]
        out.append(
            {
                "token": token,
                "logprob": logprob,
                "bytes": list(token.encode()),
                "top_logprobs": [{"token": t, "logprob": lp, "bytes": list(t.encode())} for t, lp in alternatives],
            }
        )
    return out


@STREAMS
@pytest.mark.parametrize("top", [0, 3])
def test_logprobs_of_the_concluding_call_come_back(shaped: Service, fake: FakeUpstream, stream: bool, top: int) -> None:
    text = "Ada Lovelace wrote it, around 1843."
    fake.configure({"so-a": {"text": "Member words."}, "so-judge": {"text": text}})
    reply = ask(shaped, "so-mom", QUESTION, stream=stream, logprobs=True, top_logprobs=top)
    assert reply.status == 200, reply.body
    assert reply.content == text
    assert reply.logprobs == expected_logprobs(text, top)
    if stream:  # each content chunk carries its own tokens' logprobs
        content_chunks = [c for c in reply.chunks if c["choices"] and c["choices"][0]["delta"].get("content")]
        for chunk in content_chunks:
            choice = chunk["choices"][0]
            assert "".join(t["token"] for t in choice["logprobs"]["content"]) == choice["delta"]["content"]
    assert all("logprobs" not in sent(fake, m) and "top_logprobs" not in sent(fake, m) for m in MEMBERS)
    judge = sent(fake, "so-judge")
    assert judge["logprobs"] is True and judge["top_logprobs"] == top


def test_without_logprobs_none_come_back(shaped: Service, fake: FakeUpstream) -> None:
    reply: Reply = ask(shaped, "so-mom", QUESTION)
    assert reply.body["choices"][0]["logprobs"] is None
    assert "logprobs" not in sent(fake, "so-judge")
