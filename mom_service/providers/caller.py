"""The only door to the LLMs: one call, one stream, exceptions mapped to ours, usage normalized.

Two ways through it, with the same retries, deadlines, error kinds and usage: OpenAI-compatible servers that
LiteLLM would only pass the request to take the lean path (`openai_http`: aiohttp and orjson, a fraction of the
CPU), unless MOM_LEAN_CALLS is false; every other provider goes through LiteLLM.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncGenerator, Awaitable, Callable, Mapping
from functools import partial
from typing import Any, TypeVar

import aiohttp

from mom_service.config import LLMDefinition, MoMConfig
from mom_service.observability.redaction import Redactor
from mom_service.providers import openai_http
from mom_service.providers.answers import (
    CallResult,
    Delta,
    Reading,
    StreamEnd,
    field_of,
    litellm_finished,
    litellm_reported_usage,
    tool_calls_of,
    usage_from,
)
from mom_service.providers.errors import (
    CONTEXT_EXCEEDED,
    TRUNCATED,
    LLMCallError,
    map_error,
    retry_after,
    retry_delay,
)
from mom_service.providers.litellm_api import litellm, openai_catalog
from mom_service.providers.local_servers import LocalServers
from mom_service.providers.tokens import Usage, count_prompt, count_text

__all__ = ["NO_KEY", "CallResult", "Delta", "LLMCaller", "StreamEnd", "configured_limit"]

NO_KEY = "no-key"
# The output limit of a call: the client's and the operator's, under either name; each call carries one, as
# `max_tokens` (LiteLLM renames it for the providers that want another name, e.g. OpenAI's reasoning models).
LIMIT_NAMES = ("max_tokens", "max_completion_tokens")
T = TypeVar("T")


def configured_limit(params: Mapping[str, Any]) -> int | None:
    """The output limit set in some parameters (the smaller, under either name), or None when there is none."""
    limits = [int(params[name]) for name in LIMIT_NAMES if params.get(name) is not None]
    return min(limits) if limits else None


def _own_copy(messages: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Messages LiteLLM may change in place (its adapters do) without touching the conversation that other calls
    of the request share: each message, content list and part copied (the strings are not: they cannot change)."""
    return [
        {**m, "content": [dict(p) for p in m["content"]]} if isinstance(m.get("content"), list) else dict(m)
        for m in messages
    ]


class LLMCaller:
    """Calls the configured LLMs. Keys are read once from the environment; per-call work stays small."""

    def __init__(
        self,
        config: MoMConfig,
        env: Mapping[str, str],
        redactor: Redactor,
        *,
        lean: bool = True,
        pool: openai_http.LeanPool | None = None,
    ) -> None:
        self._redact = redactor
        self.pool = (
            pool if pool is not None else openai_http.LeanPool()
        )  # the lean path's connections (a reloaded config's caller shares it)
        self._static: dict[str, dict[str, Any]] = {}
        self._ceiling: dict[str, int] = {}  # the operator's output limit per LLM (its params' max_tokens)
        self._missing_key: dict[str, str] = {}
        self._lean: dict[str, openai_http.LeanRoute] = {}
        catalog = openai_catalog()
        for llm in config.llm_definitions:
            body_params = {k: v for k, v in llm.params.items() if k not in LIMIT_NAMES}
            limit = configured_limit(llm.params)
            if limit is not None:
                self._ceiling[llm.name] = limit
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
        keys = {name: s["api_key"] for name, s in self._static.items() if s.get("api_key", NO_KEY) != NO_KEY}
        self.local_servers = LocalServers(config.llm_definitions, self.pool.session, keys)  # readiness waits for them

    def is_lean(self, llm: LLMDefinition) -> bool:
        """Whether this LLM's calls take the lean path (else LiteLLM)."""
        return llm.name in self._lean

    def _lean_session(self) -> aiohttp.ClientSession:
        return self.pool.session()

    async def aclose(self) -> None:
        await self.pool.aclose()

    def _map_error(self, llm: LLMDefinition, exc: BaseException, *, mid_stream: bool = False) -> LLMCallError:
        return map_error(exc, timeout_s=llm.timeout, redact=self._redact, mid_stream=mid_stream, name=llm.name)

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
        response = await litellm().acompletion(**kwargs)
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
        choices = field_of(response, "choices")
        message = field_of(choices[0], "message") if isinstance(choices, list) and choices else None
        text = field_of(message, "content") if message is not None else None
        return CallResult(
            text=text if isinstance(text, str) else "",
            usage=usage_from(field_of(response, "usage")),
            tool_calls=tool_calls_of(message),
            finish_reason=field_of(choices[0], "finish_reason") if isinstance(choices, list) and choices else None,
        )

    async def _stream_failure(
        self,
        llm: LLMDefinition,
        messages: list[dict[str, Any]],
        params: Mapping[str, Any],
        error: LLMCallError,
        reading: Reading,
    ) -> LLMCallError:
        """The error a failed stream raises. A local LLM's stream that ended before any answer is asked again
        whole, once: llama.cpp's server accepts a stream it cannot serve (a conversation longer than its context
        window) with a 200 and an empty body, and says why (a 400) only to a whole call. Its context error, if that
        is what it says; else the stream's own. (One retry: the failed stream's connection went back to the pool
        when its body ended, and the server closes it, so the first attempt may find it gone.)"""
        if reading.answered or error.kind != "truncated" or not llm.is_local:
            return error
        try:
            await self.complete(llm, messages, params, retries=1)
        except LLMCallError as why:
            return why if why.kind == CONTEXT_EXCEEDED else error
        except Exception:  # whatever else happened, the stream's own error stands
            return error
        return error

    def stream(
        self,
        llm: LLMDefinition,
        messages: list[dict[str, Any]],
        params: Mapping[str, Any],
        *,
        encoded: bytes | None = None,
    ) -> AsyncGenerator[str | Delta | StreamEnd]:
        """A streamed call (asked with `stream_options.include_usage`): yields content deltas as they arrive, then
        one StreamEnd. `encoded`: the messages already serialized, as `complete` takes them.

        The LLM's timeout bounds the whole stream, not only the gaps between chunks. The deadline only ever cuts a
        wait for the next chunk, never a `yield`, so it cannot fire into the consumer's code. The call is retried
        (transient errors) only before the server accepted it, never once tokens may have been sent.
        """
        params = self.call_params(llm, params)
        route = self._lean.get(llm.name)
        if route is not None:
            return self._lean_stream(llm, route, messages, params, encoded)
        return self._litellm_stream(llm, messages, params)

    async def _lean_stream(
        self,
        llm: LLMDefinition,
        route: openai_http.LeanRoute,
        messages: list[dict[str, Any]],
        params: Mapping[str, Any],
        encoded: bytes | None,
    ) -> AsyncGenerator[str | Delta | StreamEnd]:
        loop = asyncio.get_running_loop()
        deadline = loop.time() + llm.timeout
        session = self._lean_session()
        response: aiohttp.ClientResponse | None = None
        chunks: AsyncGenerator[dict[str, Any]] | None = None
        timer: asyncio.TimerHandle | None = None
        expired = False
        reading = Reading()
        failure: LLMCallError | None = None
        try:
            open_stream = partial(openai_http.open_stream, session, route, messages, params, encoded)
            response = await self._attempts(llm, open_stream, deadline, llm.retries)
            opened = response

            def expire() -> None:  # one timer for the whole stream, not one per chunk (5 us each)
                nonlocal expired
                expired = True
                opened.close()  # the pending read fails at once

            timer = loop.call_at(deadline, expire)
            chunks = openai_http.events(response)
            async for chunk in chunks:
                piece = reading.take(chunk)
                if piece is not None:
                    yield piece
        except (asyncio.CancelledError, GeneratorExit):
            raise
        except Exception as exc:
            if expired:
                raise LLMCallError("timeout", f"timed out after {llm.timeout:g} s", reached=True) from None
            failure = self._map_error(llm, exc, mid_stream=response is not None)
        finally:
            if timer is not None:
                timer.cancel()
            if chunks is not None:
                await chunks.aclose()
            if response is not None:
                response.release()  # back to the pool when the body was read to its end, else closed
        if failure is not None:  # (after the stream's connection is let go: _stream_failure may call again)
            raise await self._stream_failure(llm, messages, params, failure, reading)
        yield StreamEnd(reading.finish_reason or "stop", reading.usage)

    async def _litellm_stream(
        self, llm: LLMDefinition, messages: list[dict[str, Any]], params: Mapping[str, Any]
    ) -> AsyncGenerator[str | Delta | StreamEnd]:
        deadline = asyncio.get_running_loop().time() + llm.timeout
        response: Any = None
        reading = Reading()
        failure: LLMCallError | None = None
        try:
            kwargs = self._kwargs(llm, messages, params)
            kwargs["stream"] = True
            kwargs["stream_options"] = {"include_usage": True}
            response = await self._attempts(llm, partial(self._litellm_call, kwargs, deadline), deadline, llm.retries)
            chunks = response.__aiter__()
            while True:
                try:
                    async with asyncio.timeout_at(deadline):
                        chunk = await chunks.__anext__()
                except StopAsyncIteration:
                    break
                piece = reading.take(chunk)
                if piece is not None:
                    yield piece
            if not litellm_finished(response, reading.finish_reason):
                raise openai_http.UpstreamTruncated(TRUNCATED)
            if not litellm_reported_usage(response):
                reading.usage = None  # LiteLLM's own count, not the provider's: ours, marked as an estimate
        except (asyncio.CancelledError, GeneratorExit):
            raise
        except Exception as exc:
            failure = self._map_error(llm, exc, mid_stream=response is not None)
        finally:
            if response is not None:
                await response.aclose()
        if failure is not None:
            raise await self._stream_failure(llm, messages, params, failure, reading)
        yield StreamEnd(reading.finish_reason or "stop", reading.usage)
