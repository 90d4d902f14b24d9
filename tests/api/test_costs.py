"""Costs in every answer, and the usage API over the records they leave."""

from __future__ import annotations

import sqlite3
import time
from decimal import Decimal
from typing import Any

import httpx
import orjson
import pytest

from tests.conftest import PRICES, Service, StartService, panel_config
from tests.fake_upstream import FakeUpstream

QUESTION = [{"role": "user", "content": "How much does this cost?"}]
MILLION = Decimal(1_000_000)


def expected_cost(name: str, usage: dict[str, Any]) -> Decimal:
    """The price table (config.yaml) times the token counts, computed independently of the service."""
    price = {k: Decimal(v) / MILLION for k, v in PRICES[name].items()}
    output = price["output_per_million"]
    reasoning_price = price.get("reasoning_per_million", output)
    cached_price = price.get("cached_input_per_million", price["input_per_million"])
    cached = usage["prompt_tokens_details"]["cached_tokens"]
    reasoning = usage["completion_tokens_details"]["reasoning_tokens"]
    return (
        (usage["prompt_tokens"] - cached) * price["input_per_million"]
        + cached * cached_price
        + (usage["completion_tokens"] - reasoning) * output
        + reasoning * reasoning_price
    )


def configure_priced_panel(fake: FakeUpstream) -> None:
    fake.configure(
        {
            # the fake counts one token per word: "one two three" is 3 completion tokens (+ reasoning tokens)
            "alpha": {"text": "one two three", "prompt_tokens": 1000, "reasoning_tokens": 400, "cached_tokens": 600},
            "beta": {"text": "one two", "prompt_tokens": 2000},
            "gamma": {"text": "one", "prompt_tokens": 3000},
            "judge": {"text": "the final answer", "prompt_tokens": 5000},
        }
    )


def test_each_cost_is_the_price_table_times_the_fakes_tokens(service: Service, fake: FakeUpstream) -> None:
    configure_priced_panel(fake)
    body = service.chat(messages=QUESTION).json()
    mom = body["mom"]
    members = {m["name"]: m for m in mom["members"]}
    assert members["alpha"]["usage"]["completion_tokens"] == 3 + 400
    assert members["alpha"]["usage"]["completion_tokens_details"]["reasoning_tokens"] == 400
    assert members["alpha"]["usage"]["prompt_tokens_details"]["cached_tokens"] == 600
    total = Decimal(0)
    for report in [*mom["members"], mom["concluding"]]:
        cost = expected_cost(report["name"], report["usage"])
        assert Decimal(repr(report["cost"])) == cost, report["name"]
        assert report["usage"]["cost"] == report["cost"]
        total += cost
    # alpha: 400 uncached at 1.25, 600 cached at 0.30, 3 output at 2.5, 400 reasoning at 7.5 (per million)
    assert Decimal(repr(members["alpha"]["cost"])) == Decimal("0.0005") + Decimal("0.00018") + Decimal(
        "0.0000075"
    ) + Decimal("0.003")
    assert Decimal(repr(body["usage"]["cost"])) == total
    assert Decimal(repr(mom["cost"])) == total
    assert mom["unpriced"] == []


def test_streamed_usage_chunk_carries_the_same_costs(service: Service, fake: FakeUpstream) -> None:
    configure_priced_panel(fake)
    frames = [
        p
        for _, p in service.sse(
            {"model": "mom", "messages": QUESTION, "stream": True, "stream_options": {"include_usage": True}}
        )
    ]
    usage_chunk = orjson.loads(frames[-2])
    assert usage_chunk["choices"] == []
    mom = usage_chunk["mom"]
    total = sum((expected_cost(r["name"], r["usage"]) for r in [*mom["members"], mom["concluding"]]), Decimal(0))
    assert Decimal(repr(usage_chunk["usage"]["cost"])) == total
    assert Decimal(repr(mom["concluding"]["cost"])) == expected_cost("judge", mom["concluding"]["usage"])


def test_unknown_price_is_null_never_zero(service: Service, fake: FakeUpstream) -> None:
    fake.configure(
        {"alpha": {"text": "quick", "prompt_tokens": 10}, "sloth": {"text": "slow but priceless", "prompt_tokens": 10}}
    )
    body = service.chat(messages=QUESTION, model="mom-slow-member").json()
    mom = body["mom"]
    members = {m["name"]: m for m in mom["members"]}
    assert members["sloth"]["status"] == "ok"
    assert members["sloth"]["cost"] is None
    assert members["sloth"]["usage"]["total_tokens"] > 0
    assert mom["unpriced"] == ["sloth"]
    # the total adds the known costs only
    known = expected_cost("alpha", members["alpha"]["usage"]) + expected_cost("judge", mom["concluding"]["usage"])
    assert Decimal(repr(body["usage"]["cost"])) == known
    assert "LLM 'sloth' (openai/sloth) has no known price" in service.log()
    assert service.log().count("LLM 'sloth' (openai/sloth) has no known price") == 1


def test_cost_map_prices_apply_without_config_pricing(service: Service, fake: FakeUpstream) -> None:
    fake.configure({"gpt-4o-mini": {"text": "catalog answer", "prompt_tokens": 1_000_000}})
    body = service.chat(messages=QUESTION, model="mom-catalog").json()
    (member,) = body["mom"]["members"]
    # LiteLLM's bundled cost map: gpt-4o-mini input is $0.15 per million tokens, output $0.60
    expected = Decimal("0.15") + member["usage"]["completion_tokens"] * Decimal("0.0000006")
    assert Decimal(repr(member["cost"])) == expected


def test_failed_member_costs_zero(service: Service, fake: FakeUpstream) -> None:
    fake.configure({"beta": {"status": 500}})
    body = service.chat(messages=QUESTION).json()
    beta = next(m for m in body["mom"]["members"] if m["name"] == "beta")
    assert beta["status"] == "error" and beta["usage"] is None and beta["cost"] == 0


# ------------------------------------------------------------------------------------------------ usage API


def usage_api(service: Service, **params: Any) -> httpx.Response:
    return httpx.get(f"{service.base_url}/metrics/usage", headers=service.headers(), params=params, timeout=10)


def wait_for_requests(service: Service, count: int, **params: Any) -> dict[str, Any]:
    """Records are written in the background: poll until the usage API reports `count` requests."""
    deadline = time.monotonic() + 10
    while True:
        body = usage_api(service, **params).json()
        if body["totals"]["requests"] >= count or time.monotonic() > deadline:
            return body
        time.sleep(0.1)


@pytest.fixture
def fresh_service(fake_server: FakeUpstream, start_service: StartService) -> Service:
    """A service with an empty usage database of its own."""
    return start_service(panel_config(fake_server))


def test_usage_api_totals_and_groups_match_the_answers(fresh_service: Service, fake: FakeUpstream) -> None:
    service = fresh_service
    start = time.time() - 1
    configure_priced_panel(fake)
    answers = [service.chat(messages=QUESTION).json() for _ in range(3)]
    answers.append(service.chat(messages=QUESTION, model="mom-think").json())
    streamed = [
        p
        for _, p in service.sse(
            {"model": "mom", "messages": QUESTION, "stream": True, "stream_options": {"include_usage": True}}
        )
    ]
    answers.append(orjson.loads(streamed[-2]))
    fake.configure({name: {"status": 500} for name in ("alpha", "beta", "gamma")})
    assert service.chat(messages=QUESTION).status_code == 502  # an error: recorded, costs nothing

    report = wait_for_requests(service, 6, start=start)
    totals = report["totals"]
    assert totals["requests"] == 6
    assert totals["errors"] == 1
    for field in ("prompt_tokens", "completion_tokens"):
        assert totals[field] == sum(a["usage"][field] for a in answers)
    assert totals["reasoning_tokens"] == sum(
        a["usage"]["completion_tokens_details"]["reasoning_tokens"] for a in answers
    )
    assert totals["cached_tokens"] == sum(a["usage"]["prompt_tokens_details"]["cached_tokens"] for a in answers)
    assert Decimal(repr(totals["cost"])) == sum((Decimal(repr(a["usage"]["cost"])) for a in answers), Decimal(0))
    assert totals["latency_ms_p50"] > 0 and totals["latency_ms_p95"] >= totals["latency_ms_p50"]
    assert report["groups"] == []

    by_model = {g["key"]: g for g in usage_api(service, start=start, group_by="model").json()["groups"]}
    assert by_model["mom"]["requests"] == 5 and by_model["mom-think"]["requests"] == 1
    assert by_model["mom"]["errors"] == 1

    by_llm = {g["key"]: g for g in usage_api(service, start=start, group_by="llm").json()["groups"]}
    assert set(by_llm) == {"alpha", "beta", "gamma", "judge"}
    assert by_llm["judge"]["requests"] == 5  # the failed request never reached the concluding LLM
    assert by_llm["alpha"]["requests"] == 6 and by_llm["alpha"]["errors"] == 1
    alpha_cost = sum(
        (Decimal(repr(m["cost"])) for a in answers for m in a["mom"]["members"] if m["name"] == "alpha"), Decimal(0)
    )
    assert Decimal(repr(by_llm["alpha"]["cost"])) == alpha_cost

    only_judge = usage_api(service, start=start, llm="judge").json()["totals"]
    assert only_judge["requests"] == 5
    assert only_judge["prompt_tokens"] == 5 * 5000

    by_day = usage_api(service, start=start, group_by="day").json()["groups"]
    assert [g["key"] for g in by_day] == [time.strftime("%Y-%m-%d", time.gmtime())]
    assert by_day[0]["requests"] == 6
    by_hour = usage_api(service, start=start, group_by="hour").json()["groups"]
    assert sum(g["requests"] for g in by_hour) == 6
    assert all(g["key"].endswith(":00:00Z") for g in by_hour)

    # a range before the requests holds nothing; ISO 8601 and unix seconds both work
    empty = usage_api(service, start="2020-01-01T00:00:00Z", end="2020-01-02").json()
    assert empty["totals"]["requests"] == 0 and empty["totals"]["cost"] is None
    assert empty["period"] == {"start": "2020-01-01T00:00:00Z", "end": "2020-01-02T00:00:00Z"}


@pytest.mark.parametrize(
    ("params", "param"),
    [
        ({"start": "yesterday"}, "start"),
        ({"end": "2026-13-45"}, "end"),
        ({"start": "nan"}, "start"),
        ({"start": "inf"}, "start"),
        ({"start": "-5"}, "start"),
        ({"start": "2026-01-02", "end": "2026-01-01"}, "end"),
        ({"group_by": "week"}, "group_by"),
    ],
)
def test_usage_api_bad_parameters_are_400(service: Service, params: dict[str, str], param: str) -> None:
    response = usage_api(service, **params)
    assert response.status_code == 400
    error = response.json()["error"]
    assert error["type"] == "invalid_request_error" and error["param"] == param


def test_usage_api_needs_the_token(service: Service) -> None:
    assert httpx.get(f"{service.base_url}/metrics/usage").status_code == 401


def test_a_client_that_leaves_still_gets_its_spent_calls_recorded(fresh_service: Service, fake: FakeUpstream) -> None:
    service = fresh_service
    configure_priced_panel(fake)
    fake.configure({"judge": {"text": " ".join(["token"] * 200), "token_delay_ms": 30, "prompt_tokens": 5000}})
    received = 0
    for _, payload in service.sse({"model": "mom", "messages": QUESTION, "stream": True}):
        received += payload.count("token")
        if received >= 5:
            break
    fake.wait_for(lambda log: any(e["model"] == "judge" and e["outcome"] == "disconnected" for e in log))
    database = service.workdir / "data" / "mom.db"
    deadline = time.monotonic() + 10
    rows: list[Any] = []
    while time.monotonic() < deadline:
        with sqlite3.connect(database) as conn:
            rows = conn.execute(
                "SELECT r.status, c.llm, c.status, c.completion_tokens, c.usage_estimated, c.cost_pico "
                "FROM mom_requests r JOIN mom_calls c ON c.request_id = r.id ORDER BY c.llm"
            ).fetchall()
        if rows:
            break
        time.sleep(0.1)
    by_llm = {row[1]: row for row in rows}
    assert set(by_llm) == {"alpha", "beta", "gamma", "judge"}
    assert all(row[0] == "cancelled" for row in rows)  # the request ended when the client left
    assert all(by_llm[m][2] == "ok" and by_llm[m][5] > 0 for m in ("alpha", "beta", "gamma"))
    judge = by_llm["judge"]
    assert judge[2] == "cancelled" and judge[4] == 1  # its usage counted by us from what it streamed
    assert 5 <= judge[3] < 200 and judge[5] > 0
