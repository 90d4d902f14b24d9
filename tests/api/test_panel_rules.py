"""Per MoM model: min_successful, quorum and member_deadline_ms decide when synthesis starts."""

from __future__ import annotations

import sqlite3
import time
from decimal import Decimal
from typing import Any

import orjson
import pytest

from tests.conftest import CallPath, Service, StartService, answer_of, llm, wait_until
from tests.fake_upstream import FakeUpstream

QUESTION = [{"role": "user", "content": "Who answers first?"}]
PRICE = {"input_per_million": "2", "output_per_million": "8"}
MEMBERS = ["qa", "qb", "qc"]


@pytest.fixture(scope="module")
def ruled(fake_server: FakeUpstream, start_service: StartService, call_path: CallPath) -> Service:
    config: dict[str, Any] = {
        "llm_definitions": [
            llm(name, fake_server, retries=0, timeout=10, pricing=PRICE) for name in [*MEMBERS, "qj", "qk", "ql"]
        ],
        "models": [
            {"name": "quorum-2", "llms_to_query": MEMBERS, "concluding_llm": "qj", "quorum": 2},
            {"name": "deadline", "llms_to_query": MEMBERS, "concluding_llm": "qj", "member_deadline_ms": 500},
            {
                "name": "deadline-min-2",
                "llms_to_query": MEMBERS,
                "concluding_llm": "qj",
                "member_deadline_ms": 300,
                "min_successful": 2,
            },
            {"name": "min-2", "llms_to_query": MEMBERS, "concluding_llm": "qj", "min_successful": 2},
            {
                "name": "fallbacks",
                "llms_to_query": ["qa"],
                "concluding_llm": "qj",
                "concluding_fallbacks": ["qk", "ql"],
            },
        ],
    }
    return start_service(config, call_path.env)


def members(body: dict[str, Any]) -> dict[str, dict[str, Any]]:
    return {m["name"]: m for m in body["mom"]["members"]}


def test_quorum_starts_synthesis_and_cancels_the_rest(ruled: Service, fake: FakeUpstream) -> None:
    # qa and qb answer after 0.5 s, so that qc's call is surely on the wire (hanging) when the quorum cuts it off
    fake.configure({"qa": {"ttft_ms": 500}, "qb": {"ttft_ms": 500}, "qc": {"hang": True}, "qj": {"text": "From two."}})
    started = time.monotonic()
    body = ruled.chat("quorum-2", messages=QUESTION).json()
    assert time.monotonic() - started < 3  # qc would hang for its whole 10 s timeout
    assert body["choices"][0]["message"]["content"] == "From two."
    found = members(body)
    assert found["qa"]["status"] == found["qb"]["status"] == "ok"
    assert found["qc"]["status"] == "cancelled" and "quorum of 2" in found["qc"]["error"]
    assert body["mom"]["answered"] == 2 and body["mom"]["asked"] == 3 and body["mom"]["degraded"] is True
    fake.wait_for(lambda log: any(e["model"] == "qc" and e["outcome"] == "disconnected" for e in log))
    # the cut-off member's input was sent (and is billed): counted by our estimate, at its price; no output seen
    cut = found["qc"]["usage"]
    assert cut["prompt_tokens"] > 0 and cut["completion_tokens"] == 0
    assert Decimal(str(found["qc"]["cost"])) == Decimal(cut["prompt_tokens"]) * 2 / 1_000_000
    total = sum(Decimal(str(m["cost"])) for m in body["mom"]["members"]) + Decimal(
        str(body["mom"]["concluding"]["cost"])
    )
    assert Decimal(str(body["mom"]["cost"])) == total
    with sqlite3.connect(ruled.workdir / "data" / "mom.db") as db:
        wait_until(lambda: db.execute("SELECT count(*) FROM mom_calls WHERE llm = 'qc'").fetchone()[0] > 0)
        row = db.execute("SELECT status, usage_estimated, prompt_tokens FROM mom_calls WHERE llm = 'qc'").fetchone()
    assert row == ("cancelled", 1, cut["prompt_tokens"])
    judge = next(e for e in fake.log() if e["model"] == "qj")
    # the concluding LLM is told the cut-off member gave no answer
    assert (
        'name="qc" status="cancelled">\n(no answer: cut off: the quorum of 2 had answered)'
        in (judge["body"]["messages"][-1]["content"])
    )


def test_member_deadline_starts_synthesis_with_the_answers_in_hand(ruled: Service, fake: FakeUpstream) -> None:
    fake.configure({"qc": {"ttft_ms": 5000}})
    started = time.monotonic()
    body = ruled.chat("deadline", messages=QUESTION, stream=True, stream_options={"include_usage": True})
    elapsed = time.monotonic() - started
    assert body.status_code == 200
    assert 0.4 < elapsed < 3
    usage_chunk = next(line for line in body.text.split("\n\n") if '"choices":[]' in line)
    assert '"name":"qc","model":"openai/qc","status":"cancelled"' in usage_chunk
    assert "member_deadline_ms (500) passed" in usage_chunk


def test_deadline_waits_on_when_too_few_have_answered(ruled: Service, fake: FakeUpstream) -> None:
    fake.configure({"qb": {"ttft_ms": 900}, "qc": {"status": 500}})
    started = time.monotonic()
    body = ruled.chat("deadline-min-2", messages=QUESTION).json()
    elapsed = time.monotonic() - started
    assert elapsed >= 0.9  # past the 300 ms deadline only one had answered: it waited for qb
    found = members(body)
    assert found["qa"]["status"] == found["qb"]["status"] == "ok"
    assert found["qc"]["status"] == "error"


def test_past_the_deadline_synthesis_starts_once_enough_have_answered(ruled: Service, fake: FakeUpstream) -> None:
    fake.configure({"qb": {"ttft_ms": 900}, "qc": {"hang": True}})
    started = time.monotonic()
    body = ruled.chat("deadline-min-2", messages=QUESTION).json()
    elapsed = time.monotonic() - started
    # past the 300 ms deadline only qa had answered; qb made two at 0.9 s: no waiting for qc's 10 s timeout
    assert 0.9 <= elapsed < 5
    found = members(body)
    assert found["qa"]["status"] == found["qb"]["status"] == "ok"
    assert found["qc"]["status"] == "cancelled" and "member_deadline_ms" in found["qc"]["error"]


@pytest.mark.parametrize("stream", [False, True])
def test_fewer_than_min_successful_is_a_502_naming_the_failures(
    ruled: Service, fake: FakeUpstream, stream: bool
) -> None:
    fake.configure(
        {"qb": {"status": 500, "error_message": "qb down"}, "qc": {"status": 503, "error_message": "qc down"}}
    )
    response = ruled.chat("min-2", messages=QUESTION, stream=stream)
    assert response.status_code == 502
    error = response.json()["error"]
    assert error["code"] == "members_failed"
    assert "1 of 3 panel members answered, 2 needed" in error["message"]
    assert "qb down" in error["message"] and "qc down" in error["message"]
    assert not [e for e in fake.log() if e["model"] == "qj"]


@pytest.mark.parametrize("stream", [False, True])
def test_concluding_fallback_takes_over_before_the_first_token(
    ruled: Service, fake: FakeUpstream, stream: bool
) -> None:
    fake.configure({"qj": {"status": 500, "error_message": "qj down"}, "qk": {"text": "Concluded by qk."}})
    response = ruled.chat("fallbacks", messages=QUESTION, stream=stream, stream_options={"include_usage": True})
    assert response.status_code == 200
    body, content = answer_of(response, stream)
    assert content == "Concluded by qk."
    mom = body["mom"]
    assert mom["concluding"]["name"] == "qk" and mom["concluding"]["status"] == "ok"
    (failed,) = mom["concluding_fallbacks"]
    assert failed["name"] == "qj" and failed["status"] == "error" and "qj down" in failed["error"]
    assert not [e for e in fake.log() if e["model"] == "ql"]


def test_fallbacks_are_tried_in_order_then_502(ruled: Service, fake: FakeUpstream) -> None:
    fake.configure({"qj": {"status": 500}, "qk": {"status": 503}, "ql": {"text": "Third concludes."}})
    body = ruled.chat("fallbacks", messages=QUESTION).json()
    assert body["choices"][0]["message"]["content"] == "Third concludes."
    assert [r["name"] for r in body["mom"]["concluding_fallbacks"]] == ["qj", "qk"]
    fake.configure({"qj": {"status": 500}, "qk": {"status": 503}, "ql": {"status": 502}})
    response = ruled.chat("fallbacks", messages=QUESTION)
    assert response.status_code == 502
    assert response.json()["error"]["code"] == "concluding_failed"
    assert "'ql'" in response.json()["error"]["message"]


def test_failure_after_tokens_is_not_retried_elsewhere(ruled: Service, fake: FakeUpstream) -> None:
    fake.configure({"qj": {"text": "one two three four", "stop_after_tokens": 2, "token_delay_ms": 100}})
    frames = [p for _, p in ruled.sse({"model": "fallbacks", "messages": QUESTION, "stream": True})]
    assert frames[-1] == "[DONE]"
    assert orjson.loads(frames[-2])["error"]["code"] == "concluding_failed"
    assert not [e for e in fake.log() if e["model"] in ("qk", "ql")]


# ------------------------------------------------------------------------------------------- empty answers


@pytest.mark.parametrize("empty", ["", "  \n "])
def test_an_empty_answer_is_a_failed_member_that_was_paid_for(ruled: Service, fake: FakeUpstream, empty: str) -> None:
    """No content (and no tool call) is not an answer: status error, reason empty_answer; its tokens were billed."""
    fake.configure({"qb": {"text": empty, "prompt_tokens": 50}, "qj": {"text": "From qa and qc."}})
    body = ruled.chat("min-2", messages=QUESTION).json()
    found = members(body)
    assert (found["qb"]["status"], found["qb"]["reason"]) == ("error", "empty_answer")
    assert found["qb"]["usage"]["prompt_tokens"] == 50
    assert Decimal(str(found["qb"]["cost"])) == Decimal(50 * 2 + found["qb"]["usage"]["completion_tokens"] * 8) / 10**6
    assert body["mom"]["answered"] == 2 and body["mom"]["degraded"] is True
    judge = next(e for e in fake.log() if e["model"] == "qj")
    assert 'name="qb" status="error">\n(no answer: ' in judge["body"]["messages"][-1]["content"]


def test_empty_answers_do_not_count_toward_min_successful(ruled: Service, fake: FakeUpstream) -> None:
    fake.configure({"qb": {"text": ""}, "qc": {"text": " "}})
    response = ruled.chat("min-2", messages=QUESTION)
    assert response.status_code == 502
    error = response.json()["error"]
    assert error["code"] == "members_failed" and "1 of 3 panel members answered, 2 needed" in error["message"]
    assert not [e for e in fake.log() if e["model"] == "qj"]


def test_empty_answers_do_not_count_toward_the_quorum(ruled: Service, fake: FakeUpstream) -> None:
    """qa answers nothing at once: the quorum of 2 is reached only when qb and qc have both answered."""
    fake.configure({"qa": {"text": ""}, "qb": {"ttft_ms": 200}, "qc": {"ttft_ms": 600}, "qj": {"text": "From two."}})
    body = ruled.chat("quorum-2", messages=QUESTION).json()
    found = members(body)
    assert (found["qa"]["status"], found["qa"]["reason"]) == ("error", "empty_answer")
    assert found["qb"]["status"] == found["qc"]["status"] == "ok"
    assert body["mom"]["answered"] == 2
