"""A bug inside the engine still ends every request in OpenAI's shape, and is logged, counted and recorded once.

The service is the real one, started as users start it, with one stand-in installed first (tests/patched_service.py,
`engine_bug`): building the concluding LLM's messages raises, after the panel has answered. With the response
cache on, the run happens in the single flight's pump task, where an exception used to vanish.
"""

from __future__ import annotations

import sqlite3
from typing import Any

import httpx
import orjson
import pytest

from tests.api.test_metrics import grew, scrape
from tests.conftest import Service, StartService, panel_config, wait_until
from tests.fake_upstream import FakeUpstream
from tests.openai_schema import validate

BUG = "injected engine bug"
LOGGED = f"RuntimeError: {BUG}"  # the last line of its traceback in the log: once per failed request


@pytest.fixture(scope="module", params=["cache", "no-cache"])
def buggy(request: pytest.FixtureRequest, fake_server: FakeUpstream, start_service: StartService) -> Service:
    cache = "true" if request.param == "cache" else "false"
    return start_service(panel_config(fake_server), {"MOM_CACHE_ENABLED": cache}, patch="engine_bug")


def question(text: str) -> list[dict[str, Any]]:
    return [{"role": "user", "content": text}]


def records(service: Service) -> list[tuple[Any, ...]]:
    with sqlite3.connect(service.workdir / "data" / "mom.db") as db:
        return db.execute("SELECT status, error_type, members_ok FROM mom_requests").fetchall()


def assert_internal_error(error: dict[str, Any]) -> None:
    validate(error, "ErrorResponse")
    assert error["error"]["type"] == "server_error"
    assert error["error"]["code"] == "internal_error"
    text = orjson.dumps(error).decode()
    assert BUG not in text and "Traceback" not in text and "RuntimeError" not in text  # nothing of the bug


def test_a_whole_answer_is_a_500_internal_error(buggy: Service, fake: FakeUpstream) -> None:
    before, logged = scrape(buggy), buggy.log().count(LOGGED)
    response = buggy.chat(messages=question("Whole, please."))
    assert response.status_code == 500
    assert_internal_error(response.json())
    assert {e["model"] for e in fake.log()} == {"alpha", "beta", "gamma"}  # the panel ran; no concluding call
    # logged once, with its traceback; counted; recorded
    wait_until(lambda: buggy.log().count(LOGGED) == logged + 1)
    assert "Traceback (most recent call last)" in buggy.log()
    wait_until(lambda: ("error", "internal_error", 3) in records(buggy))
    assert grew(before, scrape(buggy))("mom_requests_total", model="mom", surface="chat", outcome="error") == 1


def test_a_stream_failing_before_its_first_byte_is_a_500(buggy: Service, fake: FakeUpstream) -> None:
    logged = buggy.log().count(LOGGED)
    response = httpx.post(
        f"{buggy.base_url}/chat/completions",
        headers=buggy.headers(),
        json={"model": "mom", "messages": question("Streamed, please."), "stream": True},
        timeout=30,
    )
    assert response.status_code == 500
    assert response.headers["content-type"].startswith("application/json")
    assert_internal_error(response.json())
    wait_until(lambda: buggy.log().count(LOGGED) == logged + 1)


def test_a_stream_failing_after_its_first_byte_ends_with_an_error_event_then_done(
    buggy: Service, fake: FakeUpstream
) -> None:
    """With the thinking context on, the members' blocks are sent before the synthesis: the 200 has begun."""
    before, logged = scrape(buggy), buggy.log().count(LOGGED)
    body = {"model": "mom-think", "messages": question("Think first."), "stream": True}
    response = httpx.post(f"{buggy.base_url}/chat/completions", headers=buggy.headers(), json=body, timeout=30)
    assert response.status_code == 200
    frames = [f.removeprefix("data: ") for f in response.text.split("\n\n") if f.strip()]
    assert frames[-1] == "[DONE]"
    assert_internal_error(orjson.loads(frames[-2]))
    chunks = [orjson.loads(f) for f in frames[:-2]]
    for chunk in chunks:
        validate(chunk, "CreateChatCompletionStreamResponse")
    content = "".join(c["choices"][0]["delta"].get("content") or "" for c in chunks)
    assert content.startswith("<think>\n") and "Model: alpha" in content  # what was sent before the failure
    wait_until(lambda: buggy.log().count(LOGGED) == logged + 1)
    assert grew(before, scrape(buggy))("mom_requests_total", model="mom-think", surface="chat", outcome="error") == 1
