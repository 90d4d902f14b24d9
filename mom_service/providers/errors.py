"""What can go wrong with an upstream call, and what is done about it: our error (a kind, a message safe to show,
the whole text for the log, whether the provider may have billed it), and the retry policy."""

from __future__ import annotations

import email.utils
import random
import re
import socket
import time
from collections.abc import Callable

import aiohttp
import httpx
import openai

from mom_service.observability.redaction import scrub
from mom_service.providers import openai_http

BACKOFF_BASE_S = 0.25
BACKOFF_MAX_S = 8.0
TRANSIENT_KINDS = frozenset({"rate_limited", "connection", "timeout", "truncated"})
TRUNCATED = "the stream ended before the LLM finished its answer"


class LLMCallError(Exception):
    """An upstream call failed.

    `kind`: timeout, rate_limited, http_error, context_length_exceeded, connection, truncated, missing_key or error.
    `message` is safe to show a client, the concluding LLM and the usage records (scrubbed: no URLs, hosts,
    addresses, paths or variable names); `detail` is the full text (redacted), for the log only. `reached`: the
    request reached the provider, which may have processed and billed it (a timeout, a connection lost after
    sending, a stream cut short), as opposed to one refused with an error status or never sent: the engine then
    charges an estimate.
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


# How servers say a conversation does not fit the model's context window: OpenAI and vLLM ("This model's maximum
# context length is N tokens..."), llama.cpp's server (the same words, code `context_length_exceeded`), Ollama ("the
# input length exceeds the context length"), LM Studio ("exceeds context length"), LiteLLM's ContextWindowExceeded.
_CONTEXT_WORDS = re.compile(
    r"maximum context length|context[ _]length[ _]exceeded|exceeds? (?:the )?context (?:length|window)"
    r"|context window exceeded|exceed(?:s|ed)? (?:the )?(?:model'?s? )?context",
    re.IGNORECASE,
)
CONTEXT_EXCEEDED = "context_length_exceeded"


def context_exceeded(exc: BaseException, status: object) -> bool:
    """Whether the provider refused the call because the conversation is longer than the model's context window
    (an HTTP 4xx or, Ollama's older servers, 500, saying so in its code or its message)."""
    if not isinstance(status, int) or status == 429 or not (400 <= status < 500 or status == 500):
        return False
    if getattr(exc, "code", None) == CONTEXT_EXCEEDED:
        return True
    return bool(_CONTEXT_WORDS.search(_provider_message(exc)))


def context_error(name: str, detail: str, status: int | None) -> LLMCallError:
    """The error of a call refused as longer than the LLM's context window: clear, never retried."""
    message = f"the conversation is longer than the context window of the LLM '{name}'"
    return LLMCallError(CONTEXT_EXCEEDED, message, status, detail=detail)


def map_error(
    exc: BaseException,
    *,
    timeout_s: float,
    redact: Callable[[str], str],
    mid_stream: bool = False,
    name: str = "",
) -> LLMCallError:
    """Our error for whatever a provider call raised: a safe message for clients, the full one for the log.
    `mid_stream`: raised while a stream the server had accepted was read (a cut there is a stream cut short).
    `name`: the LLM's, for the messages that name it."""
    if isinstance(exc, LLMCallError):
        return exc
    detail = redact(" ".join(str(exc).split())) or type(exc).__name__
    if type(exc).__name__ == "ContextWindowExceededError":  # LiteLLM's mapping of every provider's way to say it
        return context_error(name, detail, 400)
    wrapped = getattr(exc, "original_exception", None)  # LiteLLM wraps what failed mid-stream
    if isinstance(wrapped, Exception):
        exc = wrapped
    if isinstance(exc, TimeoutError | openai.APITimeoutError):
        return LLMCallError("timeout", f"timed out after {timeout_s:g} s", reached=True, detail=detail)
    if isinstance(exc, openai_http.UpstreamTruncated) or (mid_stream and _cut_short(exc)):
        return LLMCallError("truncated", TRUNCATED, reached=True, detail=detail)
    status = getattr(exc, "status_code", None)
    if context_exceeded(exc, status):
        return context_error(name, detail, status if isinstance(status, int) else 400)
    said = scrub(_provider_message(exc), redact)
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
