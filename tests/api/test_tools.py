"""Tool calling through the live service (docs/api.md): OpenAI's shapes accepted or refused, the strategies
(synthesize, vote), a tool loop's next turn (relay, panel), capabilities, the wire format of tool calls, the
thinking context, the cache, and the costs and usage records of every kind of turn.

Each test checks both sides: what every upstream call received (the fake's log) and what the client got, every
body and chunk validated against OpenAI's schemas. The LLMs are this module's own (`tt-*`).
"""

from __future__ import annotations

import sqlite3
from collections.abc import Iterator
from dataclasses import dataclass, field
from decimal import Decimal
from typing import Any

import httpx
import orjson
import pytest

from tests.api.test_metrics import grew, scrape
from tests.conftest import CallPath, Service, StartService, llm, wait_until
from tests.fake_upstream import FakeUpstream, _prompt_word_count
from tests.openai_schema import validate

MEMBER_PRICE = {"input_per_million": "2", "output_per_million": "8"}
JUDGE_PRICE = {"input_per_million": "5", "output_per_million": "20"}
JUDGE_PROMPT = "TOOLS-PROMPT: combine the panel's answers."

WEATHER = {
    "type": "function",
    "function": {
        "name": "get_weather",
        "description": "Current weather in a city.",
        "parameters": {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]},
    },
}
CLOCK = {
    "type": "function",
    "function": {
        "name": "get_time",
        "description": "The local time in a city.",
        "parameters": {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]},
    },
}
TOOLS = [WEATHER, CLOCK]
PARIS = {"name": "get_weather", "arguments": {"city": "Paris"}}
OSLO = {"name": "get_weather", "arguments": {"city": "Oslo"}}
QUESTION = [{"role": "user", "content": "What is the weather in Paris?"}]
EARLIER_CALL = {
    "id": "call_7",
    "type": "function",
    "function": {"name": "get_weather", "arguments": '{"city":"Paris"}'},
}
# a tool loop's next step: the client ran the call the service proposed and comes back with its result
LOOP = [
    *QUESTION,
    {"role": "assistant", "content": None, "tool_calls": [EARLIER_CALL]},
    {"role": "tool", "tool_call_id": "call_7", "content": "18 C and sunny"},
]
AFTER_TOOLS = "In Paris: {tool_results}."


def tools_config(fake: FakeUpstream) -> dict[str, Any]:
    """This module's MoM models over its own LLMs: `tt-mute` cannot call tools, `tt-deaf-judge` can neither call
    tools nor format answers, `tt-b` sees images."""
    priced = {"retries": 0, "pricing": MEMBER_PRICE}
    judged = {"retries": 0, "pricing": JUDGE_PRICE}

    def model(name: str, members: list[str], **extra: Any) -> dict[str, Any]:
        base = {"name": name, "llms_to_query": members, "concluding_llm": "tt-judge", "concluding_prompt": "tools"}
        return base | extra

    return {
        "llm_definitions": [
            llm("tt-a", fake, **priced),
            llm("tt-b", fake, multimodal=True, **priced),
            llm("tt-c", fake, **priced),
            llm("tt-mute", fake, capabilities={"tools": False}, **priced),
            llm("tt-judge", fake, capabilities={"tools": True, "structured_output": True}, **judged),
            llm("tt-deaf-judge", fake, capabilities={"tools": False, "structured_output": False}, **judged),
            llm("tt-judge2", fake, **judged),
        ],
        "prompt_definitions": [{"name": "tools", "content": JUDGE_PROMPT}],
        "models": [
            model("tools-synth", ["tt-a", "tt-b", "tt-mute"]),
            model("tools-vote", ["tt-a", "tt-b", "tt-c"], tools={"strategy": "vote", "vote_threshold": 2}),
            model("tools-panel", ["tt-a", "tt-b"], tools={"continuation": "panel"}),
            model("tools-fallback", ["tt-a"], concluding_llm="tt-deaf-judge", concluding_fallbacks=["tt-judge2"]),
            model("tools-incapable", ["tt-a"], concluding_llm="tt-deaf-judge"),
            model("tools-think", ["tt-a", "tt-b"], include_thinking_context=True),
            model("tools-reason", ["tt-a", "tt-b"], include_thinking_context=True, thinking_format="reasoning_content"),
        ],
    }


@pytest.fixture(scope="module")
def tooled(fake_server: FakeUpstream, start_service: StartService, call_path: CallPath) -> Service:
    return start_service(tools_config(fake_server), call_path.env)


@pytest.fixture(scope="module")
def tool_cache(fake_server: FakeUpstream, start_service: StartService, call_path: CallPath) -> Service:
    """The same models with the in-process response cache on."""
    return start_service(tools_config(fake_server), call_path.env | {"MOM_CACHE_ENABLED": "true", "REDIS_URL": ""})


# ------------------------------------------------------------------------------------------------- helpers


@dataclass
class Reply:
    """What the client got: a `chat.completion`, a stream put together, or an error."""

    status: int
    body: dict[str, Any]  # the chat.completion, the stream's last chunk (usage and `mom`), or the error
    content: str | None = None
    tool_calls: list[dict[str, Any]] | None = None
    finish_reason: str | None = None
    reasoning: str | None = None
    logprobs: list[dict[str, Any]] | None = None
    chunks: list[dict[str, Any]] = field(default_factory=list)  # a stream's chunks, [DONE] excluded
    request_id: str = ""  # our id of the request (X-Request-ID when the client sent none): its usage records' key

    @property
    def mom(self) -> dict[str, Any]:
        breakdown: dict[str, Any] = self.body["mom"]
        return breakdown

    @property
    def error(self) -> dict[str, Any]:
        error: dict[str, Any] = self.body["error"]
        return error

    def member(self, name: str) -> dict[str, Any]:
        return next(m for m in self.mom["members"] if m["name"] == name)

    @property
    def tool_pieces(self) -> list[dict[str, Any]]:
        """A stream's `delta.tool_calls` pieces, in order."""
        return [p for c in self.chunks if c["choices"] for p in c["choices"][0]["delta"].get("tool_calls") or ()]


def parse_reply(response: httpx.Response, stream: bool) -> Reply:
    """The response read whole, every body and chunk validated against OpenAI's schemas."""
    if response.status_code != 200:
        body: dict[str, Any] = response.json()
        validate(body, "ErrorResponse")
        return Reply(response.status_code, body)
    if not stream:
        body = response.json()
        validate(body, "CreateChatCompletionResponse")
        choice = body["choices"][0]
        message = choice["message"]
        logprobs = choice["logprobs"]["content"] if choice["logprobs"] else None
        return Reply(
            200,
            body,
            message["content"],
            message.get("tool_calls"),
            choice["finish_reason"],
            message.get("reasoning_content"),
            logprobs,
        )
    assert response.headers["content-type"].startswith("text/event-stream")
    frames = [f.removeprefix("data: ") for f in response.text.split("\n\n") if f.strip()]
    assert frames[-1] == "[DONE]", frames[-3:]
    chunks = [orjson.loads(f) for f in frames[:-1]]
    for chunk in chunks:
        if "error" in chunk:  # an error after the stream began: its last event
            validate(chunk, "ErrorResponse")
            return Reply(200, chunk, chunks=chunks)
        validate(chunk, "CreateChatCompletionStreamResponse")
    assert len({c["id"] for c in chunks}) == 1
    deltas = [c["choices"][0] for c in chunks if c["choices"]]
    finishes = [d["finish_reason"] for d in deltas if d["finish_reason"] is not None]
    assert len(finishes) == 1 and deltas[-1]["finish_reason"] == finishes[0], finishes
    texts = [d["delta"]["content"] for d in deltas if d["delta"].get("content")]  # (a role chunk's "" is no text)
    reasoning = [d["delta"]["reasoning_content"] for d in deltas if d["delta"].get("reasoning_content")]
    logprobs = [t for d in deltas if d.get("logprobs") for t in d["logprobs"]["content"] or ()]
    reply = Reply(
        200,
        chunks[-1],
        "".join(texts) if texts else None,
        None,
        finishes[0],
        "".join(reasoning) if reasoning else None,
        logprobs or None,
        chunks,
    )
    reply.tool_calls = assemble(reply.tool_pieces)
    return reply


def assemble(pieces: list[dict[str, Any]]) -> list[dict[str, Any]] | None:
    """Streamed tool calls put together as OpenAI's clients do, checking OpenAI's order: each call's first piece
    has its index, id, type and name (and empty arguments), the next ones only arguments fragments."""
    calls: dict[int, dict[str, Any]] = {}
    for piece in pieces:
        index = piece["index"]
        if index not in calls:
            assert set(piece) == {"index", "id", "type", "function"}, piece
            assert piece["type"] == "function" and piece["function"]["name"], piece
            calls[index] = {
                "id": piece["id"],
                "type": "function",
                "function": {"name": piece["function"]["name"], "arguments": piece["function"].get("arguments", "")},
            }
        else:
            assert set(piece) == {"index", "function"} and set(piece["function"]) == {"arguments"}, piece
            calls[index]["function"]["arguments"] += piece["function"]["arguments"]
    assert sorted(calls) == list(range(len(calls)))
    return [calls[i] for i in sorted(calls)] or None


def ask(
    service: Service,
    model: str,
    messages: list[dict[str, Any]] | None = None,
    *,
    stream: bool = False,
    headers: dict[str, str] | None = None,
    **extra: Any,
) -> Reply:
    """One chat request; a stream asks for the usage chunk (which carries `mom`)."""
    body: dict[str, Any] = {"model": model, "messages": messages or QUESTION, **extra}
    if stream:
        body = {"stream": True, "stream_options": {"include_usage": True}} | body
    response = httpx.post(
        f"{service.base_url}/chat/completions", headers=service.headers() | (headers or {}), json=body, timeout=30
    )
    reply = parse_reply(response, stream)
    reply.request_id = response.headers["x-request-id"]
    return reply


def calls_to(fake: FakeUpstream, name: str) -> list[dict[str, Any]]:
    """The requests an upstream LLM received, in order."""
    return [e for e in fake.log() if e["model"] == name]


def sent(fake: FakeUpstream, name: str) -> dict[str, Any]:
    """The body of the one request an upstream LLM received."""
    (entry,) = calls_to(fake, name)
    body: dict[str, Any] = entry["body"]
    return body


def called(fake: FakeUpstream) -> list[str]:
    return sorted(e["model"] for e in fake.log())


def tool_call(name: str, arguments: str, call_id: str) -> dict[str, Any]:
    return {"id": call_id, "type": "function", "function": {"name": name, "arguments": arguments}}


def panel_text(body: dict[str, Any]) -> str:
    """The panel block the concluding LLM read: its last message."""
    message = body["messages"][-1]
    assert message["role"] == "user"
    text: str = message["content"]
    return text


def as_sent(messages: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Messages compared as an OpenAI server reads them: an assistant's `content: null` beside its tool calls is the
    same as no content (LiteLLM leaves it out)."""
    return [{k: v for k, v in m.items() if not (k == "content" and v is None)} for m in messages]


STREAMS = pytest.mark.parametrize("stream", [False, True], ids=["whole", "streamed"])


# ------------------------------------------------------------------------------------------ refused: 400s


REFUSED: list[tuple[str, dict[str, Any], str, str, str]] = [
    # (id, body fields, param, code, a word the message must hold)
    (
        "other-tool-type",
        {"tools": [WEATHER, {"type": "web_search_preview"}]},
        "tools[1].type",
        "unsupported_tool_type",
        "web_search_preview",
    ),
    (
        "custom-tool-type",
        {"tools": [{"type": "custom", "custom": {"name": "x"}}]},
        "tools[0].type",
        "unsupported_tool_type",
        "custom",
    ),
    (
        "orphan-tool-message",
        {"messages": [*QUESTION, {"role": "tool", "tool_call_id": "call_7", "content": "18 C"}], "tools": TOOLS},
        "messages[1].role",
        "invalid_tool_message",
        "call_7",
    ),
    (
        "tool-message-other-id",
        {"messages": [*LOOP[:2], {"role": "tool", "tool_call_id": "call_8", "content": "18 C"}], "tools": TOOLS},
        "messages[2].role",
        "invalid_tool_message",
        "call_8",
    ),
    (
        "tool-message-before-its-call",
        {"messages": [QUESTION[0], LOOP[2], LOOP[1]], "tools": TOOLS},
        "messages[1].role",
        "invalid_tool_message",
        "call_7",
    ),
    (
        "legacy-functions",
        {"functions": [WEATHER["function"]]},
        "functions",
        "unsupported_parameter",
        "'tools'",
    ),
    (
        "legacy-function-call",
        {"function_call": "auto", "tools": TOOLS},
        "function_call",
        "unsupported_parameter",
        "'tool_choice'",
    ),
    ("n-2", {"n": 2}, "n", "unsupported_parameter", "n=1"),
    ("audio", {"audio": {"voice": "alloy", "format": "wav"}}, "audio", "unsupported_parameter", "audio"),
    ("audio-modality", {"modalities": ["text", "audio"]}, "modalities", "unsupported_parameter", "modalities"),
    (
        "prediction",
        {"prediction": {"type": "content", "content": "x"}},
        "prediction",
        "unsupported_parameter",
        "prediction",
    ),
    ("web-search", {"web_search_options": {}}, "web_search_options", "unsupported_parameter", "web_search_options"),
]


@STREAMS
@pytest.mark.parametrize(("fields", "param", "code", "word"), [r[1:] for r in REFUSED], ids=[r[0] for r in REFUSED])
def test_refused_before_any_upstream_call(
    tooled: Service, fake: FakeUpstream, stream: bool, fields: dict[str, Any], param: str, code: str, word: str
) -> None:
    reply = ask(tooled, "tools-synth", stream=stream, **fields)
    assert reply.status == 400, reply.body
    assert (reply.error["type"], reply.error["param"], reply.error["code"]) == ("invalid_request_error", param, code)
    assert word in reply.error["message"]
    assert fake.log() == []


@STREAMS
def test_tools_for_a_model_none_of_whose_concluding_llms_calls_them_is_a_400(
    tooled: Service, fake: FakeUpstream, stream: bool
) -> None:
    reply = ask(tooled, "tools-incapable", stream=stream, tools=TOOLS)
    assert reply.status == 400, reply.body
    assert (reply.error["param"], reply.error["code"]) == ("tools", "tools_not_supported")
    assert "tools-incapable" in reply.error["message"]
    assert fake.log() == []
    # without tools it answers, its concluding LLM concluding
    fake.configure({"tt-deaf-judge": {"text": "Plain answer."}})
    plain = ask(tooled, "tools-incapable", stream=stream)
    assert (plain.status, plain.content) == (200, "Plain answer.")


def test_models_report_what_each_takes(tooled: Service) -> None:
    response = httpx.get(f"{tooled.base_url}/models", headers=tooled.headers(), timeout=10)
    assert response.status_code == 200
    listing = response.json()
    validate(listing, "ListModelsResponse")
    found = {m["id"]: m["capabilities"] for m in listing["data"]}
    on = {"vision": True, "tools": True, "structured_output": True}
    assert found == {
        "tools-synth": on,  # tt-b sees images
        "tools-vote": on,
        "tools-panel": on,
        # its concluding LLM can do neither, its fallback both; no member sees images
        "tools-fallback": {"vision": False, "tools": True, "structured_output": True},
        "tools-incapable": {"vision": False, "tools": False, "structured_output": False},
        "tools-think": on,
        "tools-reason": on,
    }
    for name, capabilities in found.items():
        one = httpx.get(f"{tooled.base_url}/models/{name}", headers=tooled.headers(), timeout=10).json()
        assert one["capabilities"] == capabilities


# ------------------------------------------------------------------------------------------------ synthesize


@STREAMS
def test_synthesize_members_propose_and_the_concluding_llm_calls(
    tooled: Service, fake: FakeUpstream, stream: bool
) -> None:
    fake.configure(
        {
            "tt-a": {"tool_calls": [PARIS]},
            "tt-b": {"text": "I would look the weather up."},
            "tt-mute": {"text": "Call get_weather with Paris."},
            "tt-judge": {"tool_calls": [PARIS]},
        }
    )
    reply = ask(tooled, "tools-synth", stream=stream, tools=TOOLS, tool_choice="auto", parallel_tool_calls=False)

    assert reply.status == 200, reply.body
    assert reply.tool_calls == [tool_call("get_weather", '{"city":"Paris"}', "call_tt-judge_1")]
    assert reply.content is None
    assert reply.finish_reason == "tool_calls"
    assert reply.mom["turn"] == "ensemble"
    assert reply.mom["concluding"]["status"] == "ok" and reply.mom["concluding"]["name"] == "tt-judge"
    assert reply.member("tt-a")["tool_calls"] == [tool_call("get_weather", '{"city":"Paris"}', "call_tt-a_1")]
    assert reply.member("tt-b")["tool_calls"] is None
    assert called(fake) == ["tt-a", "tt-b", "tt-judge", "tt-mute"]

    for member in ("tt-a", "tt-b"):  # they can call tools: the real ones, "auto", nothing of the final shape
        body = sent(fake, member)
        assert body["tools"] == TOOLS and body["tool_choice"] == "auto"
        assert "parallel_tool_calls" not in body
        assert body["messages"] == QUESTION
    mute = sent(fake, "tt-mute")  # it cannot: the tools as text, no tools parameter
    assert "tools" not in mute and "tool_choice" not in mute and "parallel_tool_calls" not in mute
    assert mute["messages"][0] == QUESTION[0]
    described = [m["content"] for m in mute["messages"] if m["role"] == "system"]
    assert len(described) == 1
    assert "get_weather: Current weather in a city." in described[0]
    assert "get_time: The local time in a city." in described[0]
    assert orjson.dumps(WEATHER["function"]["parameters"]).decode() in described[0]

    judge = sent(fake, "tt-judge")  # the real tools, the client's choice, every proposal
    assert judge["tools"] == TOOLS and judge["tool_choice"] == "auto" and judge["parallel_tool_calls"] is False
    assert judge["messages"][0] == {"role": "system", "content": JUDGE_PROMPT}
    block = panel_text(judge)
    assert (
        '<panel_answer index="1" name="tt-a" status="ok">\n\n<proposed_tool_calls>'
        '[{"name":"get_weather","arguments":{"city":"Paris"}}]</proposed_tool_calls>\n</panel_answer>'
    ) in block
    assert '<panel_answer index="2" name="tt-b" status="ok">\nI would look the weather up.\n</panel_answer>' in block
    assert '<panel_answer index="3" name="tt-mute" status="ok">\nCall get_weather with Paris.\n</panel_answer>' in block
    assert block.count("</proposed_tool_calls>") == 1  # tt-a's alone
    assert "Decide yourself: answer in text, call the tools, or both." in block


@STREAMS
def test_the_concluding_llm_may_answer_text_and_several_calls(
    tooled: Service, fake: FakeUpstream, stream: bool
) -> None:
    fake.configure(
        {
            "tt-a": {"tool_calls": [PARIS, {"name": "get_time", "arguments": {"city": "Paris"}}]},
            "tt-judge": {
                "text": "Looking both up.",
                "tool_calls": [
                    {"name": "get_weather", "arguments": '{"city": "Paris"}', "id": "call_w"},
                    {"name": "get_time", "arguments": '{"city": "Paris"}', "id": "call_t"},
                ],
            },
        }
    )
    reply = ask(tooled, "tools-synth", stream=stream, tools=TOOLS)
    assert reply.status == 200, reply.body
    assert reply.content == "Looking both up."
    assert reply.tool_calls == [
        tool_call("get_weather", '{"city": "Paris"}', "call_w"),
        tool_call("get_time", '{"city": "Paris"}', "call_t"),
    ]
    assert reply.finish_reason == "tool_calls"
    assert "parallel_tool_calls" not in sent(fake, "tt-judge")  # the client did not set it
    assert (
        '<proposed_tool_calls>[{"name":"get_weather","arguments":{"city":"Paris"}},'
        '{"name":"get_time","arguments":{"city":"Paris"}}]</proposed_tool_calls>'
    ) in panel_text(sent(fake, "tt-judge"))
    if stream:  # text first, then each call: its head, then its arguments in fragments
        pieces = reply.tool_pieces
        assert [p["index"] for p in pieces if "id" in p] == [0, 1]
        assert len([p for p in pieces if p["index"] == 0]) > 2  # the fake sends the arguments in 3 fragments
        kinds = [
            "text" if c["choices"][0]["delta"].get("content") else "call"
            for c in reply.chunks
            if c["choices"] and (c["choices"][0]["delta"].get("content") or c["choices"][0]["delta"].get("tool_calls"))
        ]
        assert kinds == sorted(kinds, key=lambda k: k != "text")


@pytest.mark.parametrize(
    ("choice", "to_members"),
    [
        ("none", "none"),
        ("required", "auto"),
        ({"type": "function", "function": {"name": "get_time"}}, "auto"),
    ],
    ids=["none", "required", "named"],
)
def test_members_choose_freely_and_the_client_choice_reaches_the_concluding_call(
    tooled: Service, fake: FakeUpstream, choice: Any, to_members: str
) -> None:
    fake.configure({"tt-judge": {"text": "Answer."}})
    reply = ask(tooled, "tools-synth", tools=TOOLS, tool_choice=choice)
    assert reply.status == 200, reply.body
    for member in ("tt-a", "tt-b"):
        assert sent(fake, member)["tool_choice"] == to_members
        assert sent(fake, member)["tools"] == TOOLS
    assert "tool_choice" not in sent(fake, "tt-mute")
    assert sent(fake, "tt-judge")["tool_choice"] == choice


@STREAMS
def test_a_member_without_tools_reads_the_tool_history_as_text(
    tooled: Service, fake: FakeUpstream, stream: bool
) -> None:
    fake.configure({"tt-judge": {"text": "Tomorrow too."}})
    conversation = [*LOOP, {"role": "assistant", "content": "18 C."}, {"role": "user", "content": "And tomorrow?"}]
    reply = ask(tooled, "tools-synth", conversation, stream=stream, tools=TOOLS)
    assert reply.status == 200, reply.body
    assert reply.content == "Tomorrow too."
    assert reply.mom["turn"] == "ensemble"  # it does not end with tool results: the panel answers

    for member in ("tt-a", "tt-b"):  # the conversation in OpenAI's shapes, as sent
        assert as_sent(sent(fake, member)["messages"]) == as_sent(conversation)
    mute = sent(fake, "tt-mute")["messages"]
    assert all(m["role"] in ("system", "user", "assistant") for m in mute)
    assert not any("tool_calls" in m or "tool_call_id" in m for m in mute)
    text = "\n".join(m["content"] for m in mute)
    assert '[tool call call_7] get_weather({"city":"Paris"})' in text
    assert "[tool result for call call_7]\n18 C and sunny" in text
    assert mute[-2] == {"role": "user", "content": "And tomorrow?"}  # then the tools described
    assert mute[-1]["role"] == "system" and "get_weather" in mute[-1]["content"]
    judge = sent(fake, "tt-judge")["messages"]
    assert as_sent(judge[1 : 1 + len(conversation)]) == as_sent(conversation)


def test_a_member_without_tools_gets_no_tool_shapes_even_when_the_request_has_no_tools(
    tooled: Service, fake: FakeUpstream
) -> None:
    conversation = [*LOOP, {"role": "assistant", "content": "18 C."}, {"role": "user", "content": "Thanks!"}]
    reply = ask(tooled, "tools-synth", conversation)
    assert reply.status == 200, reply.body
    mute = sent(fake, "tt-mute")
    assert "tools" not in mute
    assert not any("tool_calls" in m or m["role"] == "tool" for m in mute["messages"])
    for member in ("tt-a", "tt-b"):
        assert "tools" not in sent(fake, member) and "tool_choice" not in sent(fake, member)


# ------------------------------------------------------------------------------------------------------ vote


@STREAMS
def test_vote_enough_members_proposing_the_same_calls_answer_without_concluding(
    tooled: Service, fake: FakeUpstream, stream: bool
) -> None:
    # the same call, whatever the keys' order and spacing of the arguments
    fake.configure(
        {
            "tt-a": {"tool_calls": [{"name": "get_weather", "arguments": '{"city": "Paris", "unit": "C"}'}]},
            "tt-b": {"tool_calls": [{"name": "get_weather", "arguments": '{"unit":"C","city":"Paris"}'}]},
            "tt-c": {"tool_calls": [OSLO]},
        }
    )
    choice = {"type": "function", "function": {"name": "get_weather"}}
    reply = ask(tooled, "tools-vote", stream=stream, tools=TOOLS, tool_choice=choice)
    assert reply.status == 200, reply.body
    # the first agreeing member's calls, its id included
    assert reply.tool_calls == [tool_call("get_weather", '{"city": "Paris", "unit": "C"}', "call_tt-a_1")]
    assert reply.content is None and reply.finish_reason == "tool_calls"
    assert reply.mom["turn"] == "vote"
    concluding = reply.mom["concluding"]
    assert (concluding["name"], concluding["status"], concluding["reason"]) == ("tt-judge", "skipped", "vote")
    assert concluding["usage"] is None and concluding["cost"] == 0
    assert called(fake) == ["tt-a", "tt-b", "tt-c"]  # no concluding call
    for member in ("tt-a", "tt-b", "tt-c"):  # the real tools and the client's own choice
        assert sent(fake, member)["tools"] == TOOLS and sent(fake, member)["tool_choice"] == choice


@pytest.mark.parametrize(
    "proposals",
    [
        {"tt-a": [PARIS], "tt-b": [OSLO], "tt-c": None},  # two different calls
        {"tt-a": [PARIS], "tt-b": None, "tt-c": None},  # one proposal, under the threshold
        {"tt-a": [PARIS], "tt-b": [PARIS, OSLO], "tt-c": [OSLO]},  # the same call, but not the same calls
    ],
    ids=["disagree", "alone", "subset"],
)
@STREAMS
def test_vote_without_agreement_the_concluding_llm_synthesizes(
    tooled: Service, fake: FakeUpstream, stream: bool, proposals: dict[str, Any]
) -> None:
    fake.configure(
        {name: {"tool_calls": calls} if calls else {"text": "No call needed."} for name, calls in proposals.items()}
        | {"tt-judge": {"tool_calls": [OSLO]}}
    )
    reply = ask(tooled, "tools-vote", stream=stream, tools=TOOLS)
    assert reply.status == 200, reply.body
    assert reply.tool_calls == [tool_call("get_weather", '{"city":"Oslo"}', "call_tt-judge_1")]
    assert reply.mom["turn"] == "ensemble"
    assert reply.mom["concluding"]["status"] == "ok"
    assert called(fake) == ["tt-a", "tt-b", "tt-c", "tt-judge"]
    judge = sent(fake, "tt-judge")
    assert judge["tools"] == TOOLS
    assert panel_text(judge).count("</proposed_tool_calls>") == sum(1 for c in proposals.values() if c)


@STREAMS
def test_vote_agreed_calls_are_the_answer_only_as_the_client_allows_parallel_calls(
    tooled: Service, fake: FakeUpstream, stream: bool
) -> None:
    """Members never see `parallel_tool_calls`: two of them agreeing on two calls at once cannot be the answer to a
    client that allows one call at a time (the concluding LLM, told so, decides)."""
    both = [PARIS, OSLO]
    fake.configure({"tt-a": {"tool_calls": both}, "tt-b": {"tool_calls": both}, "tt-judge": {"tool_calls": [OSLO]}})
    allowed = ask(tooled, "tools-vote", stream=stream, tools=TOOLS)
    assert allowed.status == 200, allowed.body
    assert (allowed.mom["turn"], len(allowed.tool_calls or ())) == ("vote", 2)
    assert "parallel_tool_calls" not in sent(fake, "tt-a")

    fake.clear_log()
    one_at_a_time = ask(tooled, "tools-vote", stream=stream, tools=TOOLS, parallel_tool_calls=False)
    assert one_at_a_time.status == 200, one_at_a_time.body
    assert one_at_a_time.tool_calls is not None and len(one_at_a_time.tool_calls) == 1, one_at_a_time.tool_calls
    # the members were told too; these two proposed two calls anyway, so no proposal could win: the judge decided
    assert sent(fake, "tt-a")["parallel_tool_calls"] is False
    assert one_at_a_time.mom["turn"] == "ensemble"
    assert sent(fake, "tt-judge")["parallel_tool_calls"] is False


def test_vote_without_tools_is_an_ordinary_synthesis(tooled: Service, fake: FakeUpstream) -> None:
    fake.configure({"tt-a": {"tool_calls": [PARIS]}, "tt-b": {"tool_calls": [PARIS]}, "tt-judge": {"text": "Hi."}})
    reply = ask(tooled, "tools-vote")
    assert reply.status == 200, reply.body
    assert (reply.content, reply.mom["turn"]) == ("Hi.", "ensemble")
    assert all("tools" not in sent(fake, m) for m in ("tt-a", "tt-b", "tt-c"))


# -------------------------------------------------------------------------------------- a tool loop's next turn


@STREAMS
def test_relay_tool_results_go_to_the_concluding_llm_alone(tooled: Service, fake: FakeUpstream, stream: bool) -> None:
    fake.configure({"tt-judge": {"tool_calls": [OSLO], "after_tool_text": AFTER_TOOLS}})
    before = scrape(tooled)
    reply = ask(tooled, "tools-synth", LOOP, stream=stream, tools=TOOLS, tool_choice="auto", parallel_tool_calls=True)
    assert reply.status == 200, reply.body
    delta = grew(before, scrape(tooled))
    assert delta("mom_upstream_calls_total", llm="tt-judge", role="concluding", stage="conclude", status="ok") == 1
    for name in ("tt-a", "tt-b", "tt-mute"):  # members a relay turn does not ask are not counted as skipped
        assert delta("mom_upstream_calls_total", llm=name, role="member", stage="answer", status="skipped") == 0
    assert reply.content == "In Paris: 18 C and sunny."
    assert reply.tool_calls is None and reply.finish_reason == "stop"
    assert reply.mom["turn"] == "relay"
    for member in reply.mom["members"]:
        assert (member["status"], member["reason"], member["usage"], member["cost"]) == ("skipped", "relay", None, 0)
    assert reply.mom["concluding"]["status"] == "ok"
    assert reply.mom["asked"] == 0 and reply.mom["degraded"] is False

    assert called(fake) == ["tt-judge"]  # one upstream call
    judge = sent(fake, "tt-judge")  # the conversation as it is, with the tools and the client's options
    assert as_sent(judge["messages"]) == as_sent(LOOP)
    assert judge["tools"] == TOOLS and judge["tool_choice"] == "auto" and judge["parallel_tool_calls"] is True


@pytest.mark.parametrize(
    "result",
    [
        {"role": "tool", "tool_call_id": "call_7", "content": [{"type": "text", "text": "18 C and sunny"}]},
        {"role": "tool", "tool_call_id": "call_7", "content": "18 C and sunny", "name": "get_weather"},
    ],
    ids=["text-parts", "named"],
)
def test_relay_takes_tool_results_in_openais_other_shapes(
    tooled: Service, fake: FakeUpstream, result: dict[str, Any]
) -> None:
    fake.configure({"tt-judge": {"after_tool_text": AFTER_TOOLS}})
    with_text = {"role": "assistant", "content": "Let me check.", "tool_calls": [EARLIER_CALL]}
    reply = ask(tooled, "tools-synth", [*QUESTION, with_text, result], tools=TOOLS)
    assert reply.status == 200, reply.body
    assert (reply.content, reply.mom["turn"]) == ("In Paris: 18 C and sunny.", "relay")
    messages = sent(fake, "tt-judge")["messages"]
    assert messages[1] == with_text
    assert (messages[2]["role"], messages[2]["tool_call_id"]) == ("tool", "call_7")


@STREAMS
def test_relay_may_answer_with_more_tool_calls(tooled: Service, fake: FakeUpstream, stream: bool) -> None:
    fake.configure({"tt-judge": {"tool_calls": [{"name": "get_time", "arguments": {"city": "Paris"}}]}})
    reply = ask(tooled, "tools-synth", LOOP, stream=stream, tools=TOOLS)
    assert reply.status == 200, reply.body
    assert reply.tool_calls == [tool_call("get_time", '{"city":"Paris"}', "call_tt-judge_1")]
    assert (reply.content, reply.finish_reason, reply.mom["turn"]) == (None, "tool_calls", "relay")
    assert called(fake) == ["tt-judge"]


@STREAMS
def test_continuation_panel_asks_the_whole_panel_again(tooled: Service, fake: FakeUpstream, stream: bool) -> None:
    fake.configure(
        {
            "tt-a": {"tool_calls": [PARIS], "after_tool_text": "A: {tool_results}"},
            "tt-b": {"after_tool_text": "B: {tool_results}"},
            "tt-judge": {"text": "Judge: it is sunny."},  # (it reads the panel's answers last, no tool results)
        }
    )
    reply = ask(tooled, "tools-panel", LOOP, stream=stream, tools=TOOLS)
    assert reply.status == 200, reply.body
    assert reply.content == "Judge: it is sunny."
    assert reply.mom["turn"] == "ensemble"
    assert [m["status"] for m in reply.mom["members"]] == ["ok", "ok"]
    assert called(fake) == ["tt-a", "tt-b", "tt-judge"]
    for member in ("tt-a", "tt-b"):
        assert as_sent(sent(fake, member)["messages"]) == as_sent(LOOP) and sent(fake, member)["tools"] == TOOLS
    block = panel_text(sent(fake, "tt-judge"))
    assert "A: 18 C and sunny" in block and "B: 18 C and sunny" in block


# ---------------------------------------------------------------------------------------------- capabilities


@STREAMS
def test_a_concluding_llm_without_tools_is_passed_over_for_a_capable_fallback(
    tooled: Service, fake: FakeUpstream, stream: bool
) -> None:
    fake.configure({"tt-a": {"tool_calls": [PARIS]}, "tt-judge2": {"tool_calls": [PARIS]}})
    reply = ask(tooled, "tools-fallback", stream=stream, tools=TOOLS)
    assert reply.status == 200, reply.body
    assert reply.tool_calls == [tool_call("get_weather", '{"city":"Paris"}', "call_tt-judge2_1")]
    assert reply.mom["concluding"]["name"] == "tt-judge2"
    assert called(fake) == ["tt-a", "tt-judge2"]  # tt-deaf-judge is never asked
    assert sent(fake, "tt-judge2")["tools"] == TOOLS

    fake.clear_log()  # without tools, the first concluding LLM concludes
    plain = ask(tooled, "tools-fallback", stream=stream)
    assert plain.status == 200 and plain.mom["concluding"]["name"] == "tt-deaf-judge"
    assert called(fake) == ["tt-a", "tt-deaf-judge"]


# --------------------------------------------------------------------------------------------- thinking context


@STREAMS
def test_think_tags_show_each_members_proposal(tooled: Service, fake: FakeUpstream, stream: bool) -> None:
    fake.configure(
        {
            "tt-a": {"tool_calls": [PARIS]},
            "tt-b": {"text": "Maybe Oslo.", "tool_calls": [OSLO]},
            "tt-judge": {"tool_calls": [PARIS]},
        }
    )
    reply = ask(tooled, "tools-think", stream=stream, tools=TOOLS)
    assert reply.status == 200, reply.body
    assert (
        reply.content is not None and reply.content.startswith("<think>\n") and reply.content.endswith("</think>\n\n")
    )
    assert (
        'Model: tt-a\nContent: \nTool calls: [{"name":"get_weather","arguments":{"city":"Paris"}}]\n---\n'
        in reply.content
    )
    assert (
        'Model: tt-b\nContent: Maybe Oslo.\nTool calls: [{"name":"get_weather","arguments":{"city":"Oslo"}}]\n---\n'
        in reply.content
    )
    assert reply.tool_calls == [tool_call("get_weather", '{"city":"Paris"}', "call_tt-judge_1")]
    assert reply.finish_reason == "tool_calls"


@STREAMS
def test_reasoning_content_shows_each_members_proposal(tooled: Service, fake: FakeUpstream, stream: bool) -> None:
    fake.configure({"tt-a": {"tool_calls": [PARIS]}, "tt-b": {"text": "No idea."}, "tt-judge": {"tool_calls": [OSLO]}})
    reply = ask(tooled, "tools-reason", stream=stream, tools=TOOLS)
    assert reply.status == 200, reply.body
    assert reply.reasoning is not None
    assert 'Model: tt-a\nContent: \nTool calls: [{"name":"get_weather","arguments":{"city":"Paris"}}]\n---\n' in (
        reply.reasoning
    )
    assert "Model: tt-b\nContent: No idea.\n---\n" in reply.reasoning
    assert reply.content is None  # the synthesis is tool calls alone
    assert reply.tool_calls == [tool_call("get_weather", '{"city":"Oslo"}', "call_tt-judge_1")]


# --------------------------------------------------------------------------------------- costs and records


def pico(usage: dict[str, Any], price: dict[str, str]) -> int:
    """A call's exact cost in pico-USD: tokens x USD per million."""
    cost = usage["prompt_tokens"] * Decimal(price["input_per_million"]) + usage["completion_tokens"] * Decimal(
        price["output_per_million"]
    )
    return int(cost * 10**6)


def call_rows(service: Service, request_id: str, count: int) -> tuple[dict[str, Any], list[dict[str, Any]]]:
    """The request's row and its calls' rows, once the background writer committed them."""
    with sqlite3.connect(service.workdir / "data" / "mom.db") as db:
        db.row_factory = sqlite3.Row
        wait_until(lambda: db.execute("SELECT 1 FROM mom_requests WHERE id = ?", (request_id,)).fetchone() is not None)
        request = dict(db.execute("SELECT * FROM mom_requests WHERE id = ?", (request_id,)).fetchone())
        rows = [dict(r) for r in db.execute("SELECT * FROM mom_calls WHERE request_id = ? ORDER BY llm", (request_id,))]
    assert len(rows) == count, rows
    return request, rows


TURNS = [
    # (model, conversation, behaviours, turn, the LLMs called)
    ("tools-synth", QUESTION, {"tt-a": {"tool_calls": [PARIS]}, "tt-judge": {"tool_calls": [PARIS]}}, "ensemble"),
    ("tools-vote", QUESTION, {"tt-a": {"tool_calls": [PARIS]}, "tt-b": {"tool_calls": [PARIS]}}, "vote"),
    ("tools-synth", LOOP, {"tt-judge": {"after_tool_text": AFTER_TOOLS}}, "relay"),
]
CALLED = {"ensemble": ["tt-a", "tt-b", "tt-judge", "tt-mute"], "vote": ["tt-a", "tt-b", "tt-c"], "relay": ["tt-judge"]}


@STREAMS
@pytest.mark.parametrize(("model", "conversation", "behaviours", "turn"), TURNS, ids=[t[3] for t in TURNS])
def test_costs_and_usage_records_count_every_call_of_each_turn(
    tooled: Service,
    fake: FakeUpstream,
    stream: bool,
    model: str,
    conversation: list[dict[str, Any]],
    behaviours: dict[str, Any],
    turn: str,
) -> None:
    fake.configure(behaviours)
    reply = ask(tooled, model, conversation, stream=stream, tools=TOOLS)
    assert reply.status == 200, reply.body
    mom = reply.mom
    assert mom["turn"] == turn
    assert called(fake) == CALLED[turn]
    made = [c for c in [*mom["members"], mom["concluding"]] if c["status"] == "ok"]
    assert sorted(c["name"] for c in made) == CALLED[turn]

    # each call's usage is what its provider reported (the fake counts the words it was sent)
    for entry in fake.log():
        report = next(c for c in made if c["name"] == entry["model"])
        assert report["usage"]["prompt_tokens"] == _prompt_word_count(entry["body"])
        assert report["usage_estimated"] is False
    expected = {c["name"]: pico(c["usage"], JUDGE_PRICE if "judge" in c["name"] else MEMBER_PRICE) for c in made}
    usage = reply.body["usage"]
    for key in ("prompt_tokens", "completion_tokens", "total_tokens"):
        assert usage[key] == sum(c["usage"][key] for c in made)
    assert (
        Decimal(repr(mom["cost"]))
        == sum(Decimal(p) for p in expected.values()) / 10**12
        == Decimal(repr(usage["cost"]))
    )

    request, rows = call_rows(tooled, reply.request_id, len(CALLED[turn]))
    assert request["turn"] == turn and request["status"] == "ok"
    assert {r["llm"]: r["cost_pico"] for r in rows} == expected
    assert request["cost_pico"] == sum(expected.values())
    assert request["prompt_tokens"] == usage["prompt_tokens"]
    assert request["completion_tokens"] == usage["completion_tokens"]
    assert {r["llm"]: r["role"] for r in rows} == {n: "concluding" if "judge" in n else "member" for n in CALLED[turn]}


# ----------------------------------------------------------------------------------------------------- cache


@pytest.fixture
def unique(request: pytest.FixtureRequest) -> Iterator[list[dict[str, Any]]]:
    """A question of this test's own, so that no test meets another's cached answers."""
    yield [{"role": "user", "content": f"Weather? ({request.node.nodeid})"}]


@STREAMS
def test_a_tool_call_answer_replays_exactly_from_the_cache(
    tool_cache: Service, fake: FakeUpstream, stream: bool, unique: list[dict[str, Any]]
) -> None:
    fake.configure(
        {
            "tt-a": {"tool_calls": [PARIS]},
            "tt-judge": {
                "text": "Checking.",
                "tool_calls": [PARIS, {"name": "get_time", "arguments": {"city": "Oslo"}}],
            },
        }
    )
    first = ask(tool_cache, "tools-synth", unique, stream=stream, tools=TOOLS)
    assert first.status == 200 and first.mom["cache"] == "miss", first.body
    assert called(fake) == ["tt-a", "tt-b", "tt-judge", "tt-mute"]
    fake.clear_log()

    again = ask(tool_cache, "tools-synth", unique, stream=stream, tools=TOOLS)
    assert again.status == 200 and again.mom["cache"] == "hit", again.body
    assert fake.log() == []
    assert (again.content, again.tool_calls, again.finish_reason) == (first.content, first.tool_calls, "tool_calls")
    assert again.tool_calls is not None and len(again.tool_calls) == 2
    assert again.mom["turn"] == "ensemble"
    assert again.member("tt-a")["tool_calls"] == first.member("tt-a")["tool_calls"]
    if stream:  # the same chunks: text, then each call's head and fragments
        assert again.tool_pieces == first.tool_pieces
        strip = [{**c, "id": None, "created": None} for c in first.chunks[:-1]]
        assert [{**c, "id": None, "created": None} for c in again.chunks[:-1]] == strip


@STREAMS
def test_a_voted_answer_replays_from_the_cache(
    tool_cache: Service, fake: FakeUpstream, stream: bool, unique: list[dict[str, Any]]
) -> None:
    fake.configure({"tt-a": {"tool_calls": [PARIS]}, "tt-b": {"tool_calls": [PARIS]}})
    first = ask(tool_cache, "tools-vote", unique, stream=stream, tools=TOOLS)
    assert first.status == 200 and first.mom["turn"] == "vote", first.body
    fake.clear_log()
    again = ask(tool_cache, "tools-vote", unique, stream=stream, tools=TOOLS)
    assert (again.mom["cache"], again.mom["turn"]) == ("hit", "vote")
    assert again.tool_calls == first.tool_calls == [tool_call("get_weather", '{"city":"Paris"}', "call_tt-a_1")]
    assert fake.log() == []


@STREAMS
def test_a_relay_answer_replays_from_the_cache(
    tool_cache: Service, fake: FakeUpstream, stream: bool, unique: list[dict[str, Any]]
) -> None:
    fake.configure({"tt-judge": {"after_tool_text": AFTER_TOOLS}})
    loop = [*unique, *LOOP[1:]]
    first = ask(tool_cache, "tools-synth", loop, stream=stream, tools=TOOLS)
    assert (first.status, first.mom["turn"], first.content) == (200, "relay", "In Paris: 18 C and sunny."), first.body
    fake.clear_log()
    again = ask(tool_cache, "tools-synth", loop, stream=stream, tools=TOOLS)
    assert (again.mom["cache"], again.mom["turn"], again.content) == ("hit", "relay", first.content)
    assert [m["reason"] for m in again.mom["members"]] == ["relay"] * 3
    assert fake.log() == []


def test_an_answer_not_the_json_asked_for_is_not_stored(
    tool_cache: Service, fake: FakeUpstream, unique: list[dict[str, Any]]
) -> None:
    fake.configure({"tt-judge": {"text": "Sunny, in prose."}})
    for _ in range(2):
        reply = ask(tool_cache, "tools-synth", unique, stream=True, response_format={"type": "json_object"})
        assert (reply.mom["cache"], reply.mom["structured_output"]) == ("miss", "invalid"), reply.body
    assert len(calls_to(fake, "tt-judge")) == 2


@pytest.mark.parametrize(
    "other",
    [
        {"tools": [WEATHER]},
        {"tools": TOOLS, "tool_choice": "required"},
        {"tools": TOOLS, "parallel_tool_calls": False},
        {"tools": TOOLS, "response_format": {"type": "json_object"}},
        {},
    ],
    ids=["other-tools", "other-choice", "no-parallel", "response-format", "no-tools"],
)
def test_the_same_question_with_other_tools_or_format_is_a_miss(
    tool_cache: Service, fake: FakeUpstream, other: dict[str, Any], unique: list[dict[str, Any]]
) -> None:
    fake.configure({"tt-judge": {"text": '{"answer": "sunny"}'}})
    assert ask(tool_cache, "tools-synth", unique, tools=TOOLS).mom["cache"] == "miss"
    assert ask(tool_cache, "tools-synth", unique, tools=TOOLS).mom["cache"] == "hit"
    fake.clear_log()
    reply = ask(tool_cache, "tools-synth", unique, **other)
    assert reply.status == 200, reply.body
    assert reply.mom["cache"] == "miss"
    assert "tt-judge" in called(fake)


# ------------------------------------------------------------------------------------------------ wire format


@STREAMS
@pytest.mark.parametrize("model", ["tools-synth", "tools-vote"], ids=["synthesized", "voted"])
def test_a_streamed_answer_of_tool_calls_alone_has_no_text_as_openais(
    tooled: Service, fake: FakeUpstream, stream: bool, model: str
) -> None:
    """OpenAI streams such an answer as the role with `content: null` and the first call's head, then the rest of
    the calls: no delta carries text (an empty string is text to a client: the SDK's stream helper would give
    `content == ""` where OpenAI's gives None)."""
    fake.configure(
        {"tt-a": {"tool_calls": [PARIS]}, "tt-b": {"tool_calls": [PARIS]}, "tt-judge": {"tool_calls": [PARIS]}}
    )
    reply = ask(tooled, model, stream=stream, tools=TOOLS)
    assert reply.status == 200, reply.body
    assert reply.tool_calls is not None and reply.finish_reason == "tool_calls"
    if not stream:
        assert reply.body["choices"][0]["message"]["content"] is None
        return
    deltas = [c["choices"][0]["delta"] for c in reply.chunks if c["choices"]]
    assert deltas[0]["role"] == "assistant"
    assert [d.get("content") for d in deltas] == [None] * len(deltas), deltas[:2]


def test_only_the_known_fields_of_tools_reach_the_providers(tooled: Service, fake: FakeUpstream) -> None:
    """Nothing a client sends reaches a provider except through the allowlist (docs/security.md): fields of its own
    inside a tool, a tool choice or a response format are accepted and dropped, like those of the body."""
    fake.configure({"tt-judge": {"text": '{"answer": "sunny"}'}})
    tool = {
        "type": "function",
        "function": {**WEATHER["function"], "strict": False, "api_base": "http://attacker.example"},
        "mock_response": "x",
    }
    choice = {"type": "function", "function": {"name": "get_weather", "api_key": "sk-leak"}, "extra": 1}
    form = {
        "type": "json_schema",
        "json_schema": {"name": "answer", "schema": {"type": "object"}, "strict": True, "metadata": {"a": "b"}},
        "custom_llm_provider": "anthropic",
    }
    reply = ask(tooled, "tools-synth", tools=[tool], tool_choice=choice, response_format=form)
    assert reply.status == 200, reply.body
    judge = sent(fake, "tt-judge")
    allowed = {
        "tools": [{"type": "function", "function": {**WEATHER["function"], "strict": False}}],
        "tool_choice": {"type": "function", "function": {"name": "get_weather"}},
        "response_format": {
            "type": "json_schema",
            "json_schema": {"name": "answer", "schema": {"type": "object"}, "strict": True},
        },
    }
    assert {name: judge[name] for name in allowed} == allowed
    assert sent(fake, "tt-a")["tools"] == allowed["tools"]


def test_an_answer_with_logprobs_is_never_served_from_the_cache(
    tool_cache: Service, fake: FakeUpstream, unique: list[dict[str, Any]]
) -> None:
    """A replay has no logprobs to give: such an answer is made afresh each time."""
    fake.configure({"tt-judge": {"text": "Sunny today."}})
    for _ in range(2):
        reply = ask(tool_cache, "tools-synth", unique, logprobs=True)
        assert reply.status == 200 and reply.mom["cache"] == "miss", reply.body
        assert reply.logprobs is not None and [t["token"] for t in reply.logprobs] == ["Sunny ", "today."]
    assert len(calls_to(fake, "tt-judge")) == 2
