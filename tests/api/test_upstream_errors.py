"""What a provider's failure may show: a reason code and a scrubbed message to the client, the concluding LLM and
the usage records (no URLs, hosts, addresses, paths or variable names); the whole text to the log only."""

from __future__ import annotations

import sqlite3
from typing import Any

import orjson
import pytest

from tests.conftest import CallPath, Service, StartService, free_port, llm, wait_until
from tests.fake_upstream import FakeUpstream
from tests.openai_schema import validate

QUESTION = [{"role": "user", "content": "What went wrong?"}]
# what a provider's error text may carry about the network behind it
PROVIDER_TEXT = (
    "backend http://10.1.2.3:8080/internal/v1 refused: set INTERNAL_ROUTING_TOKEN, "
    "see /var/lib/llm/config.json on gpu-7.cluster.internal:9443"
)
LEAKS = ("10.1.2.3", "8080", "http://", "INTERNAL_ROUTING_TOKEN", "/var/lib", "gpu-7", "cluster.internal", "9443")
MISSING_VAR = "ERR_TEST_MISSING_KEY_VAR"


@pytest.fixture(scope="module")
def failing(fake_server: FakeUpstream, start_service: StartService, call_path: CallPath) -> Service:
    dead_port = free_port()  # nothing listens there
    config: dict[str, Any] = {
        "llm_definitions": [
            llm("err-said", fake_server, retries=0),
            llm("err-gone", fake_server, retries=0, api_base=f"http://127.0.0.1:{dead_port}/v1"),
            llm("err-keyless", fake_server, retries=0, api_key_env=MISSING_VAR),
            llm("err-ok", fake_server),
            llm("err-judge", fake_server),
        ],
        "models": [
            {
                "name": "err-mom",
                "llms_to_query": ["err-said", "err-gone", "err-keyless", "err-ok"],
                "concluding_llm": "err-judge",
            },
            {
                "name": "err-none",
                "llms_to_query": ["err-said", "err-gone", "err-keyless"],
                "concluding_llm": "err-judge",
            },
        ],
    }
    return start_service(config, call_path.env)


def assert_clean(text: str) -> None:
    for leak in (*LEAKS, MISSING_VAR, "127.0.0.1"):
        assert leak not in text, (leak, text)


def test_members_failures_are_scrubbed_everywhere_but_the_log(failing: Service, fake: FakeUpstream) -> None:
    fake.configure({"err-said": {"status": 500, "error_message": PROVIDER_TEXT}, "err-ok": {"text": "Fine."}})
    response = failing.chat("err-mom", messages=QUESTION)
    assert response.status_code == 200
    members = {m["name"]: m for m in response.json()["mom"]["members"]}
    said, gone, keyless = members["err-said"], members["err-gone"], members["err-keyless"]
    assert (said["reason"], gone["reason"], keyless["reason"]) == ("http_error", "connection", "missing_key")
    assert said["error"] == ("upstream HTTP 500: backend <url> refused: set <name>, see <path> on <host>"), said[
        "error"
    ]
    assert gone["error"] == "could not connect to the provider"
    assert keyless["error"] == "no API key is configured for this LLM"
    assert_clean(orjson.dumps(response.json()).decode())
    # the concluding LLM reads the same scrubbed reasons
    judge = next(e for e in fake.log() if e["model"] == "err-judge")
    panel = judge["body"]["messages"][-1]["content"]
    assert "(no answer: upstream HTTP 500: backend <url> refused" in panel
    assert_clean(orjson.dumps(judge["body"]).decode())
    # the usage records keep the scrubbed message
    request_id = response.headers["x-request-id"]
    with sqlite3.connect(failing.workdir / "data" / "mom.db") as db:
        query = "SELECT llm, error_type, error FROM mom_calls WHERE request_id = ? AND status = 'error'"
        wait_until(lambda: len(db.execute(query, (request_id,)).fetchall()) == 3)
        rows = {llm: (kind, error) for llm, kind, error in db.execute(query, (request_id,))}
    assert rows["err-said"] == ("http_error", said["error"])
    for _, error in rows.values():
        assert_clean(error)
    # the whole text reaches the log (redacted of secrets only), for the operator
    log = failing.log()
    assert "http://10.1.2.3:8080/internal/v1" in log and "gpu-7.cluster.internal:9443" in log
    assert MISSING_VAR in log


@pytest.mark.parametrize("stream", [False, True])
def test_a_502_names_the_failures_scrubbed(failing: Service, fake: FakeUpstream, stream: bool) -> None:
    fake.configure({"err-said": {"status": 503, "error_message": PROVIDER_TEXT}})
    response = failing.chat("err-none", messages=QUESTION, stream=stream)
    assert response.status_code == 502
    error = response.json()
    validate(error, "ErrorResponse")
    assert error["error"]["code"] == "members_failed"
    message = error["error"]["message"]
    assert "err-gone: could not connect to the provider" in message
    assert "err-keyless: no API key is configured for this LLM" in message
    assert "err-said: upstream HTTP 503: backend <url> refused" in message
    assert_clean(message)
