"""OpenAI's Responses API through the live service (docs/responses.md), with the official `openai` SDK and httpx:
create (a string, items), every stream event validated against its schema in OpenAI's document and their order,
the output items, a function-call loop (with previous_response_id, then with the whole input and store false),
parse with a pydantic model, and the upstream side of each (the fake's log). Stored state, ownership and errors are in
test_responses_state.py.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import httpx
import openai
import orjson
import pytest
from pydantic import BaseModel

from tests.api.test_tools import tools_config
from tests.conftest import TOKEN, Service, StartService, panel_config
from tests.fake_upstream import FakeUpstream
from tests.openai_schema import validate

OTHER_TOKEN = "other-token-654321"
WEATHER = {
    "type": "function",
    "name": "get_weather",
    "description": "Current weather in a city.",
    "parameters": {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]},
    "strict": False,
}
PARIS_CALL = {"name": "get_weather", "arguments": {"city": "Paris"}, "id": "call_w1"}
# every stream event's own schema in OpenAI's document, by its type
EVENT_SCHEMAS = {
    "response.created": "ResponseCreatedEvent",
    "response.in_progress": "ResponseInProgressEvent",
    "response.output_item.added": "ResponseOutputItemAddedEvent",
    "response.output_item.done": "ResponseOutputItemDoneEvent",
    "response.content_part.added": "ResponseContentPartAddedEvent",
    "response.content_part.done": "ResponseContentPartDoneEvent",
    "response.output_text.delta": "ResponseTextDeltaEvent",
    "response.output_text.done": "ResponseTextDoneEvent",
    "response.function_call_arguments.delta": "ResponseFunctionCallArgumentsDeltaEvent",
    "response.function_call_arguments.done": "ResponseFunctionCallArgumentsDoneEvent",
    "response.reasoning_summary_part.added": "ResponseReasoningSummaryPartAddedEvent",
    "response.reasoning_summary_part.done": "ResponseReasoningSummaryPartDoneEvent",
    "response.reasoning_summary_text.delta": "ResponseReasoningSummaryTextDeltaEvent",
    "response.reasoning_summary_text.done": "ResponseReasoningSummaryTextDoneEvent",
    "response.completed": "ResponseCompletedEvent",
    "response.incomplete": "ResponseIncompleteEvent",
    "response.failed": "ResponseFailedEvent",
}


def responses_config(fake: FakeUpstream) -> dict[str, Any]:
    """The standard panel's MoM models and test_tools.py's (`tools-*`, over `tt-*` LLMs) in one config."""
    config, tools = panel_config(fake), tools_config(fake)
    for key in ("llm_definitions", "prompt_definitions", "models"):
        config[key] = [*config.get(key, []), *tools[key]]
    return config


@pytest.fixture(scope="module")
def responder(fake_server: FakeUpstream, start_service: StartService) -> Service:
    """The service with two API tokens (two callers)."""
    return start_service(responses_config(fake_server), {"API_TOKEN": f"{TOKEN},{OTHER_TOKEN}"})


def client(service: Service, token: str = TOKEN) -> openai.OpenAI:
    return openai.OpenAI(base_url=service.base_url, api_key=token, max_retries=0)


def stream_events(service: Service, body: dict[str, Any], token: str = TOKEN) -> list[dict[str, Any]]:
    """A streamed response's events, each checked: its `event:` line names its type, it validates against its own
    schema and ResponseStreamEvent, and the sequence numbers run 0, 1, 2..."""
    headers = {"Authorization": f"Bearer {token}"}
    with httpx.stream("POST", f"{service.base_url}/responses", headers=headers, json=body, timeout=30) as response:
        assert response.status_code == 200, response.read()
        assert response.headers["content-type"].startswith("text/event-stream")
        frames = [f for f in "".join(response.iter_text()).split("\n\n") if f.strip()]
    events = []
    for frame in frames:
        event_line, data_line = frame.split("\n")
        event = orjson.loads(data_line.removeprefix("data: "))
        assert event_line == f"event: {event['type']}"
        validate(event, EVENT_SCHEMAS[event["type"]])
        validate(event, "ResponseStreamEvent")
        events.append(event)
    assert [e["sequence_number"] for e in events] == list(range(len(events)))
    return events


def requests_to(fake: FakeUpstream, name: str) -> list[dict[str, Any]]:
    return [e["body"] for e in fake.log() if e["model"] == name]


def as_dict(response: Any) -> dict[str, Any]:
    body: dict[str, Any] = response.model_dump(mode="json", exclude_none=False)
    return body


# ------------------------------------------------------------------------------------------------- create


def test_create_with_a_string_input(responder: Service, fake: FakeUpstream) -> None:
    response = client(responder).responses.create(
        model="mom-think", input="What is MoM?", metadata={"ticket": "42"}, temperature=0.3
    )
    raw = httpx.get(f"{responder.base_url}/responses/{response.id}", headers=responder.headers()).json()
    validate(raw, "Response")
    assert response.id.startswith("resp_") and response.object == "response" and response.status == "completed"
    assert response.model == "mom-think" and response.metadata == {"ticket": "42"} and response.temperature == 0.3
    reasoning, message = response.output
    assert reasoning.type == "reasoning" and reasoning.id.startswith("rs_")
    summary = reasoning.summary[0].text
    assert all(f"Model: {name}\nContent: Answer from {name}." in summary for name in ("alpha", "beta", "gamma"))
    assert message.type == "message" and message.id.startswith("msg_") and message.status == "completed"
    assert response.output_text == "Answer from judge."
    usage = raw["usage"]
    assert usage["total_tokens"] == usage["input_tokens"] + usage["output_tokens"] > 0
    assert usage["cost"] == raw["mom"]["cost"] and raw["mom"]["answered"] == 3
    for name in ("alpha", "beta", "gamma", "judge"):
        (sent,) = requests_to(fake, name)
        assert sent["temperature"] == 0.3
        assert {"role": "user", "content": "What is MoM?"} in sent["messages"]


def test_create_with_items_and_instructions(responder: Service, fake: FakeUpstream) -> None:
    image = (
        "data:image/png;base64,"
        "iVBORw0KGgoAAAANSUhEUgAAAAEAAAABCAYAAAAfFcSJAAAADUlEQVR42mP8z8BQDwAEhQGAhKmMIQAAAABJRU5ErkJggg=="
    )
    items: list[Any] = [
        {"role": "developer", "content": "Answer in French."},
        {"type": "message", "role": "user", "content": [{"type": "input_text", "text": "Bonjour"}]},
        {"type": "reasoning", "id": "rs_old", "summary": [{"type": "summary_text", "text": "earlier thoughts"}]},
        {"role": "assistant", "content": [{"type": "output_text", "text": "Salut !", "annotations": []}]},
        {
            "role": "user",
            "content": [{"type": "input_text", "text": "Et ça ?"}, {"type": "input_image", "image_url": image}],
        },
    ]
    response = client(responder).responses.create(
        model="mom-vision-judge", input=items, instructions="Be brief.", max_output_tokens=64
    )
    assert response.output_text == "Answer from seer." and response.instructions == "Be brief."
    assert [item.type for item in response.output] == ["message"]  # thinking context off: no reasoning item
    (concluding,) = requests_to(fake, "seer")
    assert concluding["max_tokens"] == 64
    conversation = concluding["messages"][1:-1]  # between the concluding prompt and the panel's answers
    assert conversation == [
        {"role": "system", "content": "Be brief."},
        {"role": "system", "content": "Answer in French."},  # (developer, as this provider takes it)
        {"role": "user", "content": "Bonjour"},  # (text parts alone: flattened for this provider)
        {"role": "assistant", "content": "Salut !"},
        {
            "role": "user",
            "content": [{"type": "text", "text": "Et ça ?"}, {"type": "image_url", "image_url": {"url": image}}],
        },
    ]
    (member,) = requests_to(fake, "alpha")
    assert "max_tokens" not in member  # the answer's length is the concluding call's business


# ------------------------------------------------------------------------------------------------- stream

TEXT_ORDER = [
    "response.output_item.added",
    "response.content_part.added",
    "response.output_text.delta",
    "response.output_text.delta",
    "response.output_text.delta",
    "response.output_text.done",
    "response.content_part.done",
    "response.output_item.done",
]
REASONING_ORDER = [
    "response.output_item.added",
    "response.reasoning_summary_part.added",
    "response.reasoning_summary_text.delta",
    "response.reasoning_summary_text.delta",
    "response.reasoning_summary_text.delta",
    "response.reasoning_summary_text.done",
    "response.reasoning_summary_part.done",
    "response.output_item.done",
]


def test_stream_sends_every_event_in_order(responder: Service, fake: FakeUpstream) -> None:
    events = stream_events(responder, {"model": "mom-think", "input": "Stream it.", "stream": True})
    types = [e["type"] for e in events]
    assert types == ["response.created", "response.in_progress", *REASONING_ORDER, *TEXT_ORDER, "response.completed"]
    created, completed = events[0]["response"], events[-1]["response"]
    assert created["status"] == "in_progress" and created["output"] == [] and "usage" not in created
    assert completed["id"] == created["id"] and completed["status"] == "completed"
    reasoning, message = completed["output"]
    assert events[2]["item"]["id"] == reasoning["id"] and events[10]["item"]["id"] == message["id"]
    deltas = [e["delta"] for e in events if e["type"] == "response.output_text.delta"]
    assert "".join(deltas) == message["content"][0]["text"] == "Answer from judge."
    assert {e["item_id"] for e in events if "item_id" in e} == {reasoning["id"], message["id"]}
    blocks = [e["delta"] for e in events if e["type"] == "response.reasoning_summary_text.delta"]
    assert "".join(blocks) == reasoning["summary"][0]["text"]
    stored = httpx.get(f"{responder.base_url}/responses/{created['id']}", headers=responder.headers()).json()
    assert stored["output"] == completed["output"] and stored["usage"] == completed["usage"]


def test_stream_of_function_calls(responder: Service, fake: FakeUpstream) -> None:
    fake.configure({"tt-judge": {"text": "Let me look.", "tool_calls": [PARIS_CALL]}})
    body = {"model": "tools-synth", "input": "Weather in Paris?", "tools": [WEATHER], "stream": True}
    events = stream_events(responder, body)
    types = [e["type"] for e in events]
    call_order = ["response.output_item.added"]
    call_order += ["response.function_call_arguments.delta"] * types.count("response.function_call_arguments.delta")
    call_order += ["response.function_call_arguments.done", "response.output_item.done"]
    text_order = [t for t in TEXT_ORDER if t != "response.output_text.delta"]
    text_order[2:2] = ["response.output_text.delta"] * types.count("response.output_text.delta")
    assert types == ["response.created", "response.in_progress", *text_order, *call_order, "response.completed"]
    message, call = events[-1]["response"]["output"]
    assert message["content"][0]["text"] == "Let me look."
    assert call["type"] == "function_call" and call["call_id"] == "call_w1" and call["name"] == "get_weather"
    assert orjson.loads(call["arguments"]) == {"city": "Paris"}
    added = next(e for e in events if e["type"] == "response.output_item.added" and e["output_index"] == 1)
    assert added["item"]["arguments"] == "" and added["item"]["status"] == "in_progress"


def test_the_sdk_stream_helper(responder: Service, fake: FakeUpstream) -> None:
    with client(responder).responses.stream(model="mom", input="Stream with the SDK.") as stream:
        texts = [e.delta for e in stream if e.type == "response.output_text.delta"]
        final = stream.get_final_response()
    assert "".join(texts) == final.output_text == "Answer from judge."


# -------------------------------------------------------------------------------------- function-call loop


def test_function_call_loop_with_previous_response_id_then_whole_input(responder: Service, fake: FakeUpstream) -> None:
    fake.configure({"tt-judge": {"tool_calls": [PARIS_CALL], "after_tool_text": "In Paris: {tool_results}."}})
    sdk = client(responder)
    first = sdk.responses.create(model="tools-synth", input="Weather in Paris?", tools=[WEATHER])
    validate(httpx.get(f"{responder.base_url}/responses/{first.id}", headers=responder.headers()).json(), "Response")
    (call,) = first.output
    assert call.type == "function_call" and call.call_id == "call_w1" and call.id.startswith("fc_")
    assert call.name == "get_weather" and orjson.loads(call.arguments) == {"city": "Paris"}

    result = {"type": "function_call_output", "call_id": call.call_id, "output": "18 C and sunny"}
    fake.clear_log()
    second = sdk.responses.create(model="tools-synth", previous_response_id=first.id, input=[result], tools=[WEATHER])
    assert second.output_text == "In Paris: 18 C and sunny." and second.previous_response_id == first.id
    (relayed,) = requests_to(fake, "tt-judge")  # the loop's next step goes to the concluding LLM alone
    expected = [
        {"role": "user", "content": "Weather in Paris?"},
        {
            "role": "assistant",
            "tool_calls": [
                {
                    "id": "call_w1",
                    "type": "function",
                    "function": {"name": "get_weather", "arguments": '{"city":"Paris"}'},
                }
            ],
        },
        {"role": "tool", "tool_call_id": "call_w1", "content": "18 C and sunny"},
    ]
    conversation = [m for m in relayed["messages"] if m["role"] != "system"]
    assert [{k: v for k, v in m.items() if v is not None} for m in conversation] == expected

    # the same loop without stored state: the whole input sent back, nothing kept
    fake.clear_log()
    items = [{"role": "user", "content": "Weather in Paris?"}, *[as_dict(i) for i in first.output], result]
    third = sdk.responses.create(model="tools-synth", input=items, tools=[WEATHER], store=False)
    assert third.output_text == "In Paris: 18 C and sunny." and third.store is False
    (relayed_again,) = requests_to(fake, "tt-judge")
    assert relayed_again["messages"] == relayed["messages"]
    with pytest.raises(openai.NotFoundError):
        sdk.responses.retrieve(third.id)


class Weather(BaseModel):
    city: str
    celsius: int


def test_parse_with_a_pydantic_model(responder: Service, fake: FakeUpstream) -> None:
    fake.configure({"tt-judge": {"text": '{"city": "Paris", "celsius": 18}'}})
    parsed = client(responder).responses.parse(model="tools-synth", input="Weather in Paris?", text_format=Weather)
    assert parsed.output_parsed == Weather(city="Paris", celsius=18)
    (concluding,) = requests_to(fake, "tt-judge")
    form = concluding["response_format"]
    assert form["type"] == "json_schema" and form["json_schema"]["name"] == "Weather"
    assert form["json_schema"]["schema"]["required"] == ["city", "celsius"] and form["json_schema"]["strict"] is True
    assert parsed.text.format.type == "json_schema"


def frames(response: httpx.Response) -> Iterator[dict[str, Any]]:
    for frame in response.text.split("\n\n"):
        if frame.strip():
            yield orjson.loads(frame.split("\n")[1].removeprefix("data: "))


# ------------------------------------------------------------------------- what Codex sends (tests/agents)

EXEC_COMMAND = {
    "type": "function",
    "name": "exec_command",
    "description": "Runs a command in a PTY.",
    "strict": False,
    "parameters": {"type": "object", "properties": {"cmd": {"type": "string"}}, "required": ["cmd"]},
}
MCP_SERVER = {  # how Codex 0.171 sends an MCP server's tools (and its own, in the TUI: `mcp__codex_tui`)
    "type": "namespace",
    "name": "mcp__marker",
    "description": "Tools in the mcp__marker namespace.",
    "tools": [
        {
            "type": "function",
            "name": "write_marker",
            "description": "Write the marker file.",
            "strict": False,
            "parameters": {"type": "object", "properties": {"text": {"type": "string"}}, "required": ["text"]},
        }
    ],
}
MARKER_CALL = {"name": "mcp__marker__write_marker", "arguments": {"text": "ran"}, "id": "call_m1"}


def codex_body(items: list[dict[str, Any]], tools: list[dict[str, Any]]) -> dict[str, Any]:
    """A request shaped as Codex 0.171.0 (`codex exec`) sends it: developer messages, ids on every item, no
    instructions, the whole conversation each turn with store false, its own fields beside OpenAI's."""
    prompt = [
        {"type": "message", "id": "msg_1", "role": "developer", "content": [{"type": "input_text", "text": "Codex."}]},
        {"type": "message", "id": "msg_2", "role": "user", "content": [{"type": "input_text", "text": "Write it."}]},
    ]
    return {
        "model": "tools-synth",
        "input": [*prompt, *items],
        "tools": tools,
        "tool_choice": "auto",
        "parallel_tool_calls": True,
        "reasoning": {"summary": "auto"},
        "store": False,
        "stream": True,
        "include": ["reasoning.encrypted_content"],
        "prompt_cache_key": "0b1d-session",
        "client_metadata": {"session_id": "0b1d-session", "x-codex-turn-metadata": "{}"},
    }


def test_codexs_request_and_a_namespace_tools_call(responder: Service, fake: FakeUpstream) -> None:
    """A namespace's functions reach the LLMs as `<namespace>__<name>`; a call of one is answered as OpenAI answers
    it (`namespace`, `name`), and comes back so in the next turn, its output as content parts."""
    fake.configure({"tt-judge": {"tool_calls": [MARKER_CALL], "after_tool_text": "Done: {tool_results}"}})
    events = stream_events(responder, codex_body([], [EXEC_COMMAND, MCP_SERVER]))
    assert events[-1]["type"] == "response.completed"
    (call,) = events[-1]["response"]["output"]
    assert (call["type"], call["namespace"], call["name"], call["call_id"]) == (
        "function_call",
        "mcp__marker",
        "write_marker",
        "call_m1",
    )
    done = next(e for e in events if e["type"] == "response.output_item.done")
    assert done["item"] == call  # Codex reads the call from here
    added = next(e for e in events if e["type"] == "response.output_item.added")
    assert (added["item"]["namespace"], added["item"]["name"]) == ("mcp__marker", "write_marker")
    arguments = next(e for e in events if e["type"] == "response.function_call_arguments.done")
    assert arguments["name"] == "write_marker"
    assert events[-1]["response"]["tools"][1] == MCP_SERVER  # echoed as sent
    (judge,) = requests_to(fake, "tt-judge")
    assert [tool["function"]["name"] for tool in judge["tools"]] == ["exec_command", "mcp__marker__write_marker"]
    assert judge["tools"][1]["function"]["parameters"] == MCP_SERVER["tools"][0]["parameters"]
    assert [m["content"] for m in judge["messages"] if m["role"] in ("developer", "system")][-1] == "Codex."

    # the next turn: the whole conversation again, the call with its namespace and id, the output as parts
    fake.clear_log()
    sent_back = {k: call[k] for k in ("id", "type", "status", "call_id", "name", "namespace", "arguments")}
    output = [{"type": "input_text", "text": "Output:"}, {"type": "input_text", "text": "wrote ran"}]
    result = {"type": "function_call_output", "id": "fco_1", "call_id": "call_m1", "output": output}
    events = stream_events(responder, codex_body([sent_back, result], [EXEC_COMMAND, MCP_SERVER]))
    assert events[-1]["response"]["output"][0]["content"][0]["text"] == "Done: Output:wrote ran"
    (relayed,) = requests_to(fake, "tt-judge")
    assert relayed["messages"][-2]["tool_calls"] == [
        {
            "id": "call_m1",
            "type": "function",
            "function": {"name": "mcp__marker__write_marker", "arguments": '{"text":"ran"}'},
        }
    ]
    assert relayed["messages"][-1] == {"role": "tool", "tool_call_id": "call_m1", "content": "Output:wrote ran"}


@pytest.mark.parametrize(
    ("tools", "param", "kind"),
    [
        ([{"type": "web_search", "external_web_access": True}], "tools[0].type", "web_search"),
        ([EXEC_COMMAND, {"type": "custom", "name": "apply_patch"}], "tools[1].type", "custom"),
        ([{**MCP_SERVER, "tools": [{"type": "custom", "name": "x"}]}], "tools[0].tools[0].type", "custom"),
        ([{"type": "tool_search", "execution": "client"}], "tools[0].type", "tool_search"),
    ],
    ids=["web_search", "custom", "custom-in-namespace", "tool_search"],
)
def test_codexs_other_tool_types_are_refused_naming_them(
    responder: Service, fake: FakeUpstream, tools: list[dict[str, Any]], param: str, kind: str
) -> None:
    with pytest.raises(openai.BadRequestError) as refused:
        client(responder).responses.create(model="tools-synth", input="Hi", tools=tools)  # type: ignore[arg-type]
    error = refused.value.body
    assert isinstance(error, dict)
    assert (error["param"], error["code"]) == (param, "unsupported_tool_type")
    assert error["message"].startswith(f"The tool type '{kind}' is not supported")
    assert fake.log() == []
