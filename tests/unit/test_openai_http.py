"""The lean path's pure parts: which LLMs take it, the request body, and the SSE parser (fed in awkward pieces)."""

from __future__ import annotations

from collections.abc import AsyncIterator
from typing import Any

import orjson
import pytest

from mom_service.config import LLMDefinition
from mom_service.providers.openai_http import (
    DONE,
    UpstreamProtocolError,
    _data,
    _error_message,
    events,
    lean_route,
    request_body,
)

CATALOG = frozenset({"gpt-4o-mini"})


def definition(**fields: Any) -> LLMDefinition:
    return LLMDefinition.model_validate({"name": "x", "model": "openai/local", "api_base": "http://h:1/v1"} | fields)


def test_an_openai_compatible_server_takes_the_lean_path() -> None:
    route = lean_route(definition(params={"temperature": 0.2}), "sk-k", CATALOG)
    assert route is not None
    assert route.url == "http://h:1/v1/chat/completions"
    assert route.headers["authorization"] == "Bearer sk-k"
    assert route.body == {"temperature": 0.2, "model": "local"}
    assert lean_route(definition(api_base="http://h:1/v1/"), "k", CATALOG).url == "http://h:1/v1/chat/completions"  # type: ignore[union-attr]


@pytest.mark.parametrize(
    ("fields", "why"),
    [
        ({"model": "anthropic/claude-sonnet-4-5"}, "another provider"),
        ({"api_base": None}, "OpenAI's own API"),
        ({"model": "openai/gpt-4o-mini"}, "a model of OpenAI's catalog: LiteLLM adapts its parameters"),
        ({"params": {"top_k": 5}}, "a parameter LiteLLM would map or drop"),
        ({"params": {"extra_headers": {"a": "b"}}}, "a LiteLLM keyword, not a body field"),
        ({"model": "openai"}, "no model name"),
    ],
)
def test_everything_else_stays_on_litellm(fields: dict[str, Any], why: str) -> None:
    assert lean_route(definition(**fields), "k", CATALOG) is None, why


def test_the_body_has_the_llms_params_the_clients_params_and_never_user() -> None:
    route = lean_route(definition(params={"temperature": 0.2, "seed": 1}), "k", CATALOG)
    assert route is not None
    messages = [{"role": "user", "content": "hi"}]
    body = orjson.loads(request_body(route, messages, {"temperature": 0.7, "user": "u-1", "max_tokens": 5}))
    assert body == {"model": "local", "temperature": 0.7, "seed": 1, "max_tokens": 5, "messages": messages}


@pytest.mark.parametrize(
    ("raw", "message"),
    [
        (b'{"error": {"message": "beta is down", "type": "server_error"}}', "beta is down"),
        (b'{"error": "plain"}', "plain"),
        (b"<html>Bad Gateway</html>", "<html>Bad Gateway</html>"),
        (b'{"detail": "x"}', '{"detail": "x"}'),
    ],
)
def test_error_messages(raw: bytes, message: str) -> None:
    assert _error_message(raw) == message


def test_data_lines() -> None:
    assert _data(b"") is None
    assert _data(b": keep-alive") is None
    assert _data(b"event: message") is None
    assert _data(b"data: [DONE]") is DONE
    assert _data(b'data:{"a":1}\r') == {"a": 1}
    with pytest.raises(UpstreamProtocolError, match="not JSON"):
        _data(b"data: {nope")
    with pytest.raises(UpstreamProtocolError, match="not a JSON object"):
        _data(b"data: [1]")
    with pytest.raises(UpstreamProtocolError, match="overloaded"):
        _data(b'data: {"error": {"message": "overloaded"}}')


class _Content:
    def __init__(self, parts: list[bytes]) -> None:
        self._parts = parts

    async def iter_any(self) -> AsyncIterator[bytes]:
        for part in self._parts:
            yield part


class _Response:
    """What `events` reads of an aiohttp response: `content.iter_any()`."""

    def __init__(self, parts: list[bytes]) -> None:
        self.content = _Content(parts)


def chunk(content: str | None = None, finish: str | None = None) -> bytes:
    delta = {} if content is None else {"content": content}
    return b"data: " + orjson.dumps({"choices": [{"index": 0, "delta": delta, "finish_reason": finish}]}) + b"\n\n"


async def collect(parts: list[bytes]) -> list[dict[str, Any]]:
    return [data async for data in events(_Response(parts))]  # type: ignore[arg-type]


async def test_chunks_split_anywhere_are_parsed_whole() -> None:
    stream = chunk("Hel") + b": ping\n\n" + chunk("lo") + chunk(finish="stop") + b"data: [DONE]\n\n"
    for size in (1, 2, 7, 64, len(stream)):
        parts = [stream[i : i + size] for i in range(0, len(stream), size)]
        got = await collect(parts)
        assert [d["choices"][0]["delta"].get("content") for d in got] == ["Hel", "lo", None]


async def test_nothing_after_done_is_read() -> None:
    got = await collect([chunk("a") + b"data: [DONE]\n\n" + chunk("after")])
    assert len(got) == 1


async def test_done_without_a_final_newline() -> None:
    assert len(await collect([chunk("a"), b"data: [DONE]"])) == 1


async def test_a_finished_stream_may_omit_done() -> None:
    got = await collect([chunk("a"), chunk(finish="stop")])
    assert got[-1]["choices"][0]["finish_reason"] == "stop"


async def test_a_stream_cut_short_is_an_error() -> None:
    with pytest.raises(UpstreamProtocolError, match="ended before it was finished"):
        await collect([chunk("a"), chunk("b")])


def test_the_environments_proxy_is_read_once_per_llm(monkeypatch: pytest.MonkeyPatch) -> None:
    for name in ("http_proxy", "https_proxy", "all_proxy", "no_proxy", "HTTP_PROXY", "HTTPS_PROXY", "NO_PROXY"):
        monkeypatch.delenv(name, raising=False)
    assert lean_route(definition(), "k", CATALOG).proxy is None  # type: ignore[union-attr]
    monkeypatch.setenv("HTTP_PROXY", "http://proxy.corp:3128")
    monkeypatch.setenv("NO_PROXY", "localhost,.internal")
    assert lean_route(definition(), "k", CATALOG).proxy == "http://proxy.corp:3128"  # type: ignore[union-attr]
    assert lean_route(definition(api_base="https://h:1/v1"), "k", CATALOG).proxy is None  # type: ignore[union-attr]
    assert lean_route(definition(api_base="http://vllm.internal/v1"), "k", CATALOG).proxy is None  # type: ignore[union-attr]
