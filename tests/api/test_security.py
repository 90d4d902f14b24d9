"""Auth, CORS, hostile and malformed input: each gets the right status and an OpenAI error, and changes nothing."""

from __future__ import annotations

import json
import signal
import socket
from typing import Any

import httpx
import pytest

from tests.conftest import FAKE_KEY, TOKEN, Service, StartService, llm, panel_config, wait_until
from tests.fake_upstream import FakeUpstream
from tests.openai_schema import validate

QUESTION = [{"role": "user", "content": "hi"}]


def assert_openai_error(response: httpx.Response, status: int) -> dict[str, Any]:
    assert response.status_code == status, response.text
    assert response.headers["content-type"].startswith("application/json")
    body = response.json()
    validate(body, "ErrorResponse")
    assert set(body["error"]) == {"message", "type", "param", "code"}
    assert "Traceback" not in response.text
    return body


# ------------------------------------------------------------------------------------------------ auth


@pytest.mark.parametrize(
    "headers",
    [{}, {"Authorization": "Bearer wrong-token"}, {"Authorization": f"Basic {TOKEN}"}, {"Authorization": "Bearer"}],
)
@pytest.mark.parametrize(
    ("method", "path"), [("GET", "/v1/models"), ("GET", "/v1/models/mom"), ("POST", "/v1/chat/completions")]
)
def test_missing_or_wrong_token_is_401(service: Service, headers: dict[str, str], method: str, path: str) -> None:
    response = httpx.request(
        method, f"{service.url}{path}", headers=headers, json={"model": "mom", "messages": QUESTION}
    )
    body = assert_openai_error(response, 401)
    assert body["error"]["type"] == "authentication_error"
    assert response.headers.get("www-authenticate") == "Bearer"


def test_token_rotation_accepts_every_listed_token(fake_server: FakeUpstream, start_service: StartService) -> None:
    service = start_service(panel_config(fake_server), token="old-token-1, new-token-2")
    for token in ("old-token-1", "new-token-2"):
        assert httpx.get(f"{service.base_url}/models", headers=service.headers(token)).status_code == 200
    assert (
        httpx.get(f"{service.base_url}/models", headers=service.headers("old-token-1,new-token-2")).status_code == 401
    )


def test_no_token_configured_is_503_never_open(fake_server: FakeUpstream, start_service: StartService) -> None:
    service = start_service(panel_config(fake_server), token=None)
    for headers in ({}, {"Authorization": "Bearer anything"}):
        body = assert_openai_error(httpx.get(f"{service.base_url}/models", headers=headers), 503)
        assert body["error"]["code"] == "service_misconfigured"
    response = httpx.post(f"{service.base_url}/chat/completions", json={"model": "mom", "messages": QUESTION})
    assert_openai_error(response, 503)
    assert httpx.get(f"{service.url}/health").status_code == 200  # liveness needs no token
    assert "API_TOKEN is not set" in service.log()


# ------------------------------------------------------------------------------------------------ CORS


def test_cors_allows_only_the_configured_origins(fake_server: FakeUpstream, start_service: StartService) -> None:
    service = start_service(panel_config(fake_server), {"ALLOWED_CORS_ORIGINS": "https://chat.example.com"})
    preflight = {"Access-Control-Request-Method": "POST", "Access-Control-Request-Headers": "authorization"}
    allowed = httpx.options(
        f"{service.base_url}/chat/completions", headers={"Origin": "https://chat.example.com", **preflight}
    )
    assert allowed.status_code == 200
    assert allowed.headers["access-control-allow-origin"] == "https://chat.example.com"
    refused = httpx.options(
        f"{service.base_url}/chat/completions", headers={"Origin": "https://evil.example", **preflight}
    )
    assert "access-control-allow-origin" not in refused.headers
    simple = httpx.get(
        f"{service.base_url}/models", headers={"Origin": "https://chat.example.com", **service.headers()}
    )
    assert simple.headers["access-control-allow-origin"] == "https://chat.example.com"
    other = httpx.get(f"{service.base_url}/models", headers={"Origin": "https://evil.example", **service.headers()})
    assert "access-control-allow-origin" not in other.headers


ALLOWED_ORIGIN, OTHER_ORIGIN = "https://chat.example.com", "https://evil.example"


def open_chat(service: Service, body: dict[str, Any]) -> socket.socket:
    """Send a chat request on a raw connection and leave it waiting; closing the socket is the client leaving."""
    payload = json.dumps(body).encode()
    head = (
        f"POST /v1/chat/completions HTTP/1.1\r\nHost: 127.0.0.1:{service.port}\r\n"
        f"Authorization: Bearer {TOKEN}\r\nContent-Type: application/json\r\nContent-Length: {len(payload)}\r\n\r\n"
    )
    connection = socket.create_connection(("127.0.0.1", service.port), timeout=10)
    connection.sendall(head.encode() + payload)
    return connection


def assert_cors(response: httpx.Response, origin: str | None) -> None:
    """The response carries the CORS headers for `origin`; with None, it allows no origin."""
    if origin is None:
        assert "access-control-allow-origin" not in response.headers, response.headers
        return
    assert response.headers["access-control-allow-origin"] == origin
    assert "x-request-id" in response.headers["access-control-expose-headers"].lower()


def test_cors_headers_on_the_refusals_sent_before_the_app(fake: FakeUpstream, start_service: StartService) -> None:
    """413 (too large), 429 over_capacity and 503 shutting_down are sent by middleware before the app: an allowed
    origin gets the CORS headers on them too (a browser would see an opaque failure), another origin none."""
    env = {"ALLOWED_CORS_ORIGINS": ALLOWED_ORIGIN, "MOM_MAX_IN_FLIGHT": "1", "MOM_MAX_BODY_BYTES": "1000"}
    config = panel_config(fake)
    # an LLM of this test's own hangs (others' tests may reuse the fake without resetting it)
    config["llm_definitions"].append(llm("holder", fake))
    config["models"].append({"name": "mom-held", "llms_to_query": ["holder"], "concluding_llm": "judge"})
    service = start_service(config, env)
    url = f"{service.base_url}/chat/completions"

    def post(
        origin: str, content: bytes = b'{"model": "mom", "messages": [{"role": "user", "content": "hi"}]}'
    ) -> httpx.Response:
        headers = {**service.headers(), "Origin": origin, "Content-Type": "application/json"}
        return httpx.post(url, headers=headers, content=content, timeout=30)

    big = b'{"model": "mom", "messages": [{"role": "user", "content": "' + b"x" * 2000 + b'"}]}'
    for origin, expected in ((ALLOWED_ORIGIN, ALLOWED_ORIGIN), (OTHER_ORIGIN, None)):
        too_large = post(origin, big)
        assert assert_openai_error(too_large, 413)["error"]["code"] == "request_too_large"
        assert_cors(too_large, expected)

    # one answer in flight, waiting on its hanging panel, holds the only slot
    fake.configure({"holder": {"hang": True}})
    process = service.process
    assert process is not None
    holder = open_chat(service, {"model": "mom-held", "messages": QUESTION})
    try:
        fake.wait_for(lambda log: [e["outcome"] for e in log] == ["hung"], timeout=15)
        for origin, expected in ((ALLOWED_ORIGIN, ALLOWED_ORIGIN), (OTHER_ORIGIN, None)):
            busy = post(origin)
            assert assert_openai_error(busy, 429)["error"]["code"] == "over_capacity"
            assert busy.headers["retry-after"] == "1"
            assert_cors(busy, expected)
        preflight = httpx.options(
            url, headers={"Origin": ALLOWED_ORIGIN, "Access-Control-Request-Method": "POST"}, timeout=10
        )
        assert preflight.status_code == 200
        assert preflight.headers["access-control-allow-origin"] == ALLOWED_ORIGIN
        assert "POST" in preflight.headers["access-control-allow-methods"]

        # draining for a shutdown (the held answer keeps the process alive): 503 shutting_down
        process.send_signal(signal.SIGTERM)
        wait_until(lambda: httpx.get(f"{service.url}/health/ready", timeout=5).status_code == 503)
        for origin, expected in ((ALLOWED_ORIGIN, ALLOWED_ORIGIN), (OTHER_ORIGIN, None)):
            stopping = post(origin)
            assert assert_openai_error(stopping, 503)["error"]["code"] == "shutting_down"
            assert_cors(stopping, expected)
    finally:
        holder.close()  # the client leaves: its answer ends, and the drain with it
    assert process.wait(20) == 0, service.log()


def test_no_cors_headers_when_no_origins_are_configured(service: Service) -> None:
    response = httpx.get(
        f"{service.base_url}/models", headers={"Origin": "https://chat.example.com", **service.headers()}
    )
    assert response.status_code == 200
    assert not [h for h in response.headers if h.startswith("access-control-")]
    preflight = httpx.options(
        f"{service.base_url}/chat/completions",
        headers={"Origin": "https://chat.example.com", "Access-Control-Request-Method": "POST"},
    )
    assert not [h for h in preflight.headers if h.startswith("access-control-")]


# ------------------------------------------------------------------------------------------ bad input

VALID: dict[str, Any] = {"model": "mom", "messages": QUESTION}

BAD_INPUTS: list[tuple[str, Any, int, str | None]] = [
    # (case, body: bytes for raw, dict to send as JSON; expected status; expected param)
    ("broken JSON", b'{"model": "mom", "messages": [', 400, None),
    ("empty body", b"", 400, None),
    ("body is a list", b"[1, 2]", 400, None),
    ("body is a string", b'"hello"', 400, None),
    ("missing model", {"messages": QUESTION}, 400, "model"),
    ("model not a string", {"model": 5, "messages": QUESTION}, 400, "model"),
    ("missing messages", {"model": "mom"}, 400, "messages"),
    ("empty messages", {"model": "mom", "messages": []}, 400, "messages"),
    ("messages not a list", {"model": "mom", "messages": "hi"}, 400, "messages"),
    ("message not an object", {"model": "mom", "messages": ["hi"]}, 400, "messages[0]"),
    ("unknown role", {"model": "mom", "messages": [{"role": "wizard", "content": "x"}]}, 400, "messages[0].role"),
    ("missing content", {"model": "mom", "messages": [{"role": "user"}]}, 400, "messages[0].content"),
    ("content a number", {"model": "mom", "messages": [{"role": "user", "content": 7}]}, 400, "messages[0].content"),
    (
        "unknown content part",
        {"model": "mom", "messages": [{"role": "user", "content": [{"type": "input_audio", "x": 1}]}]},
        400,
        "messages[0].content[0]",
    ),
    (
        "image URL with file scheme",
        {
            "model": "mom",
            "messages": [
                {"role": "user", "content": [{"type": "image_url", "image_url": {"url": "file:///etc/passwd"}}]}
            ],
        },
        400,
        "messages[0].content[0].image_url.url",
    ),
    ("temperature a string", {**VALID, "temperature": "hot"}, 400, "temperature"),
    ("temperature out of range", {**VALID, "temperature": 9}, 400, "temperature"),
    ("max_tokens zero", {**VALID, "max_tokens": 0}, 400, "max_tokens"),
    ("stream not a boolean", {**VALID, "stream": "sometimes"}, 400, "stream"),
    ("n=2", {**VALID, "n": 2}, 400, "n"),
    ("unknown model", {"model": "gpt-17", "messages": QUESTION}, 404, "model"),
]


@pytest.mark.parametrize(("case", "body", "status", "param"), BAD_INPUTS, ids=[c[0] for c in BAD_INPUTS])
def test_bad_input_gets_an_openai_error_and_changes_nothing(
    service: Service, fake: FakeUpstream, case: str, body: Any, status: int, param: str | None
) -> None:
    headers = {**service.headers(), "Content-Type": "application/json"}
    url = f"{service.base_url}/chat/completions"
    response = (
        httpx.post(url, headers=headers, content=body)
        if isinstance(body, bytes)
        else httpx.post(url, headers=headers, json=body)
    )
    error = assert_openai_error(response, status)["error"]
    if param is not None:
        assert error["param"] == param, error
    assert error["message"]
    assert fake.log() == []  # nothing reached an upstream
    # and the service still answers
    assert httpx.post(url, headers=service.headers(), json=VALID, timeout=30).status_code == 200


def test_body_over_the_limit_is_413_before_parsing(service: Service, fake: FakeUpstream) -> None:
    big = b'{"model": "mom", "messages": [{"role": "user", "content": "' + b"x" * (40 * 1024 * 1024) + b'"}]}'
    response = httpx.post(
        f"{service.base_url}/chat/completions",
        headers={**service.headers(), "Content-Type": "application/json"},
        content=big,
        timeout=60,
    )
    body = assert_openai_error(response, 413)
    assert body["error"]["code"] == "request_too_large"
    assert fake.log() == []
    assert (
        httpx.post(
            f"{service.base_url}/chat/completions", headers=service.headers(), json=VALID, timeout=30
        ).status_code
        == 200
    )


def test_chunked_body_over_the_limit_is_413(fake_server: FakeUpstream, start_service: StartService) -> None:
    service = start_service(panel_config(fake_server), {"MOM_MAX_BODY_BYTES": "1000"})

    def chunks() -> Any:
        yield b'{"model": "mom", "messages": [{"role": "user", "content": "'
        for _ in range(10):
            yield b"y" * 500
        yield b'"}]}'

    response = httpx.post(
        f"{service.base_url}/chat/completions",
        headers={**service.headers(), "Content-Type": "application/json"},
        content=chunks(),
        timeout=30,
    )
    assert_openai_error(response, 413)
    small = httpx.post(f"{service.base_url}/chat/completions", headers=service.headers(), json=VALID, timeout=30)
    assert small.status_code == 200


@pytest.mark.parametrize(
    ("method", "path", "status"),
    [("GET", "/v1/nothing-here", 404), ("GET", "/v1/chat/completions", 405), ("DELETE", "/v1/models", 405)],
)
def test_unknown_paths_and_methods_are_openai_errors(service: Service, method: str, path: str, status: int) -> None:
    assert_openai_error(httpx.request(method, f"{service.url}{path}", headers=service.headers()), status)


def test_health_is_open_and_reveals_nothing(service: Service) -> None:
    response = httpx.get(f"{service.url}/health")
    assert response.status_code == 200
    assert response.json() == {"status": "ok"}


def test_no_secret_in_responses_or_logs(service: Service, fake: FakeUpstream) -> None:
    fake.configure(
        {
            "alpha": {"status": 401, "error_message": f"Incorrect API key provided: {FAKE_KEY}"},
            "beta": {"status": 500, "error_message": f"upstream echoed Bearer {TOKEN}"},
        }
    )
    response = httpx.post(f"{service.base_url}/chat/completions", headers=service.headers(), json=VALID, timeout=30)
    assert response.status_code == 200
    members = {m["name"]: m for m in response.json()["mom"]["members"]}
    assert members["alpha"]["status"] == "error" and "***" in members["alpha"]["error"]
    for text in (response.text, service.log()):
        assert FAKE_KEY not in text
        assert TOKEN not in text
        assert "Traceback" not in text


def test_environment_provider_key_is_never_sent_to_a_custom_api_base(
    fake_server: FakeUpstream, start_service: StartService
) -> None:
    config = panel_config(fake_server)
    keyless = {"name": "keyless", "model": "openai/keyless", "api_base": fake_server.base_url}
    config["llm_definitions"].append(keyless)
    config["models"].append({"name": "mom-keyless", "llms_to_query": ["keyless"], "concluding_llm": "keyless"})
    service = start_service(config, {"OPENAI_API_KEY": "sk-real-openai-key-must-stay-home"})
    fake_server.reset()
    response = httpx.post(
        f"{service.base_url}/chat/completions",
        headers=service.headers(),
        json={"model": "mom-keyless", "messages": QUESTION},
        timeout=30,
    )
    assert response.status_code == 200
    sent = {e["headers"].get("authorization") for e in fake_server.log()}
    assert sent == {"Bearer no-key"}
