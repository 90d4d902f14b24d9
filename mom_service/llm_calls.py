"""The only door to the LLMs: one call, one stream, exceptions mapped to ours, usage normalized.

Two ways through it, with the same retries, deadlines, error kinds and usage: OpenAI-compatible servers that
LiteLLM would only pass the request to take the lean path (`openai_http`: aiohttp and orjson, a fraction of the
CPU), unless MOM_LEAN_CALLS is false; every other provider goes through LiteLLM.
"""

from __future__ import annotations

import asyncio
import email.utils
import os
import random
import time
from collections.abc import AsyncGenerator, Awaitable, Callable, Mapping
from dataclasses import dataclass
from functools import partial
from typing import Any, TypeVar

import aiohttp

from mom_service import openai_http
from mom_service.config import LLMDefinition, MoMConfig
from mom_service.events import Usage
from mom_service.redaction import Redactor

# LiteLLM fetches its model cost map from the internet at import unless told to use the bundled one.
os.environ.setdefault("LITELLM_LOCAL_MODEL_COST_MAP", "True")

import litellm  # must follow the environment variable above
import openai

_MAX_ERROR_CHARS = 300
BACKOFF_BASE_S = 0.25
BACKOFF_MAX_S = 8.0
TRANSIENT_KINDS = frozenset({"rate_limited", "connection", "timeout"})
NO_KEY = "no-key"
T = TypeVar("T")


class LLMCallError(Exception):
    """An upstream call failed. `kind` is timeout, rate_limited, http_error, connection, missing_key or error."""

    def __init__(self, kind: str, message: str, status: int | None = None) -> None:
        super().__init__(message)
        self.kind = kind
        self.message = message
        self.status = status


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


class LLMCaller:
    """Calls the configured LLMs. Keys are read once from the environment; per-call work stays small."""

    def __init__(self, config: MoMConfig, env: Mapping[str, str], redactor: Redactor, *, lean: bool = True) -> None:
        self._redact = redactor
        self._static: dict[str, dict[str, Any]] = {}
        self._missing_key: dict[str, str] = {}
        self._lean: dict[str, openai_http.LeanRoute] = {}
        catalog = frozenset(litellm.open_ai_chat_completion_models) | frozenset(litellm.open_ai_text_completion_models)
        for llm in config.llm_definitions:
            static: dict[str, Any] = dict(llm.params)
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
            route = openai_http.lean_route(llm, static.get("api_key", NO_KEY), catalog) if lean else None
            if route is not None and llm.name not in self._missing_key:
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
        """Our own count of a call's tokens, for a stream cut off before the provider reported its usage."""
        # Count text only: LiteLLM's counter would download an image URL to size it.
        messages = [
            {**m, "content": [p for p in m["content"] if p.get("type") == "text"]}
            if isinstance(m.get("content"), list)
            else m
            for m in messages
        ]
        try:
            prompt = litellm.token_counter(model=llm.model, messages=messages) if messages else 0
            completion = litellm.token_counter(model=llm.model, text=text, count_response_tokens=True) if text else 0
        except Exception:  # a tokenizer problem must not hide the call: count roughly, 4 characters a token
            prompt = sum(len(str(m.get("content", ""))) for m in messages) // 4
            completion = len(text) // 4
        return Usage(prompt_tokens=int(prompt), completion_tokens=int(completion))

    def missing_key(self, llm: LLMDefinition) -> str | None:
        """The environment variable an LLM's key should be in, when it is not set."""
        return self._missing_key.get(llm.name)

    def _kwargs(self, llm: LLMDefinition, messages: list[dict[str, Any]], params: Mapping[str, Any]) -> dict[str, Any]:
        env_var = self._missing_key.get(llm.name)
        if env_var is not None:
            raise LLMCallError("missing_key", f"no API key: environment variable {env_var} is not set")
        kwargs = {**self._static[llm.name], **params}
        kwargs["messages"] = messages
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

    def _map_error(self, llm: LLMDefinition, exc: BaseException) -> LLMCallError:
        if isinstance(exc, LLMCallError):
            return exc
        if isinstance(exc, TimeoutError | openai.APITimeoutError):
            return LLMCallError("timeout", f"timed out after {llm.timeout:g} s")
        status = getattr(exc, "status_code", None)
        text = self._redact(" ".join(str(exc).split()))[:_MAX_ERROR_CHARS]
        if isinstance(exc, openai.RateLimitError) or status == 429:
            return LLMCallError("rate_limited", text or "rate limited", 429)
        if isinstance(exc, openai.APIConnectionError | aiohttp.ClientError):
            return LLMCallError("connection", text or f"connection error ({type(exc).__name__})")
        if isinstance(exc, openai_http.UpstreamProtocolError):
            return LLMCallError("error", text)
        if isinstance(status, int):
            return LLMCallError("http_error", text or f"upstream HTTP {status}", status)
        return LLMCallError("error", f"{type(exc).__name__}: {text}" if text else type(exc).__name__)

    async def complete(
        self,
        llm: LLMDefinition,
        messages: list[dict[str, Any]],
        params: Mapping[str, Any],
        *,
        retries: int | None = None,
    ) -> CallResult:
        """One whole (non-streamed) call, bounded by the LLM's timeout in total, retries included (`retries`
        overrides the LLM's own setting, e.g. 0 for a health probe)."""
        started = time.perf_counter()
        deadline = asyncio.get_running_loop().time() + llm.timeout
        retries = llm.retries if retries is None else retries
        route = self._lean.get(llm.name)
        response: Any
        if route is not None:
            session = self._lean_session()
            post = partial(openai_http.post_whole, session, route, messages, params)
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
                raise LLMCallError("timeout", f"timed out after {llm.timeout:g} s") from None
            raise self._map_error(llm, exc) from None
        finally:
            if timer is not None:
                timer.cancel()
            if chunks is not None:
                await chunks.aclose()
            if response is not None:
                response.release()  # back to the pool when the body was read to its end, else closed
        yield StreamEnd(finish_reason, usage)

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
            finish_reason = "stop"
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
        except (asyncio.CancelledError, GeneratorExit):
            raise
        except Exception as exc:
            raise self._map_error(llm, exc) from None
        finally:
            if response is not None:
                await response.aclose()
        yield StreamEnd(finish_reason, usage)
