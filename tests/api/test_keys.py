"""API keys on SQLite (docs/keys.md), through the live service, the official clients, raw httpx and `mom-service keys`:
the admin API behind its own token; a key's life cycle through the admin API and through the CLI, with its audit
rows (never the key); each refusal (401, 403, 429 budget, 429 rate) with no upstream call; the rate-limit headers; a
budget reached mid-way through a series; usage grouped by key, and a key reading only its own.

The checks are functions of a service and a way to read its audit table, so that tests/integration/test_keys_postgres.py
runs the same ones on PostgreSQL."""

from __future__ import annotations

import getpass
import os
import re
import sqlite3
import subprocess
import sys
import time
from collections.abc import Callable
from decimal import Decimal
from typing import Any

import anthropic
import httpx
import openai
import orjson
import pytest
from prometheus_client.parser import text_string_to_metric_families

from mom_service.api.admin_auth import admin_id
from mom_service.usage.keys import new_key
from tests.api.test_mcp import eventually, session_of
from tests.conftest import TOKEN, Service, StartService, llm, wait_until
from tests.fake_upstream import FakeUpstream

ADMIN = "admin-token-abcdef123456"
MEMBERS, JUDGE = ("ky-one", "ky-two"), "ky-judge"
OURS = frozenset({*MEMBERS, JUDGE})
PRICE = {"input_per_million": "10", "output_per_million": "30"}
CEILING = 20  # every LLM's max_tokens: a request's worst case stays near its cost
QUESTION = [{"role": "user", "content": "What does this key allow?"}]
MAX_KEYS = 2  # MOM_METRICS_MAX_KEYS
AuditRows = Callable[[], list[tuple[str, str, str | None, str | None]]]  # (actor, action, target, details)


def keys_config(fake: FakeUpstream) -> dict[str, Any]:
    extra = {"pricing": PRICE, "params": {"max_tokens": CEILING}, "retries": 0}
    return {
        "llm_definitions": [llm(name, fake, **extra) for name in (*MEMBERS, JUDGE)],
        "models": [
            {"name": "ky", "llms_to_query": list(MEMBERS), "concluding_llm": JUDGE},
            {"name": "ky-other", "llms_to_query": [MEMBERS[0]], "concluding_llm": JUDGE},
        ],
    }


def keys_env(**extra: str) -> dict[str, str]:
    return {
        "ADMIN_TOKEN": ADMIN,
        "MOM_KEY_CACHE_SECONDS": "0.5",
        "MOM_METRICS_MAX_KEYS": str(MAX_KEYS),
        "MOM_MCP_ENABLED": "true",
        **extra,
    }


def configure(fake: FakeUpstream) -> None:
    fake.configure(
        {
            **{name: {"text": f"{name} answers briefly."} for name in MEMBERS},
            JUDGE: {"text": "The panel agrees on a short answer.", "prompt_tokens": 60},
        }
    )


@pytest.fixture(scope="module")
def keyed(fake_server: FakeUpstream, start_service: StartService) -> Service:
    """A service of this module's own (its own SQLite database) with the admin API on."""
    return start_service(keys_config(fake_server), keys_env())


@pytest.fixture
def fake(fake_server: FakeUpstream) -> FakeUpstream:
    fake_server.reset()
    configure(fake_server)
    return fake_server


def sqlite_audit(service: Service) -> AuditRows:
    def rows() -> list[tuple[str, str, str | None, str | None]]:
        with sqlite3.connect(service.workdir / "data" / "mom.db") as db:
            found = db.execute("SELECT actor, action, target, details FROM mom_audit ORDER BY created_ms, rowid")
            return [tuple(row) for row in found]  # type: ignore[misc]

    return rows


# ------------------------------------------------------------------------------------------------ helpers


def admin(service: Service, method: str, path: str, token: str | None = ADMIN, **kwargs: Any) -> httpx.Response:
    headers = {"Authorization": f"Bearer {token}"} if token is not None else {}
    return httpx.request(method, f"{service.url}/admin/keys{path}", headers=headers, timeout=30, **kwargs)


def make_key(service: Service, **fields: Any) -> tuple[dict[str, Any], str]:
    """A new key with these fields: its record and the key."""
    response = admin(service, "POST", "", json={"name": f"team-{time.monotonic_ns()}", **fields})
    assert response.status_code == 201, response.text
    body: dict[str, Any] = response.json()
    return {k: v for k, v in body.items() if k != "key"}, body["key"]


def chat(service: Service, key: str, model: str = "ky", **extra: Any) -> httpx.Response:
    return httpx.post(
        f"{service.base_url}/chat/completions",
        headers={"Authorization": f"Bearer {key}"},
        json={"model": model, "messages": QUESTION, **extra},
        timeout=30,
    )


def error_of(response: httpx.Response, status: int, code: str) -> dict[str, Any]:
    assert response.status_code == status, response.text
    error: dict[str, Any] = response.json()["error"]
    assert error["code"] == code, error
    return error


def upstream(fake: FakeUpstream) -> list[str]:
    return sorted(e["model"] for e in fake.log() if e["model"] in OURS)


def usage_of(service: Service, token: str, **params: Any) -> dict[str, Any]:
    response = httpx.get(
        f"{service.base_url}/metrics/usage", headers={"Authorization": f"Bearer {token}"}, params=params, timeout=30
    )
    assert response.status_code == 200, response.text
    body: dict[str, Any] = response.json()
    return body


def spend_of(service: Service, key_id: str) -> dict[str, Any]:
    response = admin(service, "GET", f"/{key_id}/spend")
    assert response.status_code == 200, response.text
    body: dict[str, Any] = response.json()
    return body


def cli(service: Service, *args: str, database_url: str | None = None) -> subprocess.CompletedProcess[str]:
    """`mom-service keys ...` in the service's working directory (its config.yaml; its database by default)."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("API_TOKEN", "ADMIN_TOKEN", "MOM_", "DATABASE"))}
    if database_url is not None:
        env["DATABASE_URL"] = database_url
    return subprocess.run(
        [sys.executable, "-m", "mom_service.cli", "keys", *args],
        cwd=service.workdir,
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )


# ------------------------------------------------------------------------------------------- the checks


def check_admin_token(service: Service, key: str) -> None:
    """Only ADMIN_TOKEN opens the admin API: no token, a wrong one, an API token and a key are 401s."""
    for token in (None, "not-the-admin-token", TOKEN, key):
        response = admin(service, "GET", "", token=token)
        error = error_of(response, 401, "invalid_api_key")
        assert response.headers["www-authenticate"] == "Bearer"
        assert "admin" in error["message"]


def check_admin_life_cycle(service: Service, fake: FakeUpstream, audit: AuditRows) -> None:
    before = len(audit())
    record, key = make_key(service, name="team-life", owner="research", models=["ky"])
    assert key.startswith("mom-") and record["prefix"] == key[:12]
    assert record["models"] == ["ky"] and record["owner"] == "research" and record["disabled"] is False
    listed = admin(service, "GET", "")
    assert record in listed.json()["data"] and key not in listed.text and key[12:] not in listed.text
    assert admin(service, "GET", f"/{record['id']}").json() == record

    # the key answers through the official clients, as bearer (OpenAI's) and as x-api-key (Anthropic's)
    answer = openai.OpenAI(base_url=service.base_url, api_key=key, max_retries=0).chat.completions.create(
        model="ky",
        messages=QUESTION,  # type: ignore[arg-type]
    )
    assert answer.choices[0].message.content == "The panel agrees on a short answer."
    message = anthropic.Anthropic(base_url=service.url, api_key=key, max_retries=0).messages.create(
        model="ky",
        max_tokens=100,
        messages=QUESTION,  # type: ignore[arg-type]
    )
    assert message.content[0].type == "text"
    error_of(chat(service, key, "ky-other"), 403, "model_not_allowed")

    # changed: any field; null clears one (all models allowed again)
    changed = admin(service, "PATCH", f"/{record['id']}", json={"name": "team-renamed", "models": None})
    assert changed.status_code == 200 and changed.json()["name"] == "team-renamed" and changed.json()["models"] is None
    assert chat(service, key, "ky-other").status_code == 200
    refused = admin(service, "PATCH", f"/{record['id']}", json={"name": "x", "colour": "red"})
    assert error_of(refused, 400, "invalid_value")["param"] == "colour"
    assert admin(service, "GET", f"/{record['id']}").json()["name"] == "team-renamed"  # unchanged by the refusal

    # disabled: refused at once on this replica; enabled again
    assert admin(service, "PATCH", f"/{record['id']}", json={"disabled": True}).json()["disabled"] is True
    assert "disabled" in error_of(chat(service, key), 401, "invalid_api_key")["message"]
    assert admin(service, "PATCH", f"/{record['id']}", json={"disabled": False}).status_code == 200
    assert chat(service, key).status_code == 200

    deleted = admin(service, "DELETE", f"/{record['id']}")
    assert deleted.json() == {"object": "api_key", "id": record["id"], "deleted": True}
    error_of(chat(service, key), 401, "invalid_api_key")
    for method, body in (("GET", None), ("PATCH", {"disabled": True}), ("DELETE", None)):
        error_of(admin(service, method, f"/{record['id']}", json=body), 404, "key_not_found")
    assert record["id"] not in [k["id"] for k in admin(service, "GET", "").json()["data"]]

    rows = audit()[before:]
    who = admin_id(ADMIN.encode())
    expected = ["key.create", "key.update", "key.disable", "key.update", "key.delete"]
    assert [(r[0], r[1], r[2]) for r in rows] == [(who, action, record["id"]) for action in expected]
    assert not any(key in str(row) or key[12:] in str(row) for row in rows)
    assert key not in service.log() and key[12:] not in service.log()


def check_cli_life_cycle(service: Service, audit: AuditRows, database_url: str | None = None) -> None:
    before = len(audit())
    made = cli(
        service, "create", "--name", "cli-team", "--models", "ky", "--budget-usd", "5", database_url=database_url
    )
    assert made.returncode == 0, made.stderr
    created = orjson.loads(made.stdout)
    key, key_id = created["key"], created["id"]
    assert "not shown again" in made.stderr
    assert created["budget_usd"] == 5.0 and created["budget_period"] == "month" and created["models"] == ["ky"]
    assert chat(service, key).status_code == 200  # the service knows it: the same database

    listed = cli(service, "list", database_url=database_url)
    assert listed.returncode == 0 and key not in listed.stdout and key[12:] not in listed.stdout
    assert next(k for k in orjson.loads(listed.stdout) if k["id"] == key_id)["name"] == "cli-team"

    disabled = cli(service, "disable", key_id, database_url=database_url)
    assert disabled.returncode == 0 and orjson.loads(disabled.stdout)["disabled"] is True
    wait_until(lambda: chat(service, key).status_code == 401)  # once the service's cached record is read again

    gone = cli(service, "delete", key_id, database_url=database_url)
    assert gone.returncode == 0 and orjson.loads(gone.stdout)["deleted"] is True
    assert key_id not in cli(service, "list", database_url=database_url).stdout
    again = cli(service, "disable", key_id, database_url=database_url)
    assert again.returncode == 1 and "no API key has the id" in again.stderr
    wrong = cli(service, "create", "--name", "x", "--models", "nope", database_url=database_url)
    assert wrong.returncode == 2 and "'nope'" in wrong.stderr

    rows = audit()[before:]
    who = f"cli:{getpass.getuser()}"
    assert [(r[0], r[1], r[2]) for r in rows] == [(who, a, key_id) for a in ("key.create", "key.disable", "key.delete")]
    assert not any(key in str(row) for row in rows)


def check_usage_by_key(service: Service, fake: FakeUpstream) -> None:
    since = time.time()
    first, first_key = make_key(service)
    second, second_key = make_key(service)
    for key in (first_key, first_key, second_key, TOKEN):
        assert chat(service, key).status_code == 200
    wait_until(lambda: usage_of(service, TOKEN, start=since)["totals"]["requests"] == 4)

    mine = usage_of(service, first_key, start=since)
    assert mine["totals"]["requests"] == 2
    groups = usage_of(service, first_key, start=since, group_by="key")["groups"]
    assert [(g["key"], g["name"], g["requests"]) for g in groups] == [(first["id"], first["name"], 2)]
    per_llm = usage_of(service, first_key, start=since, group_by="llm")["groups"]
    assert {g["key"]: g["requests"] for g in per_llm} == dict.fromkeys(OURS, 2)
    assert usage_of(service, second_key, start=since)["totals"]["requests"] == 1

    everyone = usage_of(service, TOKEN, start=since, group_by="key")["groups"]
    by_key = {g["key"]: (g["name"], g["requests"]) for g in everyone}
    assert by_key == {first["id"]: (first["name"], 2), second["id"]: (second["name"], 1), "api_token": (None, 1)}
    first_cost = Decimal(repr(mine["totals"]["cost"]))
    spent = spend_of(service, first["id"])
    assert (spent["requests"], Decimal(repr(spent["spent_usd"]))) == (2, first_cost)


def check_refusals(service: Service, fake: FakeUpstream) -> None:
    def refused(response: httpx.Response, status: int, code: str) -> dict[str, Any]:
        error = error_of(response, status, code)
        assert upstream(fake) == [], "a refused request reached an upstream LLM"
        return error

    off, disabled = make_key(service)
    assert admin(service, "PATCH", f"/{off['id']}", json={"disabled": True}).status_code == 200
    _, narrow = make_key(service, models=["ky-other"])
    _, poor = make_key(service, budget_usd=0.000001, budget_period="day")
    _, slow = make_key(service, rpm_limit=1)
    _, soon = make_key(service, expires_at=time.time() + 2)
    assert chat(service, slow).status_code == 200 and chat(service, soon).status_code == 200
    wait_until(lambda: chat(service, soon).status_code == 401)  # expired (and its record read again)
    fake.clear_log()

    assert refused(chat(service, new_key()), 401, "invalid_api_key")["message"] == "Incorrect API token."
    refused(chat(service, "mom-not-a-key"), 401, "invalid_api_key")
    assert "disabled" in refused(chat(service, disabled), 401, "invalid_api_key")["message"]
    assert "expired at" in refused(chat(service, soon), 401, "invalid_api_key")["message"]
    assert refused(chat(service, narrow), 403, "model_not_allowed")["type"] == "permission_error"
    with pytest.raises(openai.PermissionDeniedError):
        openai.OpenAI(base_url=service.base_url, api_key=narrow, max_retries=0).chat.completions.create(
            model="ky",
            messages=QUESTION,  # type: ignore[arg-type]
        )
    with pytest.raises(anthropic.PermissionDeniedError):
        anthropic.Anthropic(base_url=service.url, api_key=narrow, max_retries=0).messages.create(
            model="ky",
            max_tokens=10,
            messages=QUESTION,  # type: ignore[arg-type]
        )
    over = chat(service, poor)
    assert refused(over, 429, "budget_exceeded")["type"] == "insufficient_quota"
    assert int(over.headers["retry-after"]) >= 1
    with pytest.raises(openai.RateLimitError) as raised:
        openai.OpenAI(base_url=service.base_url, api_key=poor, max_retries=0).chat.completions.create(
            model="ky",
            messages=QUESTION,  # type: ignore[arg-type]
        )
    assert raised.value.code == "budget_exceeded"
    limited = chat(service, slow)
    assert "1 requests per minute for this API key" in refused(limited, 429, "rate_limit_exceeded")["message"]
    assert limited.headers["x-ratelimit-remaining-requests"] == "0" and int(limited.headers["retry-after"]) >= 1
    assert upstream(fake) == []


def check_tokens_per_minute(service: Service, fake: FakeUpstream) -> None:
    _, key = make_key(service, tpm_limit=50)
    first = chat(service, key)
    assert first.status_code == 200 and first.headers["x-ratelimit-remaining-tokens"] == "50"
    assert first.json()["usage"]["total_tokens"] > 50  # its tokens fill the window once they are counted
    # The count is added as an answer ends (the next request may come first), and a minute's boundary weighs the
    # previous minute's count a little less (a sliding window counter): within a few requests, the window is full.
    answered = 1
    for _ in range(4):
        response = chat(service, key)
        if response.status_code == 429:
            break
        answered += 1
    error = error_of(response, 429, "rate_limit_exceeded")
    assert "50 tokens per minute" in error["message"] and response.headers["x-ratelimit-remaining-tokens"] == "0"
    assert answered <= 3 and upstream(fake).count(JUDGE) == answered


def check_rate_limit_headers(service: Service, fake: FakeUpstream) -> None:
    _, key = make_key(service, rpm_limit=5, tpm_limit=100_000)
    whole = chat(service, key)
    with httpx.stream(
        "POST",
        f"{service.base_url}/chat/completions",
        headers={"Authorization": f"Bearer {key}"},
        json={"model": "ky", "messages": QUESTION, "stream": True},
        timeout=30,
    ) as streamed:
        streamed.read()
    messages = httpx.post(
        f"{service.url}/v1/messages",
        headers={"x-api-key": key, "anthropic-version": "2023-06-01"},
        json={"model": "ky", "max_tokens": 50, "messages": QUESTION},
        timeout=30,
    )
    responses = httpx.post(
        f"{service.base_url}/responses",
        headers={"Authorization": f"Bearer {key}"},
        json={"model": "ky", "input": "What does this key allow?"},
        timeout=30,
    )
    answers = [whole, streamed, messages, responses]
    assert [r.status_code for r in answers] == [200] * 4
    assert [r.headers["x-ratelimit-remaining-requests"] for r in answers] == ["4", "3", "2", "1"]
    tokens_used = whole.json()["usage"]["total_tokens"]
    for response in answers:
        assert response.headers["x-ratelimit-limit-requests"] == "5"
        assert re.fullmatch(r"\d+s", response.headers["x-ratelimit-reset-requests"])
        assert response.headers["x-ratelimit-limit-tokens"] == "100000"
        assert re.fullmatch(r"\d+s", response.headers["x-ratelimit-reset-tokens"])
    remaining_tokens = [int(r.headers["x-ratelimit-remaining-tokens"]) for r in answers]
    assert remaining_tokens[0] == 100_000 and remaining_tokens == sorted(remaining_tokens, reverse=True)
    assert 100_000 - 3 * tokens_used <= remaining_tokens[-1] < 100_000  # the first answers' tokens counted by then
    # a static API_TOKEN has no limits here (MOM_RATE_LIMIT_RPM unset): no rate-limit headers
    static = chat(service, TOKEN)
    assert static.status_code == 200 and not [h for h in static.headers if h.startswith("x-ratelimit")]


def check_budget_midway(service: Service, fake: FakeUpstream) -> None:
    budget = Decimal("0.01")
    record, key = make_key(service, budget_usd=str(budget), budget_period="day")
    statuses: list[int] = []
    while len(statuses) < 30 and 429 not in statuses:
        response = chat(service, key)
        statuses.append(response.status_code)
    answered = statuses.count(200)
    assert statuses == [200] * answered + [429] and answered >= 2, statuses
    message = error_of(response, 429, "budget_exceeded")["message"]
    spent_text, worst_text = re.findall(r"\$(\d+(?:\.\d+)?)", message)[1:3]
    spent, worst = Decimal(spent_text), Decimal(worst_text)
    assert f"budget of ${budget} per day" in message
    assert Decimal(0) < spent <= budget < spent + worst  # some left, not enough for this request's worst case
    wait_until(lambda: spend_of(service, record["id"])["requests"] == answered)
    report = spend_of(service, record["id"])
    assert Decimal(repr(report["spent_usd"])) == spent and report["period"] == "day"
    assert Decimal(repr(report["remaining_usd"])) == budget - spent
    error_of(chat(service, key), 429, "budget_exceeded")  # and the next one too
    assert upstream(fake) == sorted([*MEMBERS, JUDGE] * answered)


# ------------------------------------------------------------------------------------------------ the tests


def test_the_admin_api_is_closed_without_admin_token(service: Service) -> None:
    for token in (None, TOKEN, "anything"):
        error_of(admin(service, "GET", "", token=token), 503, "admin_disabled")
    error_of(admin(service, "POST", "", json={"name": "x"}), 503, "admin_disabled")


def test_the_admin_api_answers_its_own_token_only(keyed: Service, fake: FakeUpstream) -> None:
    _, key = make_key(keyed)
    check_admin_token(keyed, key)


def test_a_key_life_cycle_through_the_admin_api(keyed: Service, fake: FakeUpstream) -> None:
    check_admin_life_cycle(keyed, fake, sqlite_audit(keyed))


def test_a_key_life_cycle_through_the_cli(keyed: Service, fake: FakeUpstream) -> None:
    check_cli_life_cycle(keyed, sqlite_audit(keyed))


def test_usage_by_key_and_a_key_reads_only_its_own(keyed: Service, fake: FakeUpstream) -> None:
    check_usage_by_key(keyed, fake)
    _, key = make_key(keyed)  # a third key's requests: more names than MOM_METRICS_MAX_KEYS
    assert chat(keyed, key).status_code == 200
    forbidden = httpx.get(f"{keyed.url}/metrics", headers={"Authorization": f"Bearer {key}"}, timeout=30)
    error_of(forbidden, 403, "metrics_not_allowed")
    scraped = httpx.get(f"{keyed.url}/metrics", headers={"Authorization": f"Bearer {TOKEN}"}, timeout=30)
    families = {f.name: f for f in text_string_to_metric_families(scraped.text)}
    labels = {s.labels["key"] for s in families["mom_key_requests"].samples}
    assert "other" in labels and len(labels - {"other"}) == MAX_KEYS
    assert sum(s.value for s in families["mom_key_cost_usd"].samples if s.name.endswith("_total")) > 0


def test_the_key_is_written_nowhere(keyed: Service, fake: FakeUpstream) -> None:
    record, key = make_key(keyed)
    assert chat(keyed, key).status_code == 200
    wait_until(lambda: spend_of(keyed, record["id"])["requests"] == 1)
    database = b"".join(path.read_bytes() for path in (keyed.workdir / "data").iterdir())  # with its WAL
    assert key.encode() not in database and key[12:].encode() not in database
    assert key not in keyed.log()
    assert record["prefix"].encode() in database  # what is kept to recognize it by


def test_each_refusal_comes_before_any_upstream_call(keyed: Service, fake: FakeUpstream) -> None:
    check_refusals(keyed, fake)


def test_tokens_per_minute_refuse_once_the_window_is_full(keyed: Service, fake: FakeUpstream) -> None:
    check_tokens_per_minute(keyed, fake)


def test_answers_carry_openai_rate_limit_headers(keyed: Service, fake: FakeUpstream) -> None:
    check_rate_limit_headers(keyed, fake)


def test_a_budget_is_reached_midway_through_a_series(keyed: Service, fake: FakeUpstream) -> None:
    check_budget_midway(keyed, fake)


async def test_mcp_holds_a_key_to_its_models_and_its_own_usage(keyed: Service, fake: FakeUpstream) -> None:
    _, narrow = make_key(keyed, models=["ky-other"])
    async with session_of(keyed, {"Authorization": f"Bearer {narrow}"}) as session:
        refused = await session.call_tool("consult", {"question": "Which model?", "model": "ky"})
        assert refused.is_error and "(model_not_allowed)" in refused.content[0].text  # type: ignore[union-attr]
        assert upstream(fake) == []
        answered = await session.call_tool("consult", {"question": "Which model?", "model": "ky-other"})
        assert not answered.is_error and upstream(fake) == sorted([MEMBERS[0], JUDGE])

        async def only_its_own() -> bool:
            report = await session.call_tool("usage", {"group_by": "key"})
            assert not report.is_error and report.structured_content is not None
            return [g["requests"] for g in report.structured_content["groups"]] == [1]

        await eventually(only_its_own)
