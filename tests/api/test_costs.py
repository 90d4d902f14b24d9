"""Costs in every answer, and the usage API over the records they leave."""

from __future__ import annotations

import sqlite3
import time
from decimal import Decimal
from typing import Any

import httpx
import orjson
import pytest

from tests.conftest import PRICES, CallPath, Service, StartService, cl100k, free_port, llm, panel_config, wait_until
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
    assert totals["usage_estimated"] == 0  # the fake reports every call's usage
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


# ---------------------------------------------------------------------------------- calls that failed, paid


ACCOUNT_PRICE = {"input_per_million": "4", "output_per_million": "16"}


@pytest.fixture(scope="module")
def accounts(fake_server: FakeUpstream, start_service: StartService, call_path: CallPath) -> Service:
    """A panel whose calls fail in the ways that are, and are not, paid for (no retries: one call each)."""
    dead = f"http://127.0.0.1:{free_port()}/v1"  # nothing listens there: a connection refused, never sent

    def priced(name: str, **extra: Any) -> dict[str, Any]:
        return llm(name, fake_server, pricing=ACCOUNT_PRICE, retries=0, **extra)

    config = {
        "llm_definitions": [
            priced("acc-one"),
            priced("acc-tardy", timeout=1),
            priced("acc-gone", api_base=dead),
            priced("acc-judge"),
        ],
        "models": [
            {"name": "acc-timeout", "llms_to_query": ["acc-one", "acc-tardy"], "concluding_llm": "acc-judge"},
            {"name": "acc-refused", "llms_to_query": ["acc-one", "acc-gone"], "concluding_llm": "acc-judge"},
        ],
    }
    return start_service(config, call_path.env)


def tokens(text: str) -> int:
    """Our own count of a text's tokens (cl100k_base, the tokenizer LiteLLM uses for a model it does not know)."""
    return len(cl100k().encode(text))


def account_price(usage: dict[str, Any]) -> Decimal:
    return (usage["prompt_tokens"] * 4 + usage["completion_tokens"] * 16) / MILLION


def call_rows(service: Service, request_id: str) -> dict[str, dict[str, Any]]:
    query = (
        "SELECT llm, status, error_type, prompt_tokens, completion_tokens, usage_estimated, cost_pico "
        "FROM mom_calls WHERE request_id = ?"
    )
    names = ("status", "error_type", "prompt_tokens", "completion_tokens", "usage_estimated", "cost_pico")
    with sqlite3.connect(service.workdir / "data" / "mom.db") as db:
        return {row[0]: dict(zip(names, row[1:], strict=True)) for row in db.execute(query, (request_id,))}


def test_a_member_that_times_out_is_charged_for_its_input(accounts: Service, fake: FakeUpstream) -> None:
    """Its prompt was sent (the provider bills it) but it never answered: our estimate of the input, marked."""
    fake.configure({"acc-tardy": {"hang": True}, "acc-one": {"text": "On time."}, "acc-judge": {"text": "Done."}})
    response = accounts.chat("acc-timeout", messages=QUESTION)
    body = response.json()
    tardy = {m["name"]: m for m in body["mom"]["members"]}["acc-tardy"]
    assert (tardy["status"], tardy["reason"], tardy["usage_estimated"]) == ("error", "timeout", True)
    assert tardy["usage"]["prompt_tokens"] > 0 and tardy["usage"]["completion_tokens"] == 0
    assert Decimal(repr(tardy["cost"])) == account_price(tardy["usage"])
    assert body["mom"]["usage_estimated"] is True
    total = sum(Decimal(repr(m["cost"])) for m in body["mom"]["members"]) + Decimal(
        repr(body["mom"]["concluding"]["cost"])
    )
    assert Decimal(repr(body["mom"]["cost"])) == total
    wait_until(lambda: "acc-tardy" in call_rows(accounts, response.headers["x-request-id"]))
    row = call_rows(accounts, response.headers["x-request-id"])["acc-tardy"]
    assert (row["status"], row["error_type"], row["usage_estimated"]) == ("error", "timeout", 1)
    assert (row["prompt_tokens"], row["completion_tokens"]) == (tardy["usage"]["prompt_tokens"], 0)
    assert Decimal(row["cost_pico"]) / 10**12 == account_price(tardy["usage"])


def test_a_concluding_llm_failing_mid_stream_is_charged_for_what_it_streamed(
    accounts: Service, fake: FakeUpstream
) -> None:
    fake.configure(
        {
            "acc-one": {"text": "Fine."},
            "acc-tardy": {"text": "Fine too."},
            "acc-judge": {"text": JUDGED, "stop_after_tokens": 3, "token_delay_ms": 100},
        }
    )
    with httpx.Client(timeout=30) as client:
        response = client.post(
            f"{accounts.base_url}/chat/completions",
            headers=accounts.headers(),
            json={"model": "acc-timeout", "messages": QUESTION, "stream": True},
        )
    assert response.status_code == 200
    assert orjson.loads(response.text.split("\n\n")[-3].removeprefix("data: "))["error"]["code"] == "concluding_failed"
    request_id = response.headers["x-request-id"]
    wait_until(lambda: "acc-judge" in call_rows(accounts, request_id))
    judge = call_rows(accounts, request_id)["acc-judge"]
    assert (judge["status"], judge["error_type"], judge["usage_estimated"]) == ("error", "truncated", 1)
    assert judge["completion_tokens"] == tokens("one two three ")  # what it streamed before the cut
    assert judge["prompt_tokens"] > 0
    usage = {"prompt_tokens": judge["prompt_tokens"], "completion_tokens": judge["completion_tokens"]}
    assert Decimal(judge["cost_pico"]) / 10**12 == account_price(usage)


JUDGED = "one two three four five six"


def test_a_call_that_never_reached_its_provider_costs_nothing(accounts: Service, fake: FakeUpstream) -> None:
    fake.configure({"acc-one": {"text": "Here."}, "acc-judge": {"text": "Done."}})
    body = accounts.chat("acc-refused", messages=QUESTION).json()
    gone = {m["name"]: m for m in body["mom"]["members"]}["acc-gone"]
    assert (gone["status"], gone["reason"]) == ("error", "connection")
    assert (gone["usage"], gone["usage_estimated"], gone["cost"]) == (None, False, 0)
    assert body["mom"]["usage_estimated"] is False


def test_a_call_refused_with_an_error_status_costs_nothing(accounts: Service, fake: FakeUpstream) -> None:
    fake.configure({"acc-tardy": {"status": 400}, "acc-one": {"text": "Here."}, "acc-judge": {"text": "Done."}})
    body = accounts.chat("acc-timeout", messages=QUESTION).json()
    refused = {m["name"]: m for m in body["mom"]["members"]}["acc-tardy"]
    assert (refused["status"], refused["reason"], refused["usage"], refused["cost"]) == ("error", "http_error", None, 0)
