"""Real agent clients against the live service: the `openai` SDK running a tool loop (streamed with its stream
helpers, and not), LangChain's ChatOpenAI with bound tools and structured output, and the OpenAI Agents SDK running
an agent whose function tool the panel proposes. Each step's upstream calls are counted from the fake's log: the
first step asks the panel, the step after the tool results is one call (the relay turn). The LLMs are this
module's own (`ag-*`)."""

from __future__ import annotations

import json
from collections.abc import Iterator
from typing import Any

import pytest
from agents import ModelSettings, Runner, function_tool, set_tracing_disabled
from langchain_core.messages import AIMessage, AIMessageChunk, HumanMessage, ToolMessage
from langchain_openai import ChatOpenAI
from openai import AsyncOpenAI, OpenAI

from tests.api.test_structured_output import Person
from tests.api.test_tools import WEATHER
from tests.conftest import TOKEN, CallPath, Service, StartService, llm
from tests.fake_upstream import FakeUpstream
from tests.unit.test_agent_clients_on_fake import weather_agent

MEMBERS = ["ag-a", "ag-b", "ag-c"]
JUDGE = "ag-judge"
PARIS = {"name": "get_weather", "arguments": {"city": "Paris"}}
AFTER_TOOLS = "Here is what I found: {tool_results}"
QUESTION = "What is the weather in Paris?"
ADA = {"name": "Ada", "age": 36}


@pytest.fixture(scope="module")
def agents_service(fake_server: FakeUpstream, start_service: StartService, call_path: CallPath) -> Service:
    config = {
        "llm_definitions": [llm(name, fake_server, retries=0) for name in [*MEMBERS, JUDGE]],
        "models": [
            {"name": "agents-synth", "llms_to_query": MEMBERS, "concluding_llm": JUDGE},
            {
                "name": "agents-vote",
                "llms_to_query": MEMBERS,
                "concluding_llm": JUDGE,
                "tools": {"strategy": "vote", "vote_threshold": 2},
            },
        ],
    }
    return start_service(config, call_path.env)


@pytest.fixture(scope="module", autouse=True)
def _no_tracing() -> Iterator[None]:
    """The Agents SDK exports traces to OpenAI's platform by default: never from the tests."""
    set_tracing_disabled(True)
    yield
    set_tracing_disabled(False)


def panel_proposes(fake: FakeUpstream, *, judge_calls: bool = True) -> None:
    """Every member proposes get_weather(Paris) (ag-c in words); the concluding LLM calls it too, and answers with
    the results once they come back."""
    judge: dict[str, Any] = {"after_tool_text": AFTER_TOOLS}
    if judge_calls:
        judge["tool_calls"] = [PARIS]
    fake.configure(
        {
            "ag-a": {"tool_calls": [PARIS]},
            "ag-b": {"tool_calls": [PARIS]},
            "ag-c": {"text": "Call get_weather for Paris."},
            JUDGE: judge,
        }
    )


def models_called(fake: FakeUpstream, since: int = 0) -> list[str]:
    return sorted(e["model"] for e in fake.log()[since:])


def get_weather(city: str) -> str:
    return f"Sunny, 18 C in {city}."


# ------------------------------------------------------------------------------------------------ openai SDK


def test_openai_sdk_runs_a_tool_loop(agents_service: Service, fake: FakeUpstream) -> None:
    panel_proposes(fake)
    client = OpenAI(base_url=agents_service.base_url, api_key=TOKEN, max_retries=0)
    messages: list[Any] = [{"role": "user", "content": QUESTION}]
    first = client.chat.completions.create(model="agents-synth", messages=messages, tools=[WEATHER])  # type: ignore[list-item]
    message = first.choices[0].message
    assert first.choices[0].finish_reason == "tool_calls"
    assert message.content is None and message.tool_calls is not None
    (call,) = message.tool_calls
    assert call.type == "function" and call.function.name == "get_weather"
    assert models_called(fake) == ["ag-a", "ag-b", "ag-c", JUDGE]
    step_one = len(fake.log())

    messages.append(message)  # as the SDK's own examples do: the message object itself
    result = get_weather(**json.loads(call.function.arguments))
    messages.append({"role": "tool", "tool_call_id": call.id, "content": result})
    second = client.chat.completions.create(model="agents-synth", messages=messages, tools=[WEATHER])  # type: ignore[list-item]
    assert second.choices[0].message.content == "Here is what I found: Sunny, 18 C in Paris."
    assert second.choices[0].finish_reason == "stop"
    assert second.model_extra is not None and second.model_extra["mom"]["turn"] == "relay"

    (relay,) = fake.log()[step_one:]  # the second step is one call
    assert relay["model"] == JUDGE
    assert [m["role"] for m in relay["body"]["messages"]] == ["user", "assistant", "tool"]
    assert relay["body"]["messages"][1]["tool_calls"][0]["id"] == call.id
    assert relay["body"]["messages"][2] == {"role": "tool", "tool_call_id": call.id, "content": result}


def test_openai_sdk_stream_helpers_run_a_tool_loop(agents_service: Service, fake: FakeUpstream) -> None:
    panel_proposes(fake)
    client = OpenAI(base_url=agents_service.base_url, api_key=TOKEN, max_retries=0)
    messages: list[Any] = [{"role": "user", "content": QUESTION}]
    with client.chat.completions.stream(model="agents-synth", messages=messages, tools=[WEATHER]) as stream:  # type: ignore[list-item]
        events = [event.type for event in stream]
        first = stream.get_final_completion()
    assert "tool_calls.function.arguments.delta" in events and "tool_calls.function.arguments.done" in events
    choice = first.choices[0]
    assert choice.finish_reason == "tool_calls"
    assert choice.message.tool_calls is not None
    (call,) = choice.message.tool_calls
    assert (call.id, call.function.name, json.loads(call.function.arguments)) == (
        f"call_{JUDGE}_1",
        "get_weather",
        {"city": "Paris"},
    )
    step_one = len(fake.log())
    assert models_called(fake) == ["ag-a", "ag-b", "ag-c", JUDGE]

    messages.append({"role": "assistant", "tool_calls": [call.model_dump(include={"id", "type", "function"})]})
    messages.append({"role": "tool", "tool_call_id": call.id, "content": get_weather("Paris")})
    with client.chat.completions.stream(model="agents-synth", messages=messages, tools=[WEATHER]) as stream:  # type: ignore[list-item]
        text = "".join(event.delta for event in stream if event.type == "content.delta")
        second = stream.get_final_completion()
    assert text == second.choices[0].message.content == "Here is what I found: Sunny, 18 C in Paris."
    assert models_called(fake, step_one) == [JUDGE]


def test_the_sdk_stream_helper_gives_no_content_for_tool_calls_alone(
    agents_service: Service, fake: FakeUpstream
) -> None:
    """As with OpenAI's own streams: a streamed answer of tool calls alone has no text (`content` None)."""
    panel_proposes(fake)
    client = OpenAI(base_url=agents_service.base_url, api_key=TOKEN, max_retries=0)
    messages: list[Any] = [{"role": "user", "content": QUESTION}]
    with client.chat.completions.stream(model="agents-synth", messages=messages, tools=[WEATHER]) as stream:  # type: ignore[list-item]
        completion = stream.get_final_completion()
    assert completion.choices[0].message.tool_calls
    assert completion.choices[0].message.content is None


# ------------------------------------------------------------------------------------------------- LangChain


def _chat(service: Service, model: str, **options: Any) -> ChatOpenAI:
    return ChatOpenAI(base_url=service.base_url, api_key=TOKEN, model=model, max_retries=0, timeout=30, **options)  # type: ignore[arg-type]


@pytest.mark.parametrize("stream", [False, True], ids=["invoke", "stream"])
def test_langchain_bind_tools_runs_a_tool_loop(agents_service: Service, fake: FakeUpstream, stream: bool) -> None:
    panel_proposes(fake)
    bound = _chat(agents_service, "agents-synth", stream_usage=True).bind_tools([WEATHER])
    question = HumanMessage(QUESTION)
    if stream:
        proposal = AIMessageChunk(content="")
        for chunk in bound.stream([question]):
            assert isinstance(chunk, AIMessageChunk)
            proposal += chunk
        message: AIMessage = proposal
    else:
        invoked = bound.invoke([question])
        assert isinstance(invoked, AIMessage)
        message = invoked
    assert message.tool_calls == [
        {"name": "get_weather", "args": {"city": "Paris"}, "id": f"call_{JUDGE}_1", "type": "tool_call"}
    ]
    assert message.response_metadata["finish_reason"] == "tool_calls"
    assert models_called(fake) == ["ag-a", "ag-b", "ag-c", JUDGE]
    step_one = len(fake.log())

    result = ToolMessage(get_weather("Paris"), tool_call_id=message.tool_calls[0]["id"])
    answer = bound.invoke([question, message, result])
    assert answer.content == "Here is what I found: Sunny, 18 C in Paris."
    (relay,) = fake.log()[step_one:]
    assert relay["model"] == JUDGE
    assert [m["role"] for m in relay["body"]["messages"]] == ["user", "assistant", "tool"]


def test_langchain_structured_output_by_function_calling(agents_service: Service, fake: FakeUpstream) -> None:
    fake.configure({"ag-a": {"text": "Ada, 36."}, JUDGE: {"tool_calls": [{"name": "Person", "arguments": ADA}]}})
    structured = _chat(agents_service, "agents-synth").with_structured_output(Person, method="function_calling")
    assert structured.invoke("Who?") == Person(name="Ada", age=36)
    judge = next(e for e in fake.log() if e["model"] == JUDGE)
    assert judge["tools"] == ["Person"]
    assert judge["tool_choice"] == {"type": "function", "function": {"name": "Person"}}
    assert judge["body"]["parallel_tool_calls"] is False
    for member in (e for e in fake.log() if e["model"] in MEMBERS):  # they propose freely
        assert (member["tools"], member["tool_choice"]) == (["Person"], "auto")
        assert "parallel_tool_calls" not in member["body"]


def test_langchain_structured_output(agents_service: Service, fake: FakeUpstream) -> None:
    fake.configure({JUDGE: {"text": '{"name": "Ada", "age": 36}'}})
    assert _chat(agents_service, "agents-synth").with_structured_output(Person).invoke("Who?") == Person(
        name="Ada", age=36
    )
    judge = next(e for e in fake.log() if e["model"] == JUDGE)
    form = judge["body"]["response_format"]
    assert (form["type"], form["json_schema"]["name"], form["json_schema"]["strict"]) == ("json_schema", "Person", True)
    assert all("response_format" not in e["body"] for e in fake.log() if e["model"] in MEMBERS)


# ------------------------------------------------------------------------------------------ OpenAI Agents SDK


async def test_agents_sdk_runs_the_tool_the_panel_voted_for(agents_service: Service, fake: FakeUpstream) -> None:
    ran: list[str] = []

    @function_tool(name_override="get_weather")
    def get_weather_tool(city: str) -> str:
        """Current weather in a city."""
        ran.append(city)
        return get_weather(city)

    panel_proposes(fake, judge_calls=False)  # two members agree: their call is the answer, no concluding call
    async with AsyncOpenAI(base_url=agents_service.base_url, api_key=TOKEN, max_retries=0) as client:
        result = await Runner.run(weather_agent(client, "agents-vote", [get_weather_tool]), QUESTION)

    assert ran == ["Paris"]
    assert result.final_output == "Here is what I found: Sunny, 18 C in Paris."
    log = fake.log()
    first_step = [e for e in log if e["model"] in MEMBERS]
    assert sorted(e["model"] for e in first_step) == MEMBERS
    assert all(e["tools"] == ["get_weather"] for e in first_step)
    (relay,) = [e for e in log if e["model"] == JUDGE]  # the second step: one call
    assert len(log) == 4
    assert [m["role"] for m in relay["body"]["messages"]] == ["system", "user", "assistant", "tool"]
    assert relay["body"]["messages"][-1]["tool_call_id"] == "call_ag-a_1"
    assert relay["tools"] == ["get_weather"]


async def test_agents_sdk_streamed_run_on_a_synthesizing_model(agents_service: Service, fake: FakeUpstream) -> None:
    ran: list[str] = []

    @function_tool(name_override="get_weather")
    def get_weather_tool(city: str) -> str:
        """Current weather in a city."""
        ran.append(city)
        return get_weather(city)

    fake.configure(
        {
            "ag-a": {"tool_calls": [PARIS]},
            JUDGE: {"tool_calls": [PARIS], "after_tool_text": AFTER_TOOLS},
        }
    )
    async with AsyncOpenAI(base_url=agents_service.base_url, api_key=TOKEN, max_retries=0) as client:
        agent = weather_agent(
            client, "agents-synth", [get_weather_tool], model_settings=ModelSettings(include_usage=True)
        )
        result = Runner.run_streamed(agent, QUESTION)
        events = [event.type async for event in result.stream_events()]

    assert ran == ["Paris"]
    assert result.final_output == "Here is what I found: Sunny, 18 C in Paris."
    assert "run_item_stream_event" in events
    log = fake.log()
    assert sorted(e["model"] for e in log) == [*MEMBERS, JUDGE, JUDGE]
    relay = log[-1]
    assert relay["model"] == JUDGE and relay["stream"] is True
    assert [m["role"] for m in relay["body"]["messages"]] == ["system", "user", "assistant", "tool"]
    assert result.context_wrapper.usage.requests == 2
