"""Request logs: an X-Request-ID on every answer, and exactly one log line per request, free of secrets."""

from __future__ import annotations

import json
import logging
import re
import sqlite3
import time
import uuid
from datetime import datetime
from typing import Any

import httpx
import orjson
import pytest

from mom_service.main import create_app
from mom_service.settings import Settings
from tests.conftest import FAKE_KEY, TOKEN, Service, StartService, panel_config, wait_until
from tests.fake_upstream import FakeUpstream

QUESTION_TEXT = "Which walrus painted the zeppelin-7f3a?"
QUESTION = [{"role": "user", "content": QUESTION_TEXT}]
REQUEST_LOGGER = "mom_service.requests"
_PAIR = re.compile(r'(\w+)=("(?:[^"\\]|\\.)*"|\S+)')
UUID = re.compile(r"[0-9a-f]{8}-[0-9a-f]{4}-4[0-9a-f]{3}-[89ab][0-9a-f]{3}-[0-9a-f]{12}")


def text_fields(line: str) -> dict[str, str]:
    """The key=value pairs of a text request line (JSON-quoted values unquoted)."""
    message = line.split(f" {REQUEST_LOGGER}: ", 1)[1]
    return {k: json.loads(v) if v.startswith('"') else v for k, v in _PAIR.findall(message)}


def request_lines(service: Service) -> list[str]:
    return [line for line in service.log().splitlines() if f" {REQUEST_LOGGER}: " in line]


def json_request_lines(service: Service) -> list[dict[str, Any]]:
    lines = []
    for line in service.log().splitlines():
        if line.startswith("{"):
            parsed = orjson.loads(line)
            if parsed["logger"] == REQUEST_LOGGER:
                lines.append(parsed)
    return lines


def lines_of(service: Service, request_id: str, *, timeout: float = 10.0) -> list[dict[str, str]]:
    """The text lines of one request, once its request has ended: a later request's line is waited for, as every
    line of an earlier request is written before it (each when its request ends, before the next one starts)."""
    sentinel = f"after-{uuid.uuid4().hex}"
    assert httpx.get(f"{service.url}/no-such-path", headers={"X-Request-ID": sentinel}).status_code == 404

    def found(request: str) -> list[dict[str, str]]:
        return [f for f in map(text_fields, request_lines(service)) if f["request_id"] == request]

    wait_until(lambda: bool(found(sentinel)), timeout=timeout)
    return found(request_id)


def one_line(service: Service, request_id: str) -> dict[str, str]:
    lines = lines_of(service, request_id)
    assert len(lines) == 1, lines
    return lines[0]


def post(service: Service, body: Any, request_id: str | None = None, token: str | None = TOKEN) -> httpx.Response:
    headers = service.headers(token) if token else {}
    if request_id is not None:
        headers["X-Request-ID"] = request_id
    content = body if isinstance(body, bytes) else orjson.dumps(body)
    headers["Content-Type"] = "application/json"
    return httpx.post(f"{service.base_url}/chat/completions", headers=headers, content=content, timeout=30)


def recorded_ids(service: Service) -> list[str]:
    with sqlite3.connect(service.workdir / "data" / "mom.db") as db:
        return [row[0] for row in db.execute("SELECT id FROM mom_requests")]


@pytest.fixture(scope="module")
def logged(fake_server: FakeUpstream, start_service: StartService) -> Service:
    """A service of its own, so its log holds only this module's requests."""
    return start_service(panel_config(fake_server))


def test_a_chat_request_gets_its_id_echoed_and_one_line_with_the_outcome(logged: Service, fake: FakeUpstream) -> None:
    response = post(logged, {"model": "mom", "messages": QUESTION}, request_id="abc-123")
    assert response.status_code == 200
    assert response.headers["x-request-id"] == "abc-123"
    body = response.json()
    line = one_line(logged, "abc-123")
    assert line["method"] == "POST" and line["path"] == "/v1/chat/completions"
    assert line["model"] == "mom"
    assert line["status"] == "200"
    assert line["outcome"] == "ok"
    assert line["stream"] == "false"
    assert line["members"] == "3/3"
    assert "failed" not in line
    assert int(line["prompt_tokens"]) == body["usage"]["prompt_tokens"]
    assert int(line["completion_tokens"]) == body["usage"]["completion_tokens"]
    assert float(line["cost"]) == pytest.approx(body["usage"]["cost"], abs=1e-12)
    assert line["cache"] == "miss"
    assert float(line["latency_ms"]) > 0
    assert float(line["ttft_ms"]) > 0
    # the usage record carries our own id, named in the line beside the client's
    assert UUID.fullmatch(line["internal_id"])
    wait_until(lambda: line["internal_id"] in recorded_ids(logged))


def test_without_an_id_one_is_made_and_used_for_the_usage_record(logged: Service, fake: FakeUpstream) -> None:
    response = post(logged, {"model": "mom", "messages": QUESTION})
    assert response.status_code == 200
    request_id = response.headers["x-request-id"]
    assert UUID.fullmatch(request_id)
    line = one_line(logged, request_id)
    assert "internal_id" not in line  # one id for everything
    wait_until(lambda: request_id in recorded_ids(logged))


def test_a_repeated_client_id_never_loses_a_usage_record(logged: Service, fake: FakeUpstream) -> None:
    for _ in range(2):
        assert post(logged, {"model": "mom", "messages": QUESTION}, request_id="same-id-twice").status_code == 200
    lines = lines_of(logged, "same-id-twice")
    assert len(lines) == 2
    internal = {line["internal_id"] for line in lines}
    assert len(internal) == 2
    wait_until(lambda: internal <= set(recorded_ids(logged)))


@pytest.mark.parametrize("bad", ["bad id with spaces!!", "x" * 129, "semi;colon", "ünïcode"])
def test_an_invalid_id_is_replaced(logged: Service, fake: FakeUpstream, bad: str) -> None:
    headers = {**logged.headers(), "X-Request-ID": bad}
    response = httpx.post(
        f"{logged.base_url}/chat/completions",
        headers={k: v.encode() for k, v in headers.items()},
        json={"model": "mom", "messages": QUESTION},
        timeout=30,
    )
    assert response.status_code == 200
    request_id = response.headers["x-request-id"]
    assert UUID.fullmatch(request_id)
    assert one_line(logged, request_id)["status"] == "200"
    assert bad not in logged.log()


def test_the_longest_valid_id_is_kept(logged: Service, fake: FakeUpstream) -> None:
    long_id = "A.b_c:d-" * 16
    response = httpx.get(f"{logged.base_url}/models", headers={**logged.headers(), "X-Request-ID": long_id})
    assert response.status_code == 200
    assert response.headers["x-request-id"] == long_id
    assert one_line(logged, long_id)["path"] == "/v1/models"


@pytest.mark.parametrize(
    ("request_id", "body", "token", "status", "error"),
    [
        ("bad-json-1", b"{not json", TOKEN, 400, "invalid_json"),
        ("no-token-1", {"model": "mom", "messages": QUESTION}, None, 401, "invalid_api_key"),
        ("wrong-token-1", {"model": "mom", "messages": QUESTION}, "wrong-token-0000", 401, "invalid_api_key"),
        ("no-model-1", {"model": "no-such-model", "messages": QUESTION}, TOKEN, 404, "model_not_found"),
    ],
)
def test_requests_that_never_reach_the_engine_get_one_line(
    logged: Service, fake: FakeUpstream, request_id: str, body: Any, token: str | None, status: int, error: str
) -> None:
    response = post(logged, body, request_id=request_id, token=token)
    assert response.status_code == status
    assert response.headers["x-request-id"] == request_id
    line = one_line(logged, request_id)
    assert line["status"] == str(status)
    assert line["outcome"] == "error"
    assert line["error"] == error
    assert "model" not in line and "members" not in line
    assert not fake.log()


def test_an_unknown_path_gets_one_line(logged: Service) -> None:
    response = httpx.get(f"{logged.url}/v2/nothing", headers={"X-Request-ID": "lost-1"})
    assert response.status_code == 404
    assert response.headers["x-request-id"] == "lost-1"
    line = one_line(logged, "lost-1")
    assert line["status"] == "404" and line["path"] == "/v2/nothing"


def test_an_upstream_failure_gets_its_id_and_one_line(logged: Service, fake: FakeUpstream) -> None:
    fake.configure({name: {"status": 500} for name in ("alpha", "beta", "gamma")})
    response = post(logged, {"model": "mom", "messages": QUESTION}, request_id="all-failed-1")
    assert response.status_code == 502
    assert response.headers["x-request-id"] == "all-failed-1"
    line = one_line(logged, "all-failed-1")
    assert line["status"] == "502" and line["outcome"] == "error" and line["error"] == "members_failed"
    assert line["members"] == "0/3"
    assert line["failed"] == "alpha,beta,gamma"


def _stream(service: Service, request_id: str, *, leave_after: int | None = None) -> httpx.Headers:
    """A streamed chat request; with `leave_after`, the client leaves after that many content chunks."""
    body = {"model": "mom", "messages": QUESTION, "stream": True}
    headers = {**service.headers(), "X-Request-ID": request_id}
    chunks = 0
    with (
        httpx.Client(timeout=30) as client,
        client.stream("POST", f"{service.base_url}/chat/completions", headers=headers, json=body) as response,
    ):
        assert response.status_code == 200
        for text in response.iter_text():
            chunks += text.count('"content"')
            if leave_after is not None and chunks >= leave_after:
                break
        return response.headers


def test_a_stream_gets_one_line_when_it_ends(logged: Service, fake: FakeUpstream) -> None:
    fake.configure({"judge": {"text": "one two three four five six seven", "token_delay_ms": 100}})
    started = time.monotonic()
    headers = _stream(logged, "stream-ok-1")
    assert headers["x-request-id"] == "stream-ok-1"
    assert headers["content-type"].startswith("text/event-stream")
    line = one_line(logged, "stream-ok-1")
    assert line["stream"] == "true" and line["status"] == "200" and line["outcome"] == "ok"
    assert line["members"] == "3/3"
    # logged when the body was complete, not when the endpoint returned
    assert float(line["latency_ms"]) >= 500
    assert float(line["latency_ms"]) <= (time.monotonic() - started) * 1000
    assert 0 < float(line["ttft_ms"]) < float(line["latency_ms"])


def test_a_stream_the_client_leaves_gets_one_cancelled_line(logged: Service, fake: FakeUpstream) -> None:
    fake.configure({"judge": {"text": " ".join(["token"] * 200), "token_delay_ms": 50}})
    headers = _stream(logged, "stream-left-1", leave_after=3)
    assert headers["x-request-id"] == "stream-left-1"
    line = one_line(logged, "stream-left-1")
    assert line["outcome"] == "cancelled"
    assert line["status"] == "200"  # the answer had begun
    assert line["stream"] == "true"
    assert int(line["completion_tokens"]) > 0  # the tokens the synthesis produced still count


def test_no_line_holds_a_secret_or_the_question(logged: Service, fake: FakeUpstream) -> None:
    assert post(logged, {"model": "mom", "messages": QUESTION}, request_id="secret-check").status_code == 200
    assert post(logged, {"model": "mom", "messages": QUESTION}, token=FAKE_KEY).status_code == 401
    one_line(logged, "secret-check")
    log = logged.log()
    for secret in (TOKEN, FAKE_KEY, QUESTION_TEXT, "zeppelin"):
        assert secret not in log
    assert all(line.startswith(tuple("0123456789")) for line in request_lines(logged))


def test_successful_probes_stay_out_of_the_info_log(logged: Service) -> None:
    assert httpx.get(f"{logged.url}/health", headers={"X-Request-ID": "probe-1"}).status_code == 200
    scrape = httpx.get(f"{logged.url}/metrics", headers={**logged.headers(), "X-Request-ID": "probe-2"})
    assert scrape.status_code == 200
    assert scrape.headers["x-request-id"] == "probe-2"
    assert post(logged, {"model": "mom", "messages": QUESTION}, request_id="after-probes").status_code == 200
    one_line(logged, "after-probes")
    assert "probe-1" not in logged.log() and "probe-2" not in logged.log()


def test_json_lines(fake_server: FakeUpstream, start_service: StartService, fake: FakeUpstream) -> None:
    service = start_service(panel_config(fake_server), {"LOG_FORMAT": "json"})
    response = post(service, {"model": "mom", "messages": QUESTION}, request_id="json-1")
    assert response.status_code == 200
    assert post(service, b"{nope", request_id="json-2").status_code == 400
    assert post(service, {"model": "mom", "messages": QUESTION}, request_id="json-3", token=None).status_code == 401
    # a later request's line is written after every line of the three (each when its request ended)
    assert httpx.get(f"{service.url}/no-such-path", headers={"X-Request-ID": "json-after"}).status_code == 404
    wait_until(lambda: any(line["request_id"] == "json-after" for line in json_request_lines(service)))
    lines = {line["request_id"]: line for line in json_request_lines(service) if line["request_id"] != "json-after"}
    assert len(json_request_lines(service)) == 4
    chat = lines["json-1"]
    usage = response.json()["usage"]
    assert chat["level"] == "INFO"
    assert datetime.fromisoformat(chat["time"]).tzinfo is not None
    assert chat["model"] == "mom" and chat["stream"] is False
    assert chat["status"] == 200 and chat["outcome"] == "ok"
    assert chat["members_answered"] == 3 and chat["members_asked"] == 3 and chat["members_failed"] == []
    assert chat["prompt_tokens"] == usage["prompt_tokens"]
    assert chat["completion_tokens"] == usage["completion_tokens"]
    assert chat["cost"] == pytest.approx(usage["cost"], abs=1e-12)
    assert chat["cache"] == "miss"
    assert isinstance(chat["latency_ms"], float) and isinstance(chat["ttft_ms"], float)
    assert UUID.fullmatch(chat["internal_id"])
    assert lines["json-2"]["status"] == 400 and lines["json-2"]["error"] == "invalid_json"
    assert lines["json-3"]["status"] == 401 and lines["json-3"]["outcome"] == "error"
    # the service's other lines are JSON too, once the app has started
    others = [orjson.loads(line) for line in service.log().splitlines() if line.startswith('{"time"')]
    assert any(line["logger"] == "mom_service" and "Usage database" in line["message"] for line in others)
    log = service.log()
    for secret in (TOKEN, FAKE_KEY, QUESTION_TEXT):
        assert secret not in log


def test_log_content_shows_the_question(
    fake_server: FakeUpstream, start_service: StartService, fake: FakeUpstream
) -> None:
    service = start_service(panel_config(fake_server), {"LOG_CONTENT": "true"})
    messages = [
        {"role": "user", "content": "An earlier question."},
        {"role": "assistant", "content": "An earlier answer."},
        {"role": "user", "content": [{"type": "text", "text": QUESTION_TEXT}]},
    ]
    assert post(service, {"model": "mom", "messages": messages}, request_id="content-1").status_code == 200
    assert one_line(service, "content-1")["content"] == QUESTION_TEXT
    long_text = "word " * 200
    long_question = [{"role": "user", "content": long_text}]
    assert post(service, {"model": "mom", "messages": long_question}, request_id="content-2").status_code == 200
    assert one_line(service, "content-2")["content"] == long_text[:500]
    assert "An earlier question." not in service.log()
    assert TOKEN not in service.log() and FAKE_KEY not in service.log()


async def test_an_unexpected_error_is_answered_with_the_id_and_logged_once(caplog: pytest.LogCaptureFixture) -> None:
    """In process: Starlette answers a bug outside every middleware, so the request log answers it itself."""
    app = create_app(Settings(api_token=TOKEN))

    @app.get("/boom")
    async def boom() -> None:
        raise RuntimeError("a bug")

    requests_logger = logging.getLogger(REQUEST_LOGGER)
    requests_logger.addHandler(caplog.handler)
    caplog.handler.setLevel(logging.DEBUG)
    try:
        transport = httpx.ASGITransport(app=app, raise_app_exceptions=False)
        async with httpx.AsyncClient(transport=transport, base_url="http://test") as client:
            response = await client.get("/boom", headers={"X-Request-ID": "boom-1"})
    finally:
        requests_logger.removeHandler(caplog.handler)
    assert response.status_code == 500
    assert response.headers["x-request-id"] == "boom-1"
    assert response.json()["error"]["type"] == "server_error"
    # our handler on the logger sees it, and caplog's own may too (when it propagates): the same record
    records = {id(r): r for r in caplog.records}.values()
    lines = [r for r in records if r.name == REQUEST_LOGGER and "request_id=boom-1" in r.getMessage()]
    assert len(lines) == 1
    assert lines[0].levelno == logging.WARNING
    assert "status=500 outcome=error" in lines[0].getMessage()
