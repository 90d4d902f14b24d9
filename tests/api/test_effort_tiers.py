"""Effort tiers (issue 17): each surface's reasoning effort (Chat Completions' `reasoning_effort`, Responses'
`reasoning.effort`, Messages' `thinking.budget_tokens`) picks a tier of the MoM model; the fake upstream's log shows
who was asked and the `reasoning_effort` each call carried. Both call paths (lean and LiteLLM)."""

from __future__ import annotations

from typing import Any

import anthropic
import httpx
import openai
import pytest

from tests.conftest import TOKEN, CallPath, Service, StartService, llm
from tests.fake_upstream import FakeUpstream

REASONING = {"reasoning": True}  # the fake's models are unknown to LiteLLM: the config says they take an effort
MEMBERS = ["r1", "r2", "r3"]
TIERS = {
    "low": {"llms_to_query": ["r1"], "concluding_llm": "judge-small", "effort": "minimal", "concluding_effort": "none"},
    "medium": {"llms_to_query": ["r1", "r2"]},  # the model's concluding LLM; both efforts: the client's level
    "high": {"llms_to_query": [*MEMBERS, "plain"], "effort": "high", "concluding_effort": "xhigh"},
}


@pytest.fixture(scope="module")
def tiered(fake_server: FakeUpstream, start_service: StartService, call_path: CallPath) -> Service:
    config: dict[str, Any] = {
        "llm_definitions": [
            *(llm(name, fake_server, capabilities=REASONING) for name in [*MEMBERS, "judge", "judge-small"]),
            llm("plain", fake_server),  # says nothing: unknown to LiteLLM, so it takes no reasoning effort
        ],
        "models": [
            {"name": "tiered", "llms_to_query": ["r1", "r2", "plain"], "concluding_llm": "judge", "tiers": TIERS},
            {
                "name": "two-tiers",
                "llms_to_query": MEMBERS,
                "concluding_llm": "judge",
                "tiers": {"low": {"llms_to_query": ["r1"]}, "high": {"effort": "high"}},
            },
            {"name": "untiered", "llms_to_query": ["r1", "plain"], "concluding_llm": "judge"},
        ],
    }
    return start_service(config, call_path.env)


def asked(fake: FakeUpstream) -> dict[str, str | None]:
    """Who the fake was asked, each with the `reasoning_effort` its call carried (None: not sent)."""
    return {entry["model"]: entry["body"].get("reasoning_effort") for entry in fake.log()}


def openai_client(service: Service) -> openai.OpenAI:
    return openai.OpenAI(base_url=service.base_url, api_key=TOKEN, max_retries=0)


def chat(service: Service, model: str, effort: Any) -> dict[str, Any]:
    completion = openai_client(service).chat.completions.create(
        model=model, messages=[{"role": "user", "content": "How hard is this?"}], reasoning_effort=effort
    )
    assert completion.choices[0].message.content
    extra = completion.model_extra or {}
    mom: dict[str, Any] = extra["mom"]
    return mom


@pytest.mark.parametrize(
    ("effort", "expected"),
    [
        ("low", {"r1": "minimal", "judge-small": None}),  # the tier's level; `none` for the concluding call
        ("medium", {"r1": "medium", "r2": "medium", "judge": "medium"}),  # `client`: the request's own level
        # a fixed level each; `plain` takes no reasoning effort, so it gets none
        ("high", {"r1": "high", "r2": "high", "r3": "high", "plain": None, "judge": "xhigh"}),
    ],
)
def test_chat_reasoning_effort_picks_the_tier(
    tiered: Service, fake: FakeUpstream, effort: str, expected: dict[str, str | None]
) -> None:
    mom = chat(tiered, "tiered", effort)
    assert asked(fake) == expected
    assert mom["tier"] == effort
    assert sorted(m["name"] for m in mom["members"]) == sorted(n for n in expected if not n.startswith("judge"))
    assert mom["concluding"]["name"] == ("judge-small" if effort == "low" else "judge")


@pytest.mark.parametrize(
    ("model", "effort", "tier", "expected"),
    [
        ("tiered", "minimal", "low", {"r1": "minimal", "judge-small": None}),
        ("tiered", "xhigh", "high", {"r1": "high", "r2": "high", "r3": "high", "plain": None, "judge": "xhigh"}),
        # as near to low as to high: the lower tier; its efforts are the client's own level
        ("two-tiers", "medium", "low", {"r1": "medium", "judge": "medium"}),
        ("two-tiers", "none", "low", {"r1": None, "judge": None}),  # the level `none` is never sent
    ],
)
def test_an_effort_the_model_does_not_know_snaps_to_the_nearest_tier(
    tiered: Service, fake: FakeUpstream, model: str, effort: str, tier: str, expected: dict[str, str | None]
) -> None:
    assert chat(tiered, model, effort)["tier"] == tier
    assert asked(fake) == expected


def test_no_effort_asks_the_model_as_configured(tiered: Service, fake: FakeUpstream) -> None:
    completion = openai_client(tiered).chat.completions.create(
        model="tiered", messages=[{"role": "user", "content": "Anything."}]
    )
    assert (completion.model_extra or {})["mom"]["tier"] is None
    assert asked(fake) == {"r1": None, "r2": None, "plain": None, "judge": None}


def test_without_tiers_the_effort_goes_to_the_llms_that_take_it(tiered: Service, fake: FakeUpstream) -> None:
    mom = chat(tiered, "untiered", "high")
    assert asked(fake) == {"r1": "high", "plain": None, "judge": "high"}
    assert mom["tier"] is None


def test_responses_reasoning_effort_picks_the_tier(tiered: Service, fake: FakeUpstream) -> None:
    response = openai_client(tiered).responses.create(
        model="tiered", input="How hard is this?", reasoning={"effort": "low"}, store=False
    )
    assert response.output_text
    assert response.reasoning is not None and response.reasoning.effort == "low"
    assert asked(fake) == {"r1": "minimal", "judge-small": None}
    fake.clear_log()
    openai_client(tiered).responses.create(
        model="tiered", input="And this?", reasoning={"effort": "medium"}, store=False
    )
    assert asked(fake) == {"r1": "medium", "r2": "medium", "judge": "medium"}


@pytest.mark.parametrize(
    ("thinking", "expected"),
    [
        ({"type": "enabled", "budget_tokens": 2048}, {"r1": "minimal", "judge-small": None}),  # low
        ({"type": "enabled", "budget_tokens": 8000}, {"r1": "medium", "r2": "medium", "judge": "medium"}),  # medium
        (
            {"type": "enabled", "budget_tokens": 20000},  # high
            {"r1": "high", "r2": "high", "r3": "high", "plain": None, "judge": "xhigh"},
        ),
        ({"type": "disabled"}, {"r1": None, "r2": None, "plain": None, "judge": None}),  # no level: as configured
    ],
)
def test_messages_thinking_budget_picks_the_tier(
    tiered: Service, fake: FakeUpstream, thinking: dict[str, Any], expected: dict[str, str | None]
) -> None:
    client = anthropic.Anthropic(base_url=tiered.url, api_key=TOKEN, max_retries=0, timeout=30)
    message = client.messages.create(
        model="tiered",
        max_tokens=32000,
        thinking=thinking,  # type: ignore[arg-type]
        messages=[{"role": "user", "content": "How hard is this?"}],
    )
    assert any(block.type == "text" and block.text for block in message.content)
    assert asked(fake) == expected


def test_the_model_list_shows_each_models_tiers(tiered: Service) -> None:
    models = {m.id: m.model_extra or {} for m in openai_client(tiered).models.list()}
    assert models["untiered"]["tiers"] is None
    assert list(models["tiered"]["tiers"]) == ["low", "medium", "high"]
    assert models["tiered"]["tiers"]["low"] == {
        "llms_to_query": ["r1"],
        "concluding_llm": "judge-small",
        "effort": "minimal",
        "concluding_effort": "none",
    }
    assert models["tiered"]["tiers"]["medium"] == {
        "llms_to_query": ["r1", "r2"],
        "concluding_llm": "judge",
        "effort": "client",
        "concluding_effort": "client",
    }
    one = httpx.get(f"{tiered.base_url}/models/two-tiers", headers=tiered.headers()).json()
    assert one["tiers"]["high"]["llms_to_query"] == MEMBERS and one["capabilities"]["tools"] is True


@pytest.mark.parametrize("effort", ["extreme", "HIGH", 3, ""])
def test_an_invalid_reasoning_effort_is_a_400_before_any_call(tiered: Service, fake: FakeUpstream, effort: Any) -> None:
    response = tiered.chat("tiered", reasoning_effort=effort)
    assert response.status_code == 400
    error = response.json()["error"]
    assert error["param"] == "reasoning_effort" and error["code"] in ("invalid_value", "invalid_type")
    bad = tiered_responses(tiered, {"effort": effort})
    assert bad.status_code == 400 and bad.json()["error"]["param"] == "reasoning.effort"
    assert fake.log() == []


def tiered_responses(service: Service, reasoning: dict[str, Any]) -> httpx.Response:
    body = {"model": "tiered", "input": "Hi", "reasoning": reasoning, "store": False}
    return httpx.post(f"{service.base_url}/responses", headers=service.headers(), json=body)
