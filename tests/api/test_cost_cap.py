"""The hard cost cap (`max_cost_usd`, here the MoM model's default in config.yaml) on every surface, through the
official clients (openai for Chat Completions and Responses, anthropic for Messages) and both call paths: the most
expensive member dropped (and never asked), a request refused with no upstream call, the concluding call's output
ceiling set from what is left, an unpriced LLM refused. Prices are chosen so that the arithmetic is exact: where
the estimate is asserted to the last digit, input tokens are free (our count of them is the service's business)."""

from __future__ import annotations

import sqlite3
from dataclasses import dataclass
from decimal import Decimal
from typing import Any

import anthropic
import httpx
import openai
import orjson
import pytest

from tests.conftest import TOKEN, CallPath, Service, StartService, llm, wait_until
from tests.fake_upstream import FakeUpstream

MILLION = Decimal(1_000_000)
SURFACES = ("chat", "messages", "responses")
QUESTION = "How much may this answer cost?"
# The client's own limit on Messages (which requires one): above every ceiling here, so it changes nothing
CLIENT_MAX_TOKENS = 4000
JSON = {"type": "json_object"}


def priced(input_per_million: str, output_per_million: str) -> dict[str, str]:
    return {"input_per_million": input_per_million, "output_per_million": output_per_million}


# name: (its output ceiling in config.yaml, its prices per million tokens); the fake serves each
LLMS: dict[str, tuple[int | None, dict[str, str] | None]] = {
    # capped-drop: input priced; cap_b's output is a hundred times dearer than the others'
    "cap_a": (100, priced("1", "10")),
    "cap_b": (100, priced("1", "1000")),
    "cap_c": (100, priced("1", "20")),
    "cap_j": (200, priced("1", "10")),
    # capped-refuse: input free, so that the estimate is exact
    "cap_za": (100, priced("0", "10")),
    "cap_zb": (100, priced("0", "1000")),
    "cap_zc": (100, priced("0", "20")),
    "cap_zj": (200, priced("0", "10")),
    # capped-shrink: the member's input is priced, the concluding call's is free
    "cap_m": (100, priced("1", "10")),
    "cap_k": (1000, priced("0", "10")),
    # no price in the config, none in LiteLLM's cost map
    "cap_n": (None, None),
}


def cap_config(fake: FakeUpstream) -> dict[str, Any]:
    definitions = []
    for name, (ceiling, prices) in LLMS.items():
        extra: dict[str, Any] = {"retries": 0}
        if ceiling is not None:
            extra["params"] = {"max_tokens": ceiling}
        if prices is not None:
            extra["pricing"] = prices
        definitions.append(llm(name, fake, **extra))
    return {
        "llm_definitions": definitions,
        "models": [
            {
                "name": "capped-drop",
                "llms_to_query": ["cap_a", "cap_b", "cap_c"],
                "concluding_llm": "cap_j",
                "min_successful": 2,
                "max_cost_usd": "0.01",
            },
            {
                "name": "capped-refuse",
                "llms_to_query": ["cap_za", "cap_zb", "cap_zc"],
                "concluding_llm": "cap_zj",
                "min_successful": 2,
                "max_cost_usd": "0.004",
            },
            {"name": "capped-shrink", "llms_to_query": ["cap_m"], "concluding_llm": "cap_k", "max_cost_usd": "0.0111"},
            {
                "name": "capped-unpriced",
                "llms_to_query": ["cap_a", "cap_n"],
                "concluding_llm": "cap_j",
                "max_cost_usd": "1",
            },
            {"name": "capped-json", "llms_to_query": ["cap_za"], "concluding_llm": "cap_k", "max_cost_usd": "0.011"},
            {"name": "uncapped", "llms_to_query": ["cap_a", "cap_b"], "concluding_llm": "cap_j"},
        ],
    }


@pytest.fixture(scope="module")
def capped(fake_server: FakeUpstream, start_service: StartService, call_path: CallPath) -> Service:
    return start_service(cap_config(fake_server), call_path.env)


@dataclass
class Answer:
    request_id: str  # the key of its usage record
    text: str
    mom: dict[str, Any]


def ask(
    service: Service, surface: str, model: str, *, controls: dict[str, Any] | None = None, text: str = QUESTION
) -> Answer:
    """One question through a surface's official client, answered whole; `controls` as the `mom` field."""
    extra = {"mom": controls} if controls is not None else None
    if surface == "messages":
        client = anthropic.Anthropic(base_url=service.url, api_key=TOKEN, max_retries=0, timeout=30)
        raw_message = client.messages.with_raw_response.create(
            model=model,
            max_tokens=CLIENT_MAX_TOKENS,
            messages=[{"role": "user", "content": text}],
            extra_body=extra,
        )
        message = raw_message.parse()
        block = message.content[0]
        text = block.text if block.type == "text" else ""
        return Answer(raw_message.headers["x-request-id"], text, (message.model_extra or {})["mom"])
    sdk = openai.OpenAI(base_url=service.base_url, api_key=TOKEN, max_retries=0, timeout=30)
    if surface == "responses":
        raw_response = sdk.responses.with_raw_response.create(model=model, input=text, extra_body=extra)
        response = raw_response.parse()
        return Answer(raw_response.headers["x-request-id"], response.output_text, (response.model_extra or {})["mom"])
    raw_completion = sdk.chat.completions.with_raw_response.create(
        model=model, messages=[{"role": "user", "content": text}], extra_body=extra
    )
    completion = raw_completion.parse()
    text = completion.choices[0].message.content or ""
    return Answer(raw_completion.headers["x-request-id"], text, (completion.model_extra or {})["mom"])


def refusal(service: Service, surface: str, model: str, **asked: Any) -> tuple[str, str]:
    """A request the service must refuse with a 400 in the surface's shape: its (code or type, message)."""
    errors = (anthropic.BadRequestError, openai.BadRequestError)
    with pytest.raises(errors) as caught:
        ask(service, surface, model, **asked)
    assert caught.value.status_code == 400
    body = caught.value.response.json()
    if surface == "messages":  # Anthropic's shape has no code: the message says it all
        assert body["type"] == "error" and body["error"]["type"] == "invalid_request_error"
        return body["error"]["type"], body["error"]["message"]
    assert body["error"]["type"] == "invalid_request_error"
    return body["error"]["code"], body["error"]["message"]


def cost_of(report: dict[str, Any]) -> Decimal:
    """A call's cost from the fake's usage, at its prices in LLMS."""
    prices = LLMS[report["name"]][1]
    assert prices is not None
    usage = report["usage"]
    return (
        usage["prompt_tokens"] * Decimal(prices["input_per_million"])
        + usage["completion_tokens"] * Decimal(prices["output_per_million"])
    ) / MILLION


def sent(fake: FakeUpstream) -> dict[str, dict[str, Any]]:
    """The body each LLM got (each is asked once here)."""
    return {entry["model"]: entry["body"] for entry in fake.log()}


def recorded_cost(service: Service, request_id: str) -> Decimal:
    """The request's cost in the usage database, once its record is written."""
    with sqlite3.connect(service.workdir / "data" / "mom.db") as db:
        query = "SELECT cost_pico FROM mom_requests WHERE id = ?"
        wait_until(lambda: db.execute(query, (request_id,)).fetchone() is not None)
        (pico,) = db.execute(query, (request_id,)).fetchone()
    return Decimal(pico) / 10**12


@pytest.mark.parametrize("surface", SURFACES)
def test_a_cap_drops_the_most_expensive_member(capped: Service, fake: FakeUpstream, surface: str) -> None:
    # at worst cap_b costs 100 x $1000/M = $0.1 of output alone, over the $0.01 cap; cap_a and cap_c fit with the
    # concluding call (about $0.001 + $0.002 + $0.0025), and min_successful (2) is still met
    answer = ask(capped, surface, "capped-drop")
    assert answer.text == "Answer from cap_j."
    members = {m["name"]: m for m in answer.mom["members"]}
    assert members["cap_b"]["status"] == "skipped" and members["cap_b"]["reason"] == "cost_cap"
    assert "cost cap of $0.01" in members["cap_b"]["error"] and members["cap_b"]["cost"] == 0
    assert members["cap_a"]["status"] == members["cap_c"]["status"] == "ok"
    assert answer.mom["answered"] == answer.mom["asked"] == 2 and answer.mom["degraded"] is False
    bodies = sent(fake)
    assert set(bodies) == {"cap_a", "cap_c", "cap_j"}  # cap_b was never asked
    # under a cap every call carries its output ceiling; what is left leaves the concluding call its whole one
    assert [bodies[name]["max_tokens"] for name in ("cap_a", "cap_c", "cap_j")] == [100, 100, 200]
    cost = sum((cost_of(r) for r in [members["cap_a"], members["cap_c"], answer.mom["concluding"]]), Decimal(0))
    assert Decimal(repr(answer.mom["cost"])) == cost
    assert 0 < cost <= Decimal("0.01")
    assert recorded_cost(capped, answer.request_id) == cost


@pytest.mark.parametrize("surface", SURFACES)
def test_a_cap_that_even_the_cheapest_plan_exceeds_is_refused_before_any_call(
    capped: Service, fake: FakeUpstream, surface: str
) -> None:
    # without cap_zb (dropped first), at worst: cap_za 100 x $10/M + cap_zc 100 x $20/M + cap_zj 200 x $10/M
    # = $0.005 > $0.004, and min_successful (2) forbids dropping another
    kind, message = refusal(capped, surface, "capped-refuse")
    assert kind == ("invalid_request_error" if surface == "messages" else "cost_cap_exceeded")
    assert "could cost up to $0.005, even with only 2 panel member(s) (min_successful: 2)" in message
    assert "over its cost cap of $0.004 (max_cost_usd)" in message
    assert fake.log() == []


@pytest.mark.parametrize("surface", SURFACES)
def test_the_concluding_ceiling_is_set_from_what_is_left(capped: Service, fake: FakeUpstream, surface: str) -> None:
    # planned: cap_m at most (its prompt ~ 20 tokens) x $1/M + 100 x $10/M, cap_k 1000 x $10/M: about $0.01102,
    # under $0.0111. But cap_m's provider counts 2000 prompt tokens: it costs 2000 x $1/M + 3 x $10/M = $0.00203,
    # which leaves $0.00907: 907 tokens of cap_k's answer (its input is free), not its ceiling of 1000
    fake.configure({"cap_m": {"prompt_tokens": 2000}})
    answer = ask(capped, surface, "capped-shrink")
    member = answer.mom["members"][0]
    assert member["usage"]["prompt_tokens"] == 2000 and member["usage"]["completion_tokens"] == 3
    assert cost_of(member) == Decimal("0.00203")
    bodies = sent(fake)
    assert bodies["cap_m"]["max_tokens"] == 100
    assert bodies["cap_k"]["max_tokens"] == 907
    assert Decimal(repr(answer.mom["cost"])) == cost_of(member) + cost_of(answer.mom["concluding"]) <= Decimal("0.0111")


def test_a_streamed_answer_gets_the_same_ceiling(capped: Service, fake: FakeUpstream) -> None:
    fake.configure({"cap_m": {"prompt_tokens": 2000}})
    body = {
        "model": "capped-shrink",
        "messages": [{"role": "user", "content": QUESTION}],
        "stream": True,
        "stream_options": {"include_usage": True},
    }
    payloads = [payload for _, payload in capped.sse(body)]
    assert payloads[-1] == "[DONE]"
    usage_chunk = orjson.loads(payloads[-2])
    assert usage_chunk["choices"] == [] and usage_chunk["mom"]["concluding"]["status"] == "ok"
    assert sent(fake)["cap_k"]["max_tokens"] == 907  # as in the whole answer: ($0.0111 - $0.00203) / $10/M
    assert Decimal(repr(usage_chunk["usage"]["cost"])) <= Decimal("0.0111")


def test_a_concluding_call_left_too_little_is_not_made(capped: Service, fake: FakeUpstream) -> None:
    # cap_m's provider counts 11000 prompt tokens: $0.011 + 3 x $10/M, which leaves $0.00007 of the $0.0111, 7
    # tokens of cap_k's answer: too few to ask it (the cap cannot be kept when an estimate was this wrong)
    fake.configure({"cap_m": {"prompt_tokens": 11000}})
    reply = httpx.post(
        f"{capped.base_url}/chat/completions",
        json={"model": "capped-shrink", "messages": [{"role": "user", "content": QUESTION}]},
        headers=capped.headers(),
        timeout=30,
    )
    assert reply.status_code == 502
    error = reply.json()["error"]
    assert error["code"] == "concluding_failed"
    assert error["message"] == (
        "The concluding LLM 'cap_k' was not asked: of the cost cap of $0.0111, $0.01103 was spent and $0.00007 is "
        "left once its input is paid: 7 token(s) of answer, too few"
    )
    assert [e["model"] for e in fake.log()] == ["cap_m"]


@pytest.mark.parametrize("surface", SURFACES)
def test_an_unpriced_llm_under_a_cap_is_refused(capped: Service, fake: FakeUpstream, surface: str) -> None:
    kind, message = refusal(capped, surface, "capped-unpriced")
    assert kind == ("invalid_request_error" if surface == "messages" else "cost_cap_unpriced")
    assert "its LLM(s) 'cap_n' have no known price" in message and "cost cap of $1" in message
    assert fake.log() == []


def words(count: int) -> str:
    """A text of `count` tokens as the fake counts them, all different (LiteLLM stops a stream that repeats itself)."""
    return " ".join(f"w{n}" for n in range(count))


def ask_json(service: Service) -> httpx.Response:
    body = {"model": "capped-json", "messages": [{"role": "user", "content": QUESTION}], "response_format": JSON}
    return httpx.post(f"{service.base_url}/chat/completions", json=body, headers=service.headers(), timeout=30)


def test_the_corrective_retry_gets_what_the_first_answer_left(capped: Service, fake: FakeUpstream) -> None:
    # planned: cap_za 100 x $10/M + cap_k 1000 x $10/M = $0.011, the cap. cap_k's first answer is 400 tokens of
    # prose ($0.004): its corrective retry may write what is left, ($0.011 - $0.00003 - $0.004) / $10/M = 697
    fake.configure({"cap_k": {"texts": [words(400), '{"answer": "ok"}']}})
    reply = ask_json(capped)
    assert reply.status_code == 200, reply.text
    first, retry = (e["body"] for e in fake.log() if e["model"] == "cap_k")
    assert (first["max_tokens"], retry["max_tokens"]) == (1000, 697)
    mom = reply.json()["mom"]
    calls = [*mom["members"], *mom["concluding_fallbacks"], mom["concluding"]]
    assert [c["usage"]["completion_tokens"] for c in calls] == [3, 400, 2]
    assert Decimal(repr(mom["cost"])) == sum(map(cost_of, calls), Decimal(0)) == Decimal("0.00405")


def test_no_corrective_retry_when_too_little_is_left(capped: Service, fake: FakeUpstream) -> None:
    # cap_za writes 99 tokens ($0.00099), cap_k's first answer its whole ceiling ($0.01): $0.00001 is left, one token
    fake.configure({"cap_za": {"text": words(99)}, "cap_k": {"text": words(1000)}})
    reply = ask_json(capped)
    assert reply.status_code == 502
    error = reply.json()["error"]
    assert error["code"] == "invalid_structured_output"
    assert error["message"].endswith(
        "(no corrective retry: of the cost cap of $0.011, $0.01099 was spent and $0.00001 is left once its input is "
        "paid: 1 token(s) of answer, too few)"
    )
    assert [e["model"] for e in fake.log()].count("cap_k") == 1


def test_without_a_cap_nothing_is_dropped_or_limited(capped: Service, fake: FakeUpstream) -> None:
    answer = ask(capped, "chat", "uncapped")
    assert [m["status"] for m in answer.mom["members"]] == ["ok", "ok"]
    bodies = sent(fake)
    assert set(bodies) == {"cap_a", "cap_b", "cap_j"}
    # each call carries only its LLM's own configured limit
    assert [bodies[name]["max_tokens"] for name in ("cap_a", "cap_b", "cap_j")] == [100, 100, 200]


# ------------------------------------------------------------------------------- the caller's cap (issue 17)


@pytest.mark.parametrize("surface", SURFACES)
def test_the_callers_cap_in_the_body_drops_a_member(capped: Service, fake: FakeUpstream, surface: str) -> None:
    # "uncapped" has no cap of its own: the caller's $0.01 drops cap_b (100 x $1000/M = $0.1 of output at worst)
    answer = ask(capped, surface, "uncapped", controls={"max_cost_usd": 0.01})
    members = {m["name"]: m for m in answer.mom["members"]}
    assert (members["cap_b"]["status"], members["cap_b"]["reason"]) == ("skipped", "cost_cap")
    assert set(sent(fake)) == {"cap_a", "cap_j"}
    assert answer.mom["overrides"] == {"max_cost_usd": "0.01"}
    assert 0 < recorded_cost(capped, answer.request_id) <= Decimal("0.01")


@pytest.mark.parametrize("surface", SURFACES)
def test_the_callers_cap_in_a_directive_refuses_before_any_call(
    capped: Service, fake: FakeUpstream, surface: str
) -> None:
    text = f"<<SYSTEM>>max_cost_usd: 0.000001<</SYSTEM>>{QUESTION}"
    kind, message = refusal(capped, surface, "uncapped", text=text)
    assert kind == ("invalid_request_error" if surface == "messages" else "cost_cap_exceeded")
    assert "over its cost cap of $0.000001 (max_cost_usd)" in message
    assert fake.log() == []


def test_the_callers_cap_replaces_the_models(capped: Service, fake: FakeUpstream) -> None:
    # capped-drop's own $0.01 drops cap_b; the caller's $1 keeps the whole panel
    answer = ask(capped, "chat", "capped-drop", controls={"max_cost_usd": "1"})
    assert [m["status"] for m in answer.mom["members"]] == ["ok", "ok", "ok"]
    assert set(sent(fake)) == {"cap_a", "cap_b", "cap_c", "cap_j"}
