"""The usage records and the usage API through the live service: what a request leaves in its database (SQLite, in
the service's working directory) agrees with its answer, and the usage API reports it within a bounded range."""

from __future__ import annotations

import sqlite3
import time
from typing import Any

import httpx
import pytest

from tests.api.test_images import image_question
from tests.conftest import Service, StartService, panel_config, wait_until
from tests.fake_upstream import FakeUpstream

QUESTION = [{"role": "user", "content": "Who answers first?"}]


@pytest.fixture(scope="module")
def recorded(fake_server: FakeUpstream, start_service: StartService) -> Service:
    """The standard test panel, plus a MoM model that starts synthesis once two of its three members answered."""
    config = panel_config(fake_server)
    config["models"].append(
        {"name": "mom-quorum", "llms_to_query": ["alpha", "beta", "gamma"], "concluding_llm": "judge", "quorum": 2}
    )
    return start_service(config)


def usage_api(service: Service, **params: Any) -> httpx.Response:
    return httpx.get(f"{service.base_url}/metrics/usage", headers=service.headers(), params=params, timeout=10)


def request_row(service: Service, request_id: str) -> dict[str, Any]:
    """The request's row in the service's SQLite database, once the background writer committed it."""
    with sqlite3.connect(service.workdir / "data" / "mom.db") as db:
        db.row_factory = sqlite3.Row
        select = "SELECT * FROM mom_requests WHERE id = ?"
        wait_until(lambda: db.execute(select, (request_id,)).fetchone() is not None)
        return dict(db.execute(select, (request_id,)).fetchone())


def test_members_asked_in_the_record_is_the_answers_asked(recorded: Service, fake: FakeUpstream) -> None:
    # beta (multimodal: false) and gamma (unknown to LiteLLM) cannot see the image: skipped, not asked
    fake.configure({"alpha": {"text": "A red bicycle."}, "judge": {"text": "It shows a red bicycle."}})
    response = recorded.chat("mom", messages=image_question())
    assert response.status_code == 200
    mom = response.json()["mom"]
    assert [m["status"] for m in mom["members"]] == ["ok", "skipped", "skipped"]
    row = request_row(recorded, response.headers["x-request-id"])
    assert (row["members_asked"], row["members_ok"]) == (mom["asked"], mom["answered"]) == (1, 1)


def test_estimated_usage_of_a_cut_off_member_is_counted(recorded: Service, fake: FakeUpstream) -> None:
    # alpha and beta answer after 0.3 s, so that gamma's call is surely on the wire (hanging) when the quorum cuts
    # it off: its input is counted by our estimate, not reported by the provider
    fake.configure({"alpha": {"ttft_ms": 300}, "beta": {"ttft_ms": 300}, "gamma": {"hang": True}})
    start = time.time() - 1
    response = recorded.chat("mom-quorum", messages=QUESTION)
    assert response.status_code == 200
    members = {m["name"]: m for m in response.json()["mom"]["members"]}
    assert members["gamma"]["status"] == "cancelled" and members["gamma"]["usage"]["prompt_tokens"] > 0

    row = request_row(recorded, response.headers["x-request-id"])
    assert row["usage_estimated"] == 1
    totals = usage_api(recorded, start=start, model="mom-quorum").json()["totals"]
    assert (totals["requests"], totals["usage_estimated"]) == (1, 1)
    by_llm = usage_api(recorded, start=start, model="mom-quorum", group_by="llm").json()
    assert {g["key"]: g["usage_estimated"] for g in by_llm["groups"]} == {"alpha": 0, "beta": 0, "gamma": 1, "judge": 0}
    assert by_llm["totals"]["usage_estimated"] == 1  # calls: gamma's only
    assert usage_api(recorded, start=start, model="mom-quorum", llm="alpha").json()["totals"]["usage_estimated"] == 0


def test_a_request_with_provider_usage_is_not_estimated(recorded: Service, fake: FakeUpstream) -> None:
    start = time.time() - 1
    response = recorded.chat("mom", messages=QUESTION)
    assert response.status_code == 200
    assert request_row(recorded, response.headers["x-request-id"])["usage_estimated"] == 0
    totals = usage_api(recorded, start=start, model="mom").json()["totals"]
    assert totals["requests"] >= 1 and totals["usage_estimated"] == 0


@pytest.mark.parametrize(
    "params",
    [
        {"start": "2024-01-01T00:00:00Z", "end": "2025-01-02T00:00:00Z"},  # 367 days
        {"start": "2024-01-01", "end": "2025-01-01T00:00:01Z"},  # 366 days and a second
        {"start": "0"},  # from 1970 up to now
        {"start": str(time.time() - 400 * 86_400)},
    ],
)
def test_a_range_over_366_days_is_a_400(recorded: Service, params: dict[str, str]) -> None:
    response = usage_api(recorded, **params)
    assert response.status_code == 400
    body = response.json()
    assert list(body) == ["error"]
    error = body["error"]
    assert set(error) == {"message", "type", "param", "code"}
    assert (error["type"], error["param"], error["code"]) == ("invalid_request_error", "start", "invalid_value")
    assert "366 days" in error["message"]


def test_a_range_of_366_days_is_answered(recorded: Service) -> None:
    response = usage_api(recorded, start="2024-01-01T00:00:00Z", end="2025-01-01T00:00:00Z")  # 2024: a leap year
    assert response.status_code == 200
    assert response.json()["period"] == {"start": "2024-01-01T00:00:00Z", "end": "2025-01-01T00:00:00Z"}
