"""The lean path: OpenAI-compatible servers called over one shared aiohttp session, their JSON parsed with orjson.

LiteLLM spends about 7 ms of CPU on a whole call and 0.65 ms on each streamed chunk (its logging objects, cost
map lookups, redaction and stream wrappers); this path spends a fraction of that. It is used for the LLMs where
LiteLLM itself only passes the request through (`lean_route` decides), so the upstream sees the same request
either way; every other LLM keeps going through LiteLLM.

This module only speaks HTTP: `caller.LLMCaller` owns retries, deadlines, error kinds and usage.
"""

from __future__ import annotations

import urllib.parse
import urllib.request
from collections.abc import AsyncGenerator, Mapping
from dataclasses import dataclass
from typing import Any

import aiohttp
import orjson

from mom_service.config import LLMDefinition

# What LiteLLM forwards unchanged to an OpenAI-compatible server (`openai/<model>` outside OpenAI's catalog):
# its OpenAI chat config's supported parameters that are body fields. An LLM whose `params` name anything else
# stays on LiteLLM, which knows how to map or drop it.
BODY_PARAMS = frozenset(
    {
        "frequency_penalty",
        "logit_bias",
        "logprobs",
        "top_logprobs",
        "max_tokens",
        "max_completion_tokens",
        "modalities",
        "prediction",
        "presence_penalty",
        "seed",
        "stop",
        "temperature",
        "top_p",
        "tools",
        "tool_choice",
        "parallel_tool_calls",
        "audio",
        "web_search_options",
        "service_tier",
        "safety_identifier",
        "prompt_cache_key",
        "prompt_cache_retention",
        "store",
        "response_format",
        "reasoning_effort",
    }
)
# LiteLLM forwards `user` to the models of OpenAI's catalog only (other servers may reject it); the catalog's
# models stay on LiteLLM, so the lean path never sends it.
NOT_FORWARDED = frozenset({"user"})
_MAX_ERROR_BODY = 64 * 1024
# Idle connections are closed after this long: below the 5 s of uvicorn (and most servers), so a request is not
# sent on a socket the server is closing. A stale socket still fails as a connection error, which is retried.
KEEPALIVE_EXPIRY_S = 4.0


@dataclass(frozen=True, slots=True)
class LeanRoute:
    """Where and how one LLM is called on the lean path: everything but the messages, computed once."""

    url: str
    headers: Mapping[str, str]
    body: Mapping[str, Any]  # the model and the LLM's own params
    proxy: str | None = None  # from HTTP(S)_PROXY / NO_PROXY, as LiteLLM's clients read them


def env_proxy(url: str) -> str | None:
    """The proxy the environment names for `url` (HTTP_PROXY, HTTPS_PROXY, ALL_PROXY, minus NO_PROXY), read once
    per LLM: aiohttp's `trust_env` would read the environment and ~/.netrc again on every request."""
    parts = urllib.parse.urlsplit(url)
    proxies = urllib.request.getproxies_environment()
    if not parts.hostname or urllib.request.proxy_bypass(parts.hostname):
        return None
    return proxies.get(parts.scheme) or proxies.get("all")


def lean_route(
    llm: LLMDefinition, api_key: str, catalog: frozenset[str], params: Mapping[str, Any] | None = None
) -> LeanRoute | None:
    """The lean route for an LLM that LiteLLM would only pass through, else None (it stays on LiteLLM).

    That is an `openai/<model>` with an `api_base` (an OpenAI-compatible server: vLLM, Ollama, LM Studio, a
    proxy...), a model outside OpenAI's catalog (LiteLLM adapts parameters for those), and params that are plain
    OpenAI body fields. `params`: the LLM's own as every call carries them (default: all of them; the caller
    leaves out the output limit, which it sets per call).
    """
    provider, _, model = llm.model.partition("/")
    if provider != "openai" or not model or not llm.api_base or model in catalog:
        return None
    if not BODY_PARAMS.issuperset(llm.params):
        return None
    headers = {"authorization": f"Bearer {api_key}", "content-type": "application/json"}
    url = f"{llm.api_base.rstrip('/')}/chat/completions"
    body = {**(llm.params if params is None else params), "model": model}
    return LeanRoute(url, headers, body, env_proxy(url))


def new_session() -> aiohttp.ClientSession:
    """The lean path's connection pool, shared by every LLM (made in the running loop). No pool limit: admission
    control bounds the load. (aiohttp, not httpx: httpcore's pool checks every idle connection on each request,
    which grows with the load; aiohttp is also what LiteLLM itself uses.)"""
    connector = aiohttp.TCPConnector(limit=0, keepalive_timeout=KEEPALIVE_EXPIRY_S, ttl_dns_cache=300)
    # No timeout here: the caller bounds every attempt with its deadline. Proxies: each route's own (env_proxy).
    return aiohttp.ClientSession(connector=connector, timeout=aiohttp.ClientTimeout(total=None))


class LeanPool:
    """The one session of the lean path, made on first use (in the running loop): shared by the callers of every
    config the service runs, so a reloaded config keeps the connections and the calls still running on the one
    before it keep theirs."""

    def __init__(self) -> None:
        self._session: aiohttp.ClientSession | None = None

    def session(self) -> aiohttp.ClientSession:
        if self._session is None or self._session.closed:
            self._session = new_session()
        return self._session

    async def aclose(self) -> None:
        if self._session is not None:
            await self._session.close()


class UpstreamStatusError(Exception):
    """The server answered with an HTTP error. `message` is the error body's message, `code` its `error.code` (e.g.
    `context_length_exceeded`); `response` (its headers) is kept for Retry-After."""

    def __init__(self, response: aiohttp.ClientResponse, message: str, code: str | None = None) -> None:
        super().__init__(f"upstream HTTP {response.status}: {message}")
        self.message = message
        self.code = code
        self.status_code = response.status
        self.response = response


class UpstreamProtocolError(Exception):
    """The server's answer is not what an OpenAI-compatible server sends."""


class UpstreamTruncated(UpstreamProtocolError):
    """A stream ended before its end: neither a finish_reason nor `[DONE]`."""


def request_body(
    route: LeanRoute, messages: list[dict[str, Any]], params: Mapping[str, Any], encoded: bytes | None = None
) -> bytes:
    """The JSON body; `encoded` is the messages already serialized (shared by the calls that send the same
    conversation), spliced in as they are."""
    body = {**route.body, **{k: v for k, v in params.items() if k not in NOT_FORWARDED}}
    if encoded is None:
        body["messages"] = messages
        return orjson.dumps(body)
    return orjson.dumps(body)[:-1] + b',"messages":' + encoded + b"}"


def _error_of(raw: bytes) -> object:
    """The `error` member of an OpenAI-shaped error body; None when there is none, or the body is not JSON."""
    try:
        data = orjson.loads(raw)
    except orjson.JSONDecodeError:
        return None
    return data.get("error") if isinstance(data, dict) else None


def _error_message(raw: bytes, error: object = None) -> str:
    """The `error.message` of an OpenAI-shaped error body (its `error`, when already parsed), else the body's
    start."""
    error = _error_of(raw) if error is None else error
    if isinstance(error, dict) and isinstance(error.get("message"), str):
        return str(error["message"])
    if isinstance(error, str):
        return error
    return raw[:300].decode("utf-8", "replace").strip()


async def _status_error(response: aiohttp.ClientResponse) -> UpstreamStatusError:
    """The error for a non-200 answer, with the start of its body (read, then the connection released)."""
    try:
        raw = await response.content.read(_MAX_ERROR_BODY)
    finally:
        response.release()
    error = _error_of(raw)  # parsed once, for the message and the code
    code = error.get("code") if isinstance(error, dict) else None
    return UpstreamStatusError(response, _error_message(raw, error), code if isinstance(code, str) else None)


async def post_whole(
    session: aiohttp.ClientSession,
    route: LeanRoute,
    messages: list[dict[str, Any]],
    params: Mapping[str, Any],
    encoded: bytes | None = None,
) -> dict[str, Any]:
    """One non-streamed call: the `chat.completion` body."""
    body = request_body(route, messages, params, encoded)
    post = session.post(route.url, data=body, headers=route.headers, proxy=route.proxy, allow_redirects=False)
    async with post as response:
        if response.status != 200:
            raise await _status_error(response)
        raw = await response.read()
    data = _json_object(raw, "the answer")
    if "error" in data and "choices" not in data:
        raise UpstreamProtocolError(f"the server answered an error: {_error_message(raw, data['error'])}")
    return data


def _json_object(raw: bytes, what: str) -> dict[str, Any]:
    try:
        data = orjson.loads(raw)
    except orjson.JSONDecodeError:
        raise UpstreamProtocolError(f"{what} is not JSON") from None
    if not isinstance(data, dict):
        raise UpstreamProtocolError(f"{what} is not a JSON object")
    return data


async def open_stream(
    session: aiohttp.ClientSession,
    route: LeanRoute,
    messages: list[dict[str, Any]],
    params: Mapping[str, Any],
    encoded: bytes | None = None,
) -> aiohttp.ClientResponse:
    """Start a streamed call: the response, once the server accepted it (status 200); the body is not read yet.
    The caller closes it."""
    streamed = {**params, "stream": True, "stream_options": {"include_usage": True}}
    body = request_body(route, messages, streamed, encoded)
    response = await session.post(route.url, data=body, headers=route.headers, proxy=route.proxy, allow_redirects=False)
    if response.status != 200:
        raise await _status_error(response)
    return response


DONE: dict[str, Any] = {}


def _data(line: bytes) -> dict[str, Any] | None:
    """A `data:` line's JSON object (DONE for `[DONE]`); None for other lines (blank separators, keep-alive
    comments, `event:` and `id:` lines)."""
    if not line.startswith(b"data:"):
        return None
    payload = line[5:].strip()
    if payload == b"[DONE]":
        return DONE
    data = _json_object(payload, "a stream chunk")
    if data.get("error") is not None:
        raise UpstreamProtocolError(f"the server sent an error: {_error_message(payload, data['error'])}")
    return data


def _finishes(data: dict[str, Any]) -> bool:
    choices = data.get("choices")
    return bool(choices and choices[0].get("finish_reason"))


async def events(response: aiohttp.ClientResponse) -> AsyncGenerator[dict[str, Any]]:
    """The JSON payloads of a streamed answer's `data:` lines, up to `[DONE]`. A stream that ends without
    `[DONE]` raises UpstreamProtocolError unless a chunk gave a finish_reason (some servers omit `[DONE]`)."""
    pending = b""
    finished = False
    async for part in response.content.iter_any():
        pending += part
        if b"\n" not in part:
            continue
        *lines, pending = pending.split(b"\n")
        for line in lines:
            data = _data(line)
            if data is None:
                continue
            if data is DONE:
                return
            finished = finished or _finishes(data)
            yield data
    last = _data(pending)  # a last line without its newline
    if last is DONE:
        return
    if last is not None:
        finished = finished or _finishes(last)
        yield last
    if not finished:
        raise UpstreamTruncated("the stream ended before it was finished")
