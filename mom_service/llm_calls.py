"""The only door to the LLMs: one call, one stream, exceptions mapped to ours, usage normalized.

Two ways through it, with the same retries, deadlines, error kinds and usage: OpenAI-compatible servers that
LiteLLM would only pass the request to take the lean path (`openai_http`: aiohttp and orjson, a fraction of the
CPU), unless MOM_LEAN_CALLS is false; every other provider goes through LiteLLM.
"""

from __future__ import annotations

import asyncio
import email.utils
import math
import os
import random
import re
import socket
import time
from collections.abc import AsyncGenerator, Awaitable, Callable, Mapping
from dataclasses import dataclass
from functools import partial
from typing import Any, TypeVar

import aiohttp
import httpx

from mom_service import openai_http
from mom_service.config import LLMDefinition, MoMConfig
from mom_service.events import Usage
from mom_service.redaction import Redactor, scrub

# LiteLLM fetches its model cost map from the internet at import unless told to use the bundled one.
os.environ.setdefault("LITELLM_LOCAL_MODEL_COST_MAP", "True")

import litellm  # must follow the environment variable above
import openai

BACKOFF_BASE_S = 0.25
BACKOFF_MAX_S = 8.0
TRANSIENT_KINDS = frozenset({"rate_limited", "connection", "timeout", "truncated"})
NO_KEY = "no-key"
# The output limit of a call: the client's and the operator's, under either name; each call carries one, as
# `max_tokens` (LiteLLM renames it for the providers that want another name, e.g. OpenAI's reasoning models).
LIMIT_NAMES = ("max_tokens", "max_completion_tokens")
# Token counting costs CPU in proportion to the text: past this many characters, a call's tokens are estimated
# from a sample of this size, scaled to the whole (the count is an estimate either way, and marked as one).
COUNT_SAMPLE_CHARS = 16_384
COUNT_SAMPLE_MESSAGES = 64
TRUNCATED = "the stream ended before the LLM finished its answer"
T = TypeVar("T")


class LLMCallError(Exception):
    """An upstream call failed.

    `kind`: timeout, rate_limited, http_error, connection, truncated, missing_key or error. `message` is safe to
    show a client, the concluding LLM and the usage records (scrubbed: no URLs, hosts, addresses, paths or variable
    names); `detail` is the full text (redacted), for the log only. `reached`: the request reached the provider,
    which may have processed and billed it (a timeout, a connection lost after sending, a stream cut short), as
    opposed to one refused with an error status or never sent: the engine then charges an estimate.
    """

    def __init__(
        self,
        kind: str,
        message: str,
        status: int | None = None,
        *,
        reached: bool = False,
        detail: str | None = None,
    ) -> None:
        super().__init__(message)
        self.kind = kind
        self.message = message
        self.status = status
        self.reached = reached
        self.detail = detail if detail is not None else message


@dataclass(slots=True)
class StreamEnd:
    """The last item of a stream: why it ended, and the usage when the provider reported it."""

    finish_reason: str
    usage: Usage | None


@dataclass(slots=True)
class CallResult:
    text: str
    usage: Usage | None
    latency_ms: float


def configure_litellm(verbose: bool) -> None:
    """Process-wide LiteLLM settings, applied once at start-up."""
    litellm.suppress_debug_info = True
    litellm.drop_params = True
    litellm.telemetry = False
    if verbose:
        litellm._turn_on_debug()


def is_transient(error: LLMCallError) -> bool:
    """Worth another try: 429, 5xx, connection errors and timeouts; never 400/401/403/404/422 or a policy refusal."""
    if error.kind in TRANSIENT_KINDS:
        return True
    return error.kind == "http_error" and error.status is not None and (error.status >= 500 or error.status == 408)


def retry_after(exc: BaseException) -> float | None:
    """Seconds from a Retry-After header on the provider's answer (seconds or an HTTP date), if any."""
    response = getattr(exc, "response", None)
    headers = getattr(response, "headers", None) or getattr(exc, "litellm_response_headers", None)
    if not headers:
        return None
    value = headers.get("retry-after")
    if value is None:
        return None
    try:
        return max(float(value), 0.0)
    except ValueError:
        pass
    try:
        when = email.utils.parsedate_to_datetime(value)
    except (TypeError, ValueError):
        return None
    return max(when.timestamp() - time.time(), 0.0)


def retry_delay(error: LLMCallError, after: float | None, attempt: int, retries: int, remaining: float) -> float | None:
    """How long to wait before the next attempt, or None when there is none: not transient, retries used up, or
    the wait (Retry-After, else exponential backoff with full jitter) does not fit before the deadline."""
    if attempt >= retries or not is_transient(error):
        return None
    backoff = min(BACKOFF_MAX_S, BACKOFF_BASE_S * 2**attempt)
    delay = after if after is not None else random.uniform(0, backoff)  # full jitter
    return delay if delay < remaining else None


# LiteLLM's messages start with the names of the exceptions it wrapped: `litellm.APIConnectionError:
# APIConnectionError: OpenAIException - <what the provider said>`.
_EXCEPTION_PREFIX = re.compile(r"^(?:(?:litellm\.)?\w+(?:Error|Exception)(?::|\s+-)\s*)+")


def _provider_message(exc: BaseException) -> str:
    """What the provider said (the error body's message, which the SDKs and the lean path keep), without the
    exception names LiteLLM puts in front of it."""
    text = getattr(exc, "message", None)
    if not isinstance(text, str):
        text = str(exc)
    return _EXCEPTION_PREFIX.sub("", text.strip())


# A stream that stopped before its end: the connection closed mid-body, or (LiteLLM) a clean end without a finish.
_CUT_SHORT = (
    httpx.TransportError,
    aiohttp.ClientPayloadError,
    aiohttp.ServerDisconnectedError,
    openai.APIConnectionError,  # LiteLLM's own, for a stream that ended cleanly before its finish
)


def _cut_short(exc: BaseException) -> bool:
    return _in_chain(exc, _CUT_SHORT)


_CONNECTION_ERRORS = (openai.APIConnectionError, aiohttp.ClientError, httpx.TransportError)
_CONNECT_ERRORS = (aiohttp.ClientConnectorError, httpx.ConnectError, ConnectionRefusedError, socket.gaierror)


def _never_sent(exc: BaseException) -> bool:
    """Whether a connection error happened before the request was sent (it could not connect): nothing to pay."""
    return _in_chain(exc, _CONNECT_ERRORS)


def _in_chain(exc: BaseException, kinds: tuple[type[BaseException], ...]) -> bool:
    """Whether `exc`, or an exception it was raised from or during, is one of `kinds`."""
    seen: set[int] = set()
    current: BaseException | None = exc
    while current is not None and id(current) not in seen:
        if isinstance(current, kinds):
            return True
        seen.add(id(current))
        current = current.__cause__ or current.__context__
    return False


def _litellm_finished(stream: Any, finish_reason: str | None) -> bool:
    """Whether a LiteLLM stream reached its end. LiteLLM gives every stream a last chunk with a finish_reason, making
    one up ("stop") when the provider sent none (its OpenAI path raises instead): its own record of what the
    provider sent decides, where this LiteLLM keeps one."""
    if getattr(stream, "is_mock", False) or not hasattr(stream, "received_finish_reason"):
        return finish_reason is not None  # (a mock_response stream, as the demo config's, records none)
    return bool(
        stream.received_finish_reason
        or getattr(stream, "intermittent_finish_reason", None)
        or getattr(stream, "received_any_finish_reason", False)
    )


def cost_map_entry(model: str) -> dict[str, Any] | None:
    """LiteLLM's bundled cost-map entry for a model string, or None when the model is not in it."""
    try:
        info = litellm.get_model_info(model)
    except Exception:
        return None
    return dict(info)


def supports_vision(model: str) -> bool | None:
    """Whether LiteLLM's model info says the model sees images; None when the model is unknown to it."""
    try:
        return bool(litellm.supports_vision(model=model))
    except Exception:
        return None


def _field(obj: Any, name: str) -> Any:
    """A field of LiteLLM's response objects, or of the lean path's JSON (dicts)."""
    return obj.get(name) if isinstance(obj, dict) else getattr(obj, name, None)


def _chunk_parts(chunk: Any) -> tuple[str | None, str | None, Any]:
    """(content, finish_reason, raw usage) of one streamed chunk, LiteLLM's object or the lean path's JSON."""
    choices = _field(chunk, "choices")
    if not choices:
        return None, None, _field(chunk, "usage")
    choice = choices[0]
    return _field(_field(choice, "delta"), "content"), _field(choice, "finish_reason"), _field(chunk, "usage")


def _usage_from(raw: Any) -> Usage | None:
    """Usage as the provider reported it (None when it did not: the engine then counts it itself)."""
    if raw is None:
        return None
    details = _field(raw, "completion_tokens_details")
    prompt_details = _field(raw, "prompt_tokens_details")
    return Usage(
        prompt_tokens=int(_field(raw, "prompt_tokens") or 0),
        completion_tokens=int(_field(raw, "completion_tokens") or 0),
        reasoning_tokens=int(_field(details, "reasoning_tokens") or 0) if details is not None else 0,
        cached_tokens=int(_field(prompt_details, "cached_tokens") or 0) if prompt_details is not None else 0,
    )


def _tokens(model: str, texts: list[str]) -> int:
    """Tokens of some texts; past COUNT_SAMPLE_CHARS in all, of a sample of that size scaled to the whole."""
    total = sum(map(len, texts))
    sample: list[str] = []
    taken = 0
    for text in texts:
        sample.append(text[: COUNT_SAMPLE_CHARS - taken])
        taken += len(sample[-1])
        if taken >= COUNT_SAMPLE_CHARS:
            break
    counted = int(litellm.token_counter(model=model, text="\n".join(sample), count_response_tokens=True))
    return counted if taken >= total else math.ceil(counted * total / max(taken, 1))


def count_text(model: str, text: str) -> int:
    """Our count of an answer's tokens (4 characters a token when the tokenizer fails)."""
    if not text:
        return 0
    try:
        return _tokens(model, [text])
    except Exception:
        return len(text) // 4


# LiteLLM's count of a conversation adds per message (its role and separators) and once for the reply's start.
PER_MESSAGE_TOKENS = 3
REPLY_PRIMING_TOKENS = 3


def count_prompt(model: str, messages: list[dict[str, Any]]) -> int:
    """Our count of a conversation's tokens, its text only (LiteLLM's counter would download an image URL to size
    it): LiteLLM's own count of its start (COUNT_SAMPLE_CHARS of text, COUNT_SAMPLE_MESSAGES messages at most),
    whose text tokens are scaled to the whole text."""
    if not messages:
        return 0
    texts = [_text_of(m.get("content")) for m in messages]
    total = sum(map(len, texts))
    try:
        sample: list[dict[str, Any]] = []
        taken = 0
        for message, text in zip(messages, texts, strict=True):
            piece = text[: COUNT_SAMPLE_CHARS - taken]
            sample.append({**message, "content": piece})
            taken += len(piece)
            if taken >= COUNT_SAMPLE_CHARS or len(sample) >= COUNT_SAMPLE_MESSAGES:
                break
        counted = int(litellm.token_counter(model=model, messages=sample))
        if taken >= total and len(sample) == len(messages):
            return counted
        overhead = PER_MESSAGE_TOKENS * len(sample) + REPLY_PRIMING_TOKENS
        text_tokens = math.ceil((counted - overhead) * total / max(taken, 1))
        return text_tokens + PER_MESSAGE_TOKENS * len(messages) + REPLY_PRIMING_TOKENS
    except Exception:  # a tokenizer problem must not hide the call: count roughly, 4 characters a token
        return total // 4


def _own_copy(messages: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Messages LiteLLM may change in place (its adapters do) without touching the conversation that other calls
    of the request share: each message, content list and part copied (the strings are not: they cannot change)."""
    return [
        {**m, "content": [dict(p) for p in m["content"]]} if isinstance(m.get("content"), list) else dict(m)
        for m in messages
    ]


def _text_of(content: Any) -> str:
    if isinstance(content, str):
        return content
    if isinstance(content, list):
        return "\n".join(p["text"] for p in content if isinstance(p, dict) and isinstance(p.get("text"), str))
    return ""


class LLMCaller:
    """Calls the configured LLMs. Keys are read once from the environment; per-call work stays small."""

    def __init__(self, config: MoMConfig, env: Mapping[str, str], redactor: Redactor, *, lean: bool = True) -> None:
        self._redact = redactor
        self._static: dict[str, dict[str, Any]] = {}
        self._ceiling: dict[str, int] = {}  # the operator's output limit per LLM (its params' max_tokens)
        self._missing_key: dict[str, str] = {}
        self._lean: dict[str, openai_http.LeanRoute] = {}
        catalog = frozenset(litellm.open_ai_chat_completion_models) | frozenset(litellm.open_ai_text_completion_models)
        for llm in config.llm_definitions:
            body_params = {k: v for k, v in llm.params.items() if k not in LIMIT_NAMES}
            limits = [int(llm.params[name]) for name in LIMIT_NAMES if llm.params.get(name) is not None]
            if limits:
                self._ceiling[llm.name] = min(limits)
            static = dict(body_params)
            static["model"] = llm.model
            static["num_retries"] = 0  # LiteLLM's own retries: off, ours are the only ones
            static["max_retries"] = 0  # the OpenAI client's hidden retries: off
            static["timeout"] = llm.timeout
            if llm.api_base:
                static["api_base"] = llm.api_base
            if llm.api_key_env:
                key = env.get(llm.api_key_env)
                if key:
                    static["api_key"] = key
                else:
                    self._missing_key[llm.name] = llm.api_key_env
            elif llm.api_base:
                # Without this LiteLLM would send the provider's default key (OPENAI_API_KEY, ...) from the
                # environment to whatever server api_base names. A keyless local server ignores this value.
                static["api_key"] = NO_KEY
            self._static[llm.name] = static
            if lean and llm.name not in self._missing_key:
                route = openai_http.lean_route(llm, static.get("api_key", NO_KEY), catalog, body_params)
                if route is not None:
                    self._lean[llm.name] = route
        self._session: aiohttp.ClientSession | None = None  # made on the first lean call, in the running loop

    def is_lean(self, llm: LLMDefinition) -> bool:
        """Whether this LLM's calls take the lean path (else LiteLLM)."""
        return llm.name in self._lean

    def _lean_session(self) -> aiohttp.ClientSession:
        if self._session is None or self._session.closed:
            self._session = openai_http.new_session()
        return self._session

    async def aclose(self) -> None:
        if self._session is not None:
            await self._session.close()

    def estimate_usage(self, llm: LLMDefinition, messages: list[dict[str, Any]], text: str) -> Usage:
        """Our own count of a call's tokens, for a call whose provider reported none (cut off, failed on the way,
        or a server that does not report usage). Bounded in CPU whatever the size of the conversation."""
        return Usage(prompt_tokens=count_prompt(llm.model, messages), completion_tokens=count_text(llm.model, text))

    def call_params(self, llm: LLMDefinition, params: Mapping[str, Any]) -> dict[str, Any]:
        """The request's parameters as this LLM's call carries them: one output limit, `max_tokens`, the smallest
        of the client's (under either name) and the operator's (a client may lower it, never raise it)."""
        limits = [params[name] for name in LIMIT_NAMES if params.get(name) is not None]
        ceiling = self._ceiling.get(llm.name)
        if ceiling is not None:
            limits.append(ceiling)
        out = {k: v for k, v in params.items() if k not in LIMIT_NAMES}
        if limits:
            out["max_tokens"] = min(limits)
        return out

    def missing_key(self, llm: LLMDefinition) -> str | None:
        """The environment variable an LLM's key should be in, when it is not set."""
        return self._missing_key.get(llm.name)

    def _kwargs(self, llm: LLMDefinition, messages: list[dict[str, Any]], params: Mapping[str, Any]) -> dict[str, Any]:
        env_var = self._missing_key.get(llm.name)
        if env_var is not None:
            raise LLMCallError(
                "missing_key",
                "no API key is configured for this LLM",
                detail=f"no API key: environment variable {env_var} is not set",
            )
        kwargs = {**self._static[llm.name], **params}
        kwargs["messages"] = _own_copy(messages)
        return kwargs

    @staticmethod
    async def _litellm_call(kwargs: dict[str, Any], deadline: float) -> Any:
        kwargs["timeout"] = max(deadline - asyncio.get_running_loop().time(), 0.001)
        response = await litellm.acompletion(**kwargs)
        if response is None:
            # LiteLLM (with drop_params) answers a 422 by dropping the parameters it names and trying once
            # more; when that fails too it returns None instead of raising.
            raise LLMCallError("http_error", "the provider refused the request (HTTP 422)", 422)
        return response

    async def _attempts(
        self, llm: LLMDefinition, attempt_once: Callable[[], Awaitable[T]], deadline: float, retries: int
    ) -> T:
        """`attempt_once` with our retries: transient errors only, exponential backoff with jitter, honouring
        Retry-After when it fits, and never past the deadline (the LLM's timeout covers every attempt)."""
        loop = asyncio.get_running_loop()
        attempt = 0
        while True:
            try:
                async with asyncio.timeout_at(deadline):
                    return await attempt_once()
            except asyncio.CancelledError:
                raise
            except Exception as exc:
                error = self._map_error(llm, exc)
                delay = retry_delay(error, retry_after(exc), attempt, retries, deadline - loop.time())
                if delay is None:
                    raise error from None
                attempt += 1
                await asyncio.sleep(delay)

    def _map_error(self, llm: LLMDefinition, exc: BaseException, *, mid_stream: bool = False) -> LLMCallError:
        """Our error for whatever a provider call raised: a safe message for clients, the full one for the log.
        `mid_stream`: raised while a stream the server had accepted was read (a cut there is a stream cut short)."""
        if isinstance(exc, LLMCallError):
            return exc
        detail = self._redact(" ".join(str(exc).split())) or type(exc).__name__
        wrapped = getattr(exc, "original_exception", None)  # LiteLLM wraps what failed mid-stream
        if isinstance(wrapped, Exception):
            exc = wrapped
        if isinstance(exc, TimeoutError | openai.APITimeoutError):
            return LLMCallError("timeout", f"timed out after {llm.timeout:g} s", reached=True, detail=detail)
        if isinstance(exc, openai_http.UpstreamTruncated) or (mid_stream and _cut_short(exc)):
            return LLMCallError("truncated", TRUNCATED, reached=True, detail=detail)
        status = getattr(exc, "status_code", None)
        said = scrub(_provider_message(exc), self._redact)
        if isinstance(exc, openai.RateLimitError) or status == 429:
            return LLMCallError("rate_limited", f"upstream HTTP 429: {said or 'rate limited'}", 429, detail=detail)
        if _in_chain(exc, _CONNECTION_ERRORS):  # (LiteLLM reports some as a 500 raised from one)
            if _never_sent(exc):
                return LLMCallError("connection", "could not connect to the provider", detail=detail)
            return LLMCallError("connection", "the connection to the provider failed", reached=True, detail=detail)
        if isinstance(exc, openai_http.UpstreamProtocolError):
            return LLMCallError("error", said, reached=True, detail=detail)
        if isinstance(status, int):
            return LLMCallError(
                "http_error",
                f"upstream HTTP {status}: {said}" if said else f"upstream HTTP {status}",
                status,
                detail=detail,
            )
        return LLMCallError(
            "error", f"{type(exc).__name__}: {said}" if said else type(exc).__name__, reached=True, detail=detail
        )

    async def complete(
        self,
        llm: LLMDefinition,
        messages: list[dict[str, Any]],
        params: Mapping[str, Any],
        *,
        retries: int | None = None,
        encoded: bytes | None = None,
    ) -> CallResult:
        """One whole (non-streamed) call, bounded by the LLM's timeout in total, retries included (`retries`
        overrides the LLM's own setting, e.g. 0 for a health probe). `encoded`: the messages already serialized
        (once for every member that gets the same conversation), sent as they are on the lean path."""
        started = time.perf_counter()
        deadline = asyncio.get_running_loop().time() + llm.timeout
        retries = llm.retries if retries is None else retries
        params = self.call_params(llm, params)
        route = self._lean.get(llm.name)
        response: Any
        if route is not None:
            session = self._lean_session()
            post = partial(openai_http.post_whole, session, route, messages, params, encoded)
            response = await self._attempts(llm, post, deadline, retries)
        else:
            kwargs = self._kwargs(llm, messages, params)
            response = await self._attempts(llm, partial(self._litellm_call, kwargs, deadline), deadline, retries)
        choices = _field(response, "choices")
        message = _field(choices[0], "message") if isinstance(choices, list) and choices else None
        text = _field(message, "content") if message is not None else None
        return CallResult(
            text=text if isinstance(text, str) else "",
            usage=_usage_from(_field(response, "usage")),
            latency_ms=(time.perf_counter() - started) * 1000,
        )

    def stream(
        self, llm: LLMDefinition, messages: list[dict[str, Any]], params: Mapping[str, Any]
    ) -> AsyncGenerator[str | StreamEnd]:
        """A streamed call: yields content deltas as they arrive, then one StreamEnd.

        The LLM's timeout bounds the whole stream, not only the gaps between chunks. The deadline only ever cuts a
        wait for the next chunk, never a `yield`, so it cannot fire into the consumer's code. The call is retried
        (transient errors) only before the server accepted it, never once tokens may have been sent.
        """
        params = self.call_params(llm, params)
        route = self._lean.get(llm.name)
        if route is not None:
            return self._lean_stream(llm, route, messages, params)
        return self._litellm_stream(llm, messages, params)

    async def _lean_stream(
        self,
        llm: LLMDefinition,
        route: openai_http.LeanRoute,
        messages: list[dict[str, Any]],
        params: Mapping[str, Any],
    ) -> AsyncGenerator[str | StreamEnd]:
        loop = asyncio.get_running_loop()
        deadline = loop.time() + llm.timeout
        session = self._lean_session()
        response: aiohttp.ClientResponse | None = None
        chunks: AsyncGenerator[dict[str, Any]] | None = None
        timer: asyncio.TimerHandle | None = None
        expired = False
        usage: Usage | None = None
        finish_reason = "stop"
        try:
            open_stream = partial(openai_http.open_stream, session, route, messages, params)
            response = await self._attempts(llm, open_stream, deadline, llm.retries)
            opened = response

            def expire() -> None:  # one timer for the whole stream, not one per chunk (5 us each)
                nonlocal expired
                expired = True
                opened.close()  # the pending read fails at once

            timer = loop.call_at(deadline, expire)
            chunks = openai_http.events(response)
            async for chunk in chunks:
                content, finished, raw_usage = _chunk_parts(chunk)
                if content:
                    yield content
                if finished:
                    finish_reason = finished
                if raw_usage:
                    usage = _usage_from(raw_usage)
        except (asyncio.CancelledError, GeneratorExit):
            raise
        except Exception as exc:
            if expired:
                raise LLMCallError("timeout", f"timed out after {llm.timeout:g} s", reached=True) from None
            raise self._map_error(llm, exc, mid_stream=response is not None) from None
        finally:
            if timer is not None:
                timer.cancel()
            if chunks is not None:
                await chunks.aclose()
            if response is not None:
                response.release()  # back to the pool when the body was read to its end, else closed
        yield StreamEnd(finish_reason or "stop", usage)

    async def _litellm_stream(
        self, llm: LLMDefinition, messages: list[dict[str, Any]], params: Mapping[str, Any]
    ) -> AsyncGenerator[str | StreamEnd]:
        deadline = asyncio.get_running_loop().time() + llm.timeout
        response: Any = None
        try:
            kwargs = self._kwargs(llm, messages, params)
            kwargs["stream"] = True
            kwargs["stream_options"] = {"include_usage": True}
            response = await self._attempts(llm, partial(self._litellm_call, kwargs, deadline), deadline, llm.retries)
            chunks = response.__aiter__()
            usage: Usage | None = None
            finish_reason: str | None = None
            while True:
                try:
                    async with asyncio.timeout_at(deadline):
                        chunk = await chunks.__anext__()
                except StopAsyncIteration:
                    break
                content, finished, raw_usage = _chunk_parts(chunk)
                if content:
                    yield content
                if finished:
                    finish_reason = finished
                if raw_usage:
                    usage = _usage_from(raw_usage)
            if not _litellm_finished(response, finish_reason):
                raise openai_http.UpstreamTruncated(TRUNCATED)
        except (asyncio.CancelledError, GeneratorExit):
            raise
        except Exception as exc:
            raise self._map_error(llm, exc, mid_stream=response is not None) from None
        finally:
            if response is not None:
                await response.aclose()
        yield StreamEnd(finish_reason or "stop", usage)
