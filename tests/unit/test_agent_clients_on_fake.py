"""Agent frameworks against the fake upstream, offline: LangChain's ChatOpenAI and the OpenAI Agents SDK.

They show that the fake and these clients speak the same Chat Completions protocol (tool calls proposed, run by
the client, answered after their results; structured answers); the project's API tests point the same clients
at the service.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from typing import Any

import pydantic
import pytest
from agents import Agent, ModelSettings, OpenAIChatCompletionsModel, Runner, function_tool, set_tracing_disabled
from langchain_core.messages import AIMessage, AIMessageChunk, HumanMessage, ToolMessage
from langchain_openai import ChatOpenAI
from openai import AsyncOpenAI

from tests.fake_upstream import FakeUpstream

WEATHER_CALL = {"name": "get_weather", "arguments": {"city": "Paris"}}
AFTER_TOOLS = "Here is what I found: {tool_results}"


class Person(pydantic.BaseModel):
    name: str
    age: int


class GetWeather(pydantic.BaseModel):
    """Current weather in a city."""

    city: str


@pytest.fixture(scope="module", autouse=True)
def _no_tracing() -> Iterator[None]:
    """The Agents SDK exports traces to OpenAI's platform by default: never from the tests."""
    set_tracing_disabled(True)
    yield
    set_tracing_disabled(False)


def _chat(fake: FakeUpstream, model: str, **options: Any) -> ChatOpenAI:
    return ChatOpenAI(base_url=fake.base_url, api_key="x", model=model, max_retries=0, timeout=10, **options)


# ----- LangChain -----


def test_langchain_invoke(fake: FakeUpstream) -> None:
    fake.configure({"lc": {"text": "Hello, {last_user}!", "prompt_tokens": 9}})
    message = _chat(fake, "lc").invoke("world")
    assert isinstance(message, AIMessage)
    assert message.content == "Hello, world!"
    assert message.response_metadata["finish_reason"] == "stop"
    assert message.usage_metadata is not None
    assert (message.usage_metadata["input_tokens"], message.usage_metadata["output_tokens"]) == (9, 2)
    (entry,) = fake.log()
    assert entry["body"]["messages"] == [{"role": "user", "content": "world"}]
    assert entry["headers"]["authorization"] == "Bearer x"


def test_langchain_bind_tools_returns_tool_calls(fake: FakeUpstream) -> None:
    fake.configure({"lc": {"tool_calls": [WEATHER_CALL, {"name": "GetWeather", "arguments": {"city": "Oslo"}}]}})
    message = _chat(fake, "lc").bind_tools([GetWeather, _get_weather_schema()]).invoke("weather in Paris and Oslo?")
    assert isinstance(message, AIMessage)
    assert message.tool_calls == [
        {"name": "get_weather", "args": {"city": "Paris"}, "id": "call_lc_1", "type": "tool_call"},
        {"name": "GetWeather", "args": {"city": "Oslo"}, "id": "call_lc_2", "type": "tool_call"},
    ]
    assert message.response_metadata["finish_reason"] == "tool_calls"
    (entry,) = fake.log()
    assert entry["tools"] == ["GetWeather", "get_weather"]
    assert entry["tool_choice"] is None


def test_langchain_streams_tool_calls_and_answers_after_the_results(fake: FakeUpstream) -> None:
    fake.configure({"lc": {"tool_calls": [WEATHER_CALL], "after_tool_text": AFTER_TOOLS, "token_delay_ms": 5}})
    # stream_usage: LangChain asks for usage in streams (stream_options.include_usage) only by default on OpenAI's
    # own endpoint, not on another base_url
    llm = _chat(fake, "lc", stream_usage=True).bind_tools([_get_weather_schema()], tool_choice="get_weather")
    question = HumanMessage("weather in Paris?")
    chunks = [chunk for chunk in llm.stream([question]) if isinstance(chunk, AIMessageChunk)]
    proposal = AIMessageChunk(content="")
    for chunk in chunks:
        proposal += chunk
    assert len([c for c in chunks if c.tool_call_chunks]) == 1 + 3  # the head, then 3 fragments of the arguments
    assert proposal.tool_calls == [
        {"name": "get_weather", "args": {"city": "Paris"}, "id": "call_lc_1", "type": "tool_call"}
    ]
    assert proposal.usage_metadata is not None
    assert proposal.usage_metadata["output_tokens"] == 3  # get_weather city Paris

    result = ToolMessage("Sunny, 21 C.", tool_call_id=proposal.tool_calls[0]["id"])
    answer = llm.invoke([question, proposal, result])
    assert answer.content == "Here is what I found: Sunny, 21 C."

    first, second = fake.log()
    assert first["stream"] is True
    assert first["body"]["stream_options"] == {"include_usage": True}
    assert first["tool_choice"] == {"type": "function", "function": {"name": "get_weather"}}
    assert [m["role"] for m in second["body"]["messages"]] == ["user", "assistant", "tool"]
    assert second["body"]["messages"][1]["tool_calls"][0]["function"]["arguments"] == '{"city": "Paris"}'
    assert second["body"]["messages"][2]["tool_call_id"] == "call_lc_1"


def test_langchain_structured_output(fake: FakeUpstream) -> None:
    fake.configure({"lc": {"texts": ['{"name": "Ada", "age": 36}']}})
    assert _chat(fake, "lc").with_structured_output(Person).invoke("who?") == Person(name="Ada", age=36)
    (entry,) = fake.log()
    response_format = entry["body"]["response_format"]  # default method: json_schema, strict
    assert response_format["type"] == "json_schema"
    assert response_format["json_schema"]["name"] == "Person"
    assert response_format["json_schema"]["strict"] is True
    assert entry["headers"]["x-stainless-helper-method"] == "chat.completions.parse"


def test_langchain_structured_output_by_function_calling(fake: FakeUpstream) -> None:
    fake.configure({"lc": {"tool_calls": [{"name": "Person", "arguments": {"name": "Ada", "age": 36}}]}})
    structured = _chat(fake, "lc").with_structured_output(Person, method="function_calling")
    assert structured.invoke("who?") == Person(name="Ada", age=36)
    (entry,) = fake.log()
    assert entry["tools"] == ["Person"]
    assert entry["tool_choice"] == {"type": "function", "function": {"name": "Person"}}
    assert entry["body"]["parallel_tool_calls"] is False


def _get_weather_schema() -> dict[str, Any]:
    return {
        "type": "function",
        "function": {
            "name": "get_weather",
            "description": "Current weather in a city.",
            "parameters": {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]},
        },
    }


# ----- the OpenAI Agents SDK -----


def weather_agent(client: AsyncOpenAI, model: str, tools: list[Any], **options: Any) -> Agent[Any]:
    return Agent(
        name="weather agent",
        instructions="Answer with the weather.",
        tools=tools,
        model=OpenAIChatCompletionsModel(model=model, openai_client=client),
        **options,
    )


async def test_agents_sdk_runs_the_tool_then_answers(fake: FakeUpstream) -> None:
    calls: list[str] = []

    @function_tool
    def get_weather(city: str) -> str:
        """Current weather in a city."""
        calls.append(city)
        return f"Sunny in {city}."

    fake.configure({"agent": {"tool_calls": [WEATHER_CALL], "after_tool_text": AFTER_TOOLS}})
    async with AsyncOpenAI(base_url=fake.base_url, api_key="x", max_retries=0) as client:
        result = await Runner.run(weather_agent(client, "agent", [get_weather]), "What is the weather in Paris?")

    assert calls == ["Paris"]
    assert result.final_output == "Here is what I found: Sunny in Paris."
    first, second = fake.log()
    assert first["tools"] == second["tools"] == ["get_weather"]
    assert [m["role"] for m in first["body"]["messages"]] == ["system", "user"]
    assert [m["role"] for m in second["body"]["messages"]] == ["system", "user", "assistant", "tool"]
    assert second["body"]["messages"][-1]["tool_call_id"] == "call_agent_1"
    assert first["headers"]["user-agent"].startswith("Agents/Python")


async def test_agents_sdk_streamed_with_several_calls_at_once(fake: FakeUpstream) -> None:
    calls: list[str] = []

    @function_tool
    def get_weather(city: str) -> str:
        """Current weather in a city."""
        calls.append(city)
        return f"{city}: sunny."

    several = [WEATHER_CALL, {"name": "get_weather", "arguments": {"city": "Oslo"}}]
    fake.configure({"agent": {"tool_calls": several, "after_tool_text": AFTER_TOOLS, "token_delay_ms": 5}})
    async with AsyncOpenAI(base_url=fake.base_url, api_key="x", max_retries=0) as client:
        agent = weather_agent(client, "agent", [get_weather], model_settings=ModelSettings(include_usage=True))
        result = Runner.run_streamed(agent, "Weather in Paris and Oslo?")
        events = [event.type async for event in result.stream_events()]

    assert sorted(calls) == ["Oslo", "Paris"]
    assert result.final_output == "Here is what I found: Paris: sunny. Oslo: sunny."
    assert "raw_response_event" in events
    first, second = fake.log()
    assert first["stream"] is True
    assert first["body"]["stream_options"] == {"include_usage": True}
    tool_messages = [m for m in second["body"]["messages"] if m["role"] == "tool"]
    assert [m["tool_call_id"] for m in tool_messages] == ["call_agent_1", "call_agent_2"]
    assert result.context_wrapper.usage.output_tokens == 6 + 9  # 2 calls of 3 words, then the 9-word answer


async def test_agents_sdk_structured_output(fake: FakeUpstream) -> None:
    fake.configure({"agent": {"text": json.dumps({"name": "Ada", "age": 36})}})
    async with AsyncOpenAI(base_url=fake.base_url, api_key="x", max_retries=0) as client:
        result = await Runner.run(weather_agent(client, "agent", [], output_type=Person), "Who?")
    assert result.final_output == Person(name="Ada", age=36)
    (entry,) = fake.log()
    assert entry["body"]["response_format"]["type"] == "json_schema"
    assert entry["tools"] is None
