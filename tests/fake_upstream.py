"""Fake LLM upstream for tests: speaks OpenAI's Chat Completions API and Anthropic's Messages API.

Runs as a separate process and speaks real HTTP + SSE (starlette + uvicorn)::

    python tests/fake_upstream.py --port 9001 [--host 127.0.0.1] [--http auto|h11|httptools]
    python -m tests.fake_upstream --port 9001

Readiness: ``GET /_control/health`` -> 200 ``{"status": "ok"}``.

Upstream endpoints:

* OpenAI: ``POST /v1/chat/completions`` and ``POST /chat/completions`` (same handler), ``GET /v1/models``
  and ``GET /models``. LiteLLM: ``model: openai/<name>``, ``api_base: <root>/v1`` (:attr:`FakeUpstream.base_url`).
* Anthropic: ``POST /v1/messages``. LiteLLM: ``model: anthropic/<name>``, ``api_base: <root>``
  (:attr:`FakeUpstream.root_url`, no ``/v1``): LiteLLM 1.110.2 appends ``/v1/messages`` to the api_base unless
  it already ends with it, so ``<root>/v1/messages`` works too; ``<root>/v1`` would make it call
  ``/v1/v1/messages``, which is served as well (the log's ``path`` shows which). The ``anthropic-version``
  header is accepted, not required; ``x-api-key`` is logged like any header. A message answer has
  ``stop_reason: "end_turn"`` and ``usage`` with ``input_tokens`` = prompt - cached tokens,
  ``cache_read_input_tokens`` = cached tokens, ``cache_creation_input_tokens`` = 0, ``output_tokens`` (and
  ``output_tokens_details: {thinking_tokens}`` if ``reasoning_tokens`` is set, here and in message_delta); its
  stream is ``message_start`` (usage as above, ``output_tokens`` 1), ``content_block_start``, ``ping``, one
  ``content_block_delta`` (``text_delta``) per token, ``content_block_stop``, ``message_delta``
  (``stop_reason: "end_turn"``, ``usage: {output_tokens}``), ``message_stop``, each with its ``event:`` line.
  ``reasoning_text`` comes first as a ``thinking`` block (``thinking_delta`` per token, then a ``signature_delta``),
  the text block after it at index 1. Errors are ``{"type": "error", "error": {"type", "message"}}``, the type
  by status: 400 invalid_request_error, 401 authentication_error, 403 permission_error, 404 not_found_error,
  413 request_too_large, 429 rate_limit_error, 529 overloaded_error, other 5xx api_error, else
  invalid_request_error (``error_type`` overrides it; ``error_code`` has no place there). On an
  ``end_after_tokens`` stream LiteLLM 1.110.2 yields the text so far without a finish_reason, then raises
  ``MidStreamFallbackError`` ("... Stream ended before a finish_reason was received").

Both protocols share the behaviours, the per-model counters and the log; a per-protocol encoder spells the
answers, stream events and errors. The system prompt (Anthropic's top-level ``system``) counts towards the
default prompt tokens on both.

Behaviour is chosen per request by the body's ``model`` field (exact name; LiteLLM strips the
``openai/`` or ``anthropic/`` prefix). Unconfigured models fall back to the behaviour configured for ``"*"`` if
any, else to the default behaviour (answer ``"Answer from <model>."``, no delay). Behaviour fields (all
optional, see :data:`BEHAVIOUR_FIELDS`):

``text``               answer text; ``{last_user}`` is replaced by the text of the last user message.
``ttft_ms``            delay before the first token (streaming: response headers are sent at once, the
                       role chunk (Anthropic: message_start, content_block_start, ping) and first token after
                       the delay; non-streaming: before the response).
``token_delay_ms``     delay between tokens (non-streaming: tokens * delay added to the response delay).
``status``             HTTP status of an error response (if set and not 200).
``error_message``      overrides the error message; ``error_type`` / ``error_code`` override those fields.
``error_delay_ms``     delay before an error response (default 0: errors are immediate).
``fail_times``         only the first N requests (per model since its last configure/reset) misbehave.
``fail_rate``          fraction 0..1 of requests that misbehave, pseudo-random, deterministic with ``seed``.
``hang_rate``          fraction 0..1 of requests that hang (never answer), drawn with ``fail_rate`` from one
                       number per request: below ``fail_rate`` it misbehaves, in the next ``hang_rate`` it hangs.
``seed``               seed for ``fail_rate`` and ``hang_rate`` (default 0).
``retry_after``        adds a ``Retry-After`` header to error responses.
``hang``               accept the request and never answer (until the client disconnects).
``hang_after_tokens``  streaming: send that many tokens (at most all of them), then hang.
``stop_after_tokens``  streaming: send that many tokens (at most all), then close the connection (no
                       finish chunk, no [DONE]; Anthropic: no content_block_stop, message_delta or
                       message_stop); non-streaming: close the connection, no response, after the delay.
``end_after_tokens``   streaming: send that many tokens (at most all), then end the response cleanly (the HTTP
                       body is complete) with neither a finish chunk nor [DONE] (Anthropic: no
                       content_block_stop, message_delta or message_stop): a stream cut short that no transport
                       error reveals; non-streaming: ignored.
``reset_connection``   close the TCP connection (RST) without any response.
``reasoning_text``     streamed token by token in ``delta.reasoning_content`` (Anthropic: a thinking block)
                       before the content; non-streaming: ``message.reasoning_content`` (a thinking block).
``reasoning_tokens``, ``cached_tokens``, ``prompt_tokens``  usage numbers (``prompt_tokens`` includes the cached
                       ones; ``reasoning_tokens`` are added to the completion/output tokens).

"Misbehaviour" means ``status``, ``reset_connection``, ``hang``, ``hang_after_tokens``, ``stop_after_tokens``
and ``end_after_tokens``. Without ``fail_times``/``fail_rate`` they apply to every request; with them they
apply only to the failing requests (status 500 if no other misbehaviour is configured) and the other
requests get the normal answer. Token counts for ``*_after_tokens`` include reasoning tokens.

Control API (JSON): ``POST /_control/models`` ``{"<model>": {behaviour}, ...}`` (replaces the whole
behaviour of each named model and resets its counters; unknown fields -> 400), ``POST /_control/reset``,
``GET /_control/log``, ``DELETE /_control/log``, ``GET /_control/health``.

Log entries (one per upstream request, appended on arrival and updated in place)::

    {"id", "protocol": "openai" | "anthropic", "model", "path", "stream", "body",
     "headers" (lower-cased; authorization and x-api-key kept as sent),
     "received_at", "first_token_at", "finished_at", "disconnected_at", "tokens_sent",
     "outcome": null (in flight) | "ok" | "error" | "hung" | "stopped" | "ended" | "reset" | "disconnected",
     "status": int | null (null until response headers are sent)}

:class:`FakeUpstream` starts/stops the server process and wraps the control API for tests.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import logging
import random
import re
import socket
import struct
import subprocess
import sys
import time
from abc import ABC, abstractmethod
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from types import TracebackType
from typing import Any, ClassVar, Literal, Self

import httpx
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse
from starlette.routing import Route
from starlette.types import ASGIApp, Message, Receive, Scope, Send

CHAT_PATHS = frozenset({"/v1/chat/completions", "/chat/completions"})
# LiteLLM's anthropic provider appends /v1/messages to api_base (unless it already ends so): the root URL
# gives /v1/messages, the /v1 URL gives /v1/v1/messages. Both are served.
ANTHROPIC_PATHS = frozenset({"/v1/messages", "/v1/v1/messages"})
UPSTREAM_PATHS: dict[str, str] = dict.fromkeys(CHAT_PATHS, "openai") | dict.fromkeys(ANTHROPIC_PATHS, "anthropic")
POLL_INTERVAL_S = 0.02

LogEntry = dict[str, Any]

# field name -> expected kind ("int" = non-negative int, "num" = int or float)
BEHAVIOUR_FIELDS: dict[str, str] = {
    "text": "str",
    "ttft_ms": "int",
    "token_delay_ms": "int",
    "status": "int",
    "error_message": "str",
    "error_type": "str",
    "error_code": "str",
    "error_delay_ms": "int",
    "fail_times": "int",
    "fail_rate": "num",
    "hang_rate": "num",
    "seed": "int",
    "retry_after": "num",
    "hang": "bool",
    "hang_after_tokens": "int",
    "stop_after_tokens": "int",
    "end_after_tokens": "int",
    "reset_connection": "bool",
    "reasoning_tokens": "int",
    "cached_tokens": "int",
    "prompt_tokens": "int",
    "reasoning_text": "str",
}

_TOKEN_RE = re.compile(r"\S+\s*|\s+")


@dataclass(frozen=True)
class Behaviour:
    text: str | None = None
    ttft_ms: int = 0
    token_delay_ms: int = 0
    status: int | None = None
    error_message: str | None = None
    error_type: str | None = None
    error_code: str | None = None
    error_delay_ms: int = 0
    fail_times: int | None = None
    fail_rate: float | None = None
    hang_rate: float | None = None
    seed: int = 0
    retry_after: float | None = None
    hang: bool = False
    hang_after_tokens: int | None = None
    stop_after_tokens: int | None = None
    end_after_tokens: int | None = None
    reset_connection: bool = False
    reasoning_tokens: int = 0
    cached_tokens: int = 0
    prompt_tokens: int | None = None
    reasoning_text: str | None = None

    @classmethod
    def parse(cls, raw: object) -> Behaviour:
        if not isinstance(raw, dict):
            raise TypeError("behaviour must be a JSON object")
        unknown = sorted(set(raw) - set(BEHAVIOUR_FIELDS))
        if unknown:
            raise ValueError(f"unknown behaviour fields {unknown}; known: {sorted(BEHAVIOUR_FIELDS)}")
        values: dict[str, Any] = {}
        for name, value in raw.items():
            if value is None:
                continue
            kind = BEHAVIOUR_FIELDS[name]
            if kind == "str":
                ok = isinstance(value, str)
            elif kind == "bool":
                ok = isinstance(value, bool)
            elif kind == "int":
                ok = isinstance(value, int) and not isinstance(value, bool) and value >= 0
            else:
                ok = isinstance(value, (int, float)) and not isinstance(value, bool) and value >= 0
            if not ok:
                raise ValueError(f"behaviour field {name!r} must be {kind} (non-negative), got {value!r}")
            values[name] = value
        for rate in ("fail_rate", "hang_rate"):
            if rate in values and not 0.0 <= values[rate] <= 1.0:
                raise ValueError(f"{rate} must be within 0..1")
        if values.get("fail_rate", 0) + values.get("hang_rate", 0) > 1.0:
            raise ValueError("fail_rate + hang_rate must be at most 1")
        if "status" in values and not 100 <= values["status"] <= 599:
            raise ValueError("status must be a valid HTTP status")
        return cls(**values)

    @property
    def misbehaves(self) -> bool:
        return (
            (self.status is not None and self.status != 200)
            or self.reset_connection
            or self.hang
            or self.hang_after_tokens is not None
            or self.stop_after_tokens is not None
            or self.end_after_tokens is not None
        )


@dataclass
class _Plan:
    """What a single request does after fail_times / fail_rate gating."""

    error_status: int | None = None
    reset: bool = False
    hang: bool = False
    hang_after: int | None = None
    stop_after: int | None = None
    end_after: int | None = None


@dataclass
class _ModelCounter:
    requests: int
    rng: random.Random


def _error_type_code(status: int) -> tuple[str, str | None]:
    if status == 401:
        return "invalid_request_error", "invalid_api_key"
    if status == 403:
        return "permission_error", None
    if status == 404:
        return "invalid_request_error", "model_not_found"
    if status == 429:
        return "requests", "rate_limit_exceeded"
    if status >= 500:
        return "server_error", None
    return "invalid_request_error", None


_ANTHROPIC_ERROR_TYPES: dict[int, str] = {
    400: "invalid_request_error",
    401: "authentication_error",
    403: "permission_error",
    404: "not_found_error",
    413: "request_too_large",
    429: "rate_limit_error",
    500: "api_error",
    529: "overloaded_error",
}


def _anthropic_error_type(status: int) -> str:
    default = "api_error" if status >= 500 else "invalid_request_error"
    return _ANTHROPIC_ERROR_TYPES.get(status, default)


def _content_text(content: object) -> str:
    if isinstance(content, str):
        return content
    if isinstance(content, list):
        texts = [part.get("text") for part in content if isinstance(part, dict)]
        return " ".join(text for text in texts if isinstance(text, str))
    return ""


def _messages(body: dict[str, Any]) -> list[dict[str, Any]]:
    messages = body.get("messages")
    if not isinstance(messages, list):
        return []
    return [m for m in messages if isinstance(m, dict)]


def _last_user_text(body: dict[str, Any]) -> str:
    for message in reversed(_messages(body)):
        if message.get("role") == "user":
            return _content_text(message.get("content"))
    return ""


def _prompt_word_count(body: dict[str, Any]) -> int:
    # Anthropic's Messages API carries the system prompt beside the messages, not among them.
    words = len(_content_text(body.get("system")).split())
    words += sum(len(_content_text(m.get("content")).split()) for m in _messages(body))
    return max(1, words)


def split_tokens(text: str) -> list[str]:
    """Split ``text`` into tokens whose concatenation is exactly ``text``."""
    return _TOKEN_RE.findall(text)


def _dumps(obj: object) -> bytes:
    return json.dumps(obj, separators=(",", ":")).encode()


def _sse(data: object, event: str | None = None) -> bytes:
    head = f"event: {event}\n".encode() if event else b""
    return head + b"data: " + _dumps(data) + b"\n\n"


Kind = Literal["reasoning", "text"]
"""What a streamed token belongs to: the reasoning (thinking) or the answer text."""


@dataclass(frozen=True)
class _Usage:
    """Token counts of one answer, whatever the protocol."""

    prompt: int  # all input tokens, the cached ones included
    cached: int
    completion: int  # answer tokens + reasoning tokens
    reasoning: int


class _Encoder(ABC):
    """How one protocol spells an answer, its stream events and its errors (one instance per request)."""

    protocol: ClassVar[str]

    def __init__(self, request_id: int, model: str, body: dict[str, Any]) -> None:
        self.request_id = request_id
        self.model = model
        self.body = body
        self.created = int(time.time())

    @abstractmethod
    def error(self, status: int, message: str, error_type: str | None, code: str | None) -> dict[str, Any]:
        """The JSON body of an error response."""

    @abstractmethod
    def message(self, answer: str, reasoning: str | None, usage: _Usage) -> dict[str, Any]:
        """The JSON body of a non-streamed answer."""

    @abstractmethod
    def stream_start(self, usage: _Usage, first: Kind) -> bytes:
        """The SSE events sent before the first token (``first`` is the kind of that token)."""

    @abstractmethod
    def stream_token(self, kind: Kind, token: str) -> bytes:
        """The SSE event(s) carrying one token."""

    @abstractmethod
    def stream_end(self, usage: _Usage) -> list[bytes]:
        """The SSE events that end a complete stream, in order (the last one ends the HTTP body)."""


class _OpenAIEncoder(_Encoder):
    protocol = "openai"

    def __init__(self, request_id: int, model: str, body: dict[str, Any]) -> None:
        super().__init__(request_id, model, body)
        stream_options = body.get("stream_options")
        self.include_usage = isinstance(stream_options, dict) and stream_options.get("include_usage") is True
        self.id = f"chatcmpl-fake-{request_id}"

    def error(self, status: int, message: str, error_type: str | None, code: str | None) -> dict[str, Any]:
        default_type, default_code = _error_type_code(status)
        return {
            "error": {
                "message": message,
                "type": error_type or default_type,
                "param": None,
                "code": code if code is not None else default_code,
            }
        }

    @staticmethod
    def _usage(usage: _Usage) -> dict[str, Any]:
        return {
            "prompt_tokens": usage.prompt,
            "completion_tokens": usage.completion,
            "total_tokens": usage.prompt + usage.completion,
            "completion_tokens_details": {
                "reasoning_tokens": usage.reasoning,
                "audio_tokens": 0,
                "accepted_prediction_tokens": 0,
                "rejected_prediction_tokens": 0,
            },
            "prompt_tokens_details": {"cached_tokens": usage.cached, "audio_tokens": 0},
        }

    def message(self, answer: str, reasoning: str | None, usage: _Usage) -> dict[str, Any]:
        message: dict[str, Any] = {"role": "assistant", "content": answer, "refusal": None, "annotations": []}
        if reasoning is not None:
            message["reasoning_content"] = reasoning
        return {
            "id": self.id,
            "object": "chat.completion",
            "created": int(time.time()),
            "model": self.model,
            "system_fingerprint": None,
            "choices": [{"index": 0, "message": message, "logprobs": None, "finish_reason": "stop"}],
            "usage": self._usage(usage),
        }

    def _chunk(self, delta: dict[str, Any], finish_reason: str | None = None) -> bytes:
        data: dict[str, Any] = {
            "id": self.id,
            "object": "chat.completion.chunk",
            "created": self.created,
            "model": self.model,
            "system_fingerprint": None,
            "choices": [{"index": 0, "delta": delta, "logprobs": None, "finish_reason": finish_reason}],
        }
        if self.include_usage:
            data["usage"] = None
        return _sse(data)

    def stream_start(self, usage: _Usage, first: Kind) -> bytes:
        return self._chunk({"role": "assistant", "content": ""})

    def stream_token(self, kind: Kind, token: str) -> bytes:
        return self._chunk({"reasoning_content" if kind == "reasoning" else "content": token})

    def stream_end(self, usage: _Usage) -> list[bytes]:
        events = [self._chunk({}, "stop")]
        if self.include_usage:
            usage_chunk = {
                "id": self.id,
                "object": "chat.completion.chunk",
                "created": self.created,
                "model": self.model,
                "system_fingerprint": None,
                "choices": [],
                "usage": self._usage(usage),
            }
            events.append(_sse(usage_chunk))
        events.append(b"data: [DONE]\n\n")
        return events


class _AnthropicEncoder(_Encoder):
    """Anthropic Messages API: reasoning goes in a ``thinking`` block before the ``text`` block."""

    protocol = "anthropic"
    signature = "fake-signature"

    def __init__(self, request_id: int, model: str, body: dict[str, Any]) -> None:
        super().__init__(request_id, model, body)
        self.id = f"msg_fake_{request_id}"
        self._block_index = -1
        self._block_kind: Kind | None = None

    def error(self, status: int, message: str, error_type: str | None, code: str | None) -> dict[str, Any]:
        return {"type": "error", "error": {"type": error_type or _anthropic_error_type(status), "message": message}}

    @staticmethod
    def _output_usage(usage: _Usage) -> dict[str, Any]:
        output: dict[str, Any] = {"output_tokens": usage.completion}
        if usage.reasoning:
            output["output_tokens_details"] = {"thinking_tokens": usage.reasoning}
        return output

    @staticmethod
    def _input_usage(usage: _Usage) -> dict[str, Any]:
        # Anthropic's input_tokens leave out the cached tokens (total input = the sum of the three).
        return {
            "input_tokens": max(0, usage.prompt - usage.cached),
            "cache_read_input_tokens": usage.cached,
            "cache_creation_input_tokens": 0,
        }

    def message(self, answer: str, reasoning: str | None, usage: _Usage) -> dict[str, Any]:
        content: list[dict[str, Any]] = []
        if reasoning is not None:
            content.append({"type": "thinking", "thinking": reasoning, "signature": self.signature})
        content.append({"type": "text", "text": answer})
        return {
            "id": self.id,
            "type": "message",
            "role": "assistant",
            "model": self.model,
            "content": content,
            "stop_reason": "end_turn",
            "stop_sequence": None,
            "usage": {**self._input_usage(usage), **self._output_usage(usage)},
        }

    def _open_block(self, kind: Kind) -> bytes:
        self._block_index += 1
        self._block_kind = kind
        block = {"type": "thinking", "thinking": ""} if kind == "reasoning" else {"type": "text", "text": ""}
        start = {"type": "content_block_start", "index": self._block_index, "content_block": block}
        return _sse(start, "content_block_start")

    def _delta(self, delta: dict[str, Any]) -> bytes:
        return _sse({"type": "content_block_delta", "index": self._block_index, "delta": delta}, "content_block_delta")

    def _close_block(self) -> bytes:
        signature = b""
        if self._block_kind == "reasoning":
            signature = self._delta({"type": "signature_delta", "signature": self.signature})
        self._block_kind = None
        return signature + _sse({"type": "content_block_stop", "index": self._block_index}, "content_block_stop")

    def stream_start(self, usage: _Usage, first: Kind) -> bytes:
        message: dict[str, Any] = {
            "id": self.id,
            "type": "message",
            "role": "assistant",
            "model": self.model,
            "content": [],
            "stop_reason": None,
            "stop_sequence": None,
            "usage": {**self._input_usage(usage), "output_tokens": 1},  # as Anthropic does: 1 so far
        }
        started = _sse({"type": "message_start", "message": message}, "message_start")
        return started + self._open_block(first) + _sse({"type": "ping"}, "ping")

    def stream_token(self, kind: Kind, token: str) -> bytes:
        switch = b"" if kind == self._block_kind else self._close_block() + self._open_block(kind)
        delta = (
            {"type": "thinking_delta", "thinking": token}
            if kind == "reasoning"
            else {"type": "text_delta", "text": token}
        )
        return switch + self._delta(delta)

    def stream_end(self, usage: _Usage) -> list[bytes]:
        # The answer always has a text block, an empty one after reasoning alone (as in a non-streamed message).
        blocks = b"" if self._block_kind == "text" else self._close_block() + self._open_block("text")
        blocks += self._close_block()
        message_delta = {
            "type": "message_delta",
            "delta": {"stop_reason": "end_turn", "stop_sequence": None},
            "usage": self._output_usage(usage),
        }
        return [blocks, _sse(message_delta, "message_delta"), _sse({"type": "message_stop"}, "message_stop")]


class _Exchange:
    """One in-flight upstream request: disconnect watching, timed sleeps and raw sends."""

    def __init__(self, scope: Scope, receive: Receive, send: Send, entry: LogEntry) -> None:
        self.scope = scope
        self._receive = receive
        self._send = send
        self.entry = entry
        self.disconnected = asyncio.Event()
        self.disconnected_at: float | None = None
        self.completing = False
        self._watcher = asyncio.ensure_future(self._watch())

    async def _watch(self) -> None:
        # The body has been consumed already, so the next message from the server is http.disconnect
        # (uvicorn delivers it as soon as the connection is lost).
        while True:
            message = await self._receive()
            if message["type"] == "http.disconnect":
                if not self.completing:
                    self.disconnected_at = time.time()
                    self.disconnected.set()
                return

    def close(self) -> None:
        self._watcher.cancel()

    def record_disconnect(self) -> None:
        now = time.time()
        self.entry["outcome"] = "disconnected"
        self.entry["disconnected_at"] = self.disconnected_at or now
        self.entry["finished_at"] = now

    async def sleep(self, seconds: float) -> bool:
        """Sleep; return False (and record it) if the client disconnected meanwhile."""
        if seconds > 0 and not self.disconnected.is_set():
            with contextlib.suppress(asyncio.TimeoutError):
                await asyncio.wait_for(self.disconnected.wait(), timeout=seconds)
        if self.disconnected.is_set():
            self.record_disconnect()
            return False
        return True

    async def hang(self) -> None:
        self.entry["outcome"] = "hung"
        await self.disconnected.wait()
        self.record_disconnect()

    async def send(self, message: Message) -> bool:
        """Send a message; return False (and record it) if the client is gone."""
        if self.disconnected.is_set():
            self.record_disconnect()
            return False
        try:
            await self._send(message)
        except OSError:
            self.disconnected_at = self.disconnected_at or time.time()
            self.disconnected.set()
        if self.disconnected.is_set():
            self.record_disconnect()
            return False
        return True

    async def start_response(self, status: int, headers: dict[str, str]) -> bool:
        raw = [(k.lower().encode("latin-1"), v.encode("latin-1")) for k, v in headers.items()]
        ok = await self.send({"type": "http.response.start", "status": status, "headers": raw})
        if ok:
            self.entry["status"] = status
        return ok

    async def finish(self, body: bytes) -> None:
        self.completing = True
        await self._send({"type": "http.response.body", "body": body, "more_body": False})

    async def close_connection(self, reset: bool) -> None:
        """Close the TCP connection without completing the response (RST if ``reset``)."""
        transport = getattr(getattr(self._send, "__self__", None), "transport", None)
        if transport is None:
            raise RuntimeError("fake upstream: cannot reach the transport to close the connection")
        self.completing = True
        if reset:
            sock = transport.get_extra_info("socket")
            if sock is not None:
                with contextlib.suppress(OSError):
                    sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
            transport.abort()
        else:
            transport.close()  # flushes what was already written, then FIN
        # Let the server notice the lost connection so it neither logs nor answers with a 500.
        await asyncio.wait({self._watcher}, timeout=2.0)


class FakeState:
    def __init__(self) -> None:
        self.behaviours: dict[str, Behaviour] = {}
        self.counters: dict[str, _ModelCounter] = {}
        self.log: list[LogEntry] = []
        self.next_id = 1

    # ----- control -----
    def configure(self, raw: object) -> list[str]:
        if not isinstance(raw, dict):
            raise TypeError("body must be a JSON object {model: behaviour}")
        parsed = {str(name): Behaviour.parse(value) for name, value in raw.items()}
        for name, behaviour in parsed.items():
            self.behaviours[name] = behaviour
            self.counters.pop(name, None)
            if name == "*":
                for model in list(self.counters):
                    if model not in self.behaviours:
                        del self.counters[model]
        return sorted(parsed)

    def reset(self) -> None:
        self.behaviours.clear()
        self.counters.clear()
        self.log.clear()

    def behaviour_for(self, model: str) -> Behaviour:
        return self.behaviours.get(model) or self.behaviours.get("*") or Behaviour()

    def plan_for(self, model: str, behaviour: Behaviour) -> _Plan:
        counter = self.counters.get(model)
        if counter is None:
            counter = self.counters[model] = _ModelCounter(0, random.Random(behaviour.seed))
        counter.requests += 1
        gated = behaviour.fail_times is not None or behaviour.fail_rate is not None
        if behaviour.hang_rate is not None and not (
            behaviour.fail_times is not None and counter.requests <= behaviour.fail_times
        ):
            # one draw decides: below fail_rate the request misbehaves, in the next hang_rate it hangs
            draw = counter.rng.random()
            fail_rate = behaviour.fail_rate or 0.0
            if draw < fail_rate:
                pass  # misbehaves, below
            elif draw < fail_rate + behaviour.hang_rate:
                return _Plan(hang=True)
            else:
                return _Plan()
        elif gated:
            if behaviour.fail_times is not None and counter.requests <= behaviour.fail_times:
                failing = True
            elif behaviour.fail_rate is not None:
                failing = counter.rng.random() < behaviour.fail_rate
            else:
                failing = False
            if not failing:
                return _Plan()
        status = behaviour.status if behaviour.status not in (None, 200) else None
        if gated and status is None and not behaviour.misbehaves:
            status = 500
        return _Plan(
            error_status=status,
            reset=behaviour.reset_connection,
            hang=behaviour.hang,
            hang_after=behaviour.hang_after_tokens,
            stop_after=behaviour.stop_after_tokens,
            end_after=behaviour.end_after_tokens,
        )

    # ----- upstream -----
    async def handle_upstream(self, scope: Scope, receive: Receive, send: Send, protocol: str) -> None:
        chunks: list[bytes] = []
        while True:
            message = await receive()
            if message["type"] == "http.disconnect":
                return
            chunks.append(message.get("body", b""))
            if not message.get("more_body", False):
                break
        received_at = time.time()
        headers: dict[str, str] = {}
        for raw_name, raw_value in scope["headers"]:
            name = raw_name.decode("latin-1").lower()
            value = raw_value.decode("latin-1")
            headers[name] = f"{headers[name]}, {value}" if name in headers else value
        body: object
        try:
            body = json.loads(b"".join(chunks) or b"null")
        except ValueError:
            body = b"".join(chunks).decode("utf-8", "replace")
        body_dict: dict[str, Any] = body if isinstance(body, dict) else {}
        model = body_dict.get("model")
        model = model if isinstance(model, str) else ""
        entry: LogEntry = {
            "id": self.next_id,
            "protocol": protocol,
            "model": model,
            "path": scope["path"],
            "stream": body_dict.get("stream") is True,
            "body": body,
            "headers": headers,
            "received_at": received_at,
            "first_token_at": None,
            "finished_at": None,
            "disconnected_at": None,
            "tokens_sent": 0,
            "outcome": None,
            "status": None,
        }
        self.next_id += 1
        self.log.append(entry)
        encoder = ENCODERS[protocol](entry["id"], model, body_dict)
        exchange = _Exchange(scope, receive, send, entry)
        try:
            if not isinstance(body, dict) or not model or not isinstance(body.get("messages"), list):
                await self._send_error(exchange, encoder, 400, "fake upstream: body needs 'model' and 'messages'")
                return
            behaviour = self.behaviour_for(model)
            plan = self.plan_for(model, behaviour)
            if plan.error_status is not None:
                if await exchange.sleep(behaviour.error_delay_ms / 1000):
                    await self._send_failure(exchange, encoder, behaviour, plan.error_status)
                return
            if plan.reset:
                entry["outcome"] = "reset"
                entry["finished_at"] = time.time()
                await exchange.close_connection(reset=True)
                return
            if plan.hang:
                await exchange.hang()
                return
            if entry["stream"]:
                await self._stream(exchange, encoder, behaviour, plan)
            else:
                await self._complete(exchange, encoder, behaviour, plan)
        finally:
            exchange.close()
            if entry["finished_at"] is None:
                entry["finished_at"] = time.time()

    async def _send_error(
        self,
        exchange: _Exchange,
        encoder: _Encoder,
        status: int,
        message: str,
        error_type: str | None = None,
        code: str | None = None,
        extra_headers: dict[str, str] | None = None,
    ) -> None:
        payload = encoder.error(status, message, error_type, code)
        headers = {"content-type": "application/json", "x-request-id": f"req-fake-{exchange.entry['id']}"}
        headers.update(extra_headers or {})
        if await exchange.start_response(status, headers):
            await exchange.finish(_dumps(payload))
            exchange.entry["outcome"] = "error"
            exchange.entry["finished_at"] = time.time()

    async def _send_failure(self, exchange: _Exchange, encoder: _Encoder, behaviour: Behaviour, status: int) -> None:
        extra: dict[str, str] = {}
        if behaviour.retry_after is not None:
            value = behaviour.retry_after
            extra["retry-after"] = str(int(value)) if float(value).is_integer() else str(value)
        message = behaviour.error_message or f"Fake upstream error {status} for model {encoder.model}."
        await self._send_error(exchange, encoder, status, message, behaviour.error_type, behaviour.error_code, extra)

    @staticmethod
    def _answer(body: dict[str, Any], behaviour: Behaviour, model: str) -> str:
        if behaviour.text is None:
            return f"Answer from {model}."
        return behaviour.text.replace("{last_user}", _last_user_text(body))

    @staticmethod
    def _usage(body: dict[str, Any], behaviour: Behaviour, answer_tokens: int) -> _Usage:
        prompt = behaviour.prompt_tokens if behaviour.prompt_tokens is not None else _prompt_word_count(body)
        return _Usage(
            prompt=prompt,
            cached=behaviour.cached_tokens,
            completion=answer_tokens + behaviour.reasoning_tokens,
            reasoning=behaviour.reasoning_tokens,
        )

    async def _complete(self, exchange: _Exchange, encoder: _Encoder, behaviour: Behaviour, plan: _Plan) -> None:
        entry = exchange.entry
        answer = self._answer(encoder.body, behaviour, encoder.model)
        tokens = split_tokens(answer)
        reasoning = split_tokens(behaviour.reasoning_text or "")
        delay_ms = behaviour.ttft_ms + (len(tokens) + len(reasoning)) * behaviour.token_delay_ms
        if not await exchange.sleep(delay_ms / 1000):
            return
        if plan.stop_after is not None:
            entry["outcome"] = "stopped"
            entry["finished_at"] = time.time()
            await exchange.close_connection(reset=False)
            return
        payload = encoder.message(answer, behaviour.reasoning_text, self._usage(encoder.body, behaviour, len(tokens)))
        headers = {"content-type": "application/json", "x-request-id": f"req-fake-{entry['id']}"}
        if not await exchange.start_response(200, headers):
            return
        entry["first_token_at"] = time.time()
        await exchange.finish(_dumps(payload))
        entry["tokens_sent"] = len(tokens) + len(reasoning)
        entry["outcome"] = "ok"
        entry["finished_at"] = time.time()

    async def _stream(self, exchange: _Exchange, encoder: _Encoder, behaviour: Behaviour, plan: _Plan) -> None:
        entry = exchange.entry
        answer = self._answer(encoder.body, behaviour, encoder.model)
        tokens = split_tokens(answer)
        items: list[tuple[Kind, str]] = [("reasoning", t) for t in split_tokens(behaviour.reasoning_text or "")]
        items += [("text", t) for t in tokens]
        usage = self._usage(encoder.body, behaviour, len(tokens))

        async def emit(data: bytes) -> bool:
            return await exchange.send({"type": "http.response.body", "body": data, "more_body": True})

        headers = {
            "content-type": "text/event-stream; charset=utf-8",
            "cache-control": "no-cache",
            "x-request-id": f"req-fake-{entry['id']}",
        }
        if not await exchange.start_response(200, headers):
            return
        if not await exchange.sleep(behaviour.ttft_ms / 1000):
            return
        if not await emit(encoder.stream_start(usage, items[0][0] if items else "text")):
            return
        for index in range(len(items) + 1):
            if plan.hang_after is not None and index == min(plan.hang_after, len(items)):
                await exchange.hang()
                return
            if plan.stop_after is not None and index == min(plan.stop_after, len(items)):
                entry["outcome"] = "stopped"
                entry["finished_at"] = time.time()
                await exchange.close_connection(reset=False)
                return
            if plan.end_after is not None and index == min(plan.end_after, len(items)):
                await exchange.finish(b"")  # a complete HTTP body, an incomplete stream
                entry["outcome"] = "ended"
                entry["finished_at"] = time.time()
                return
            if index == len(items):
                break
            if index > 0 and not await exchange.sleep(behaviour.token_delay_ms / 1000):
                return
            kind, token = items[index]
            if not await emit(encoder.stream_token(kind, token)):
                return
            if entry["first_token_at"] is None:
                entry["first_token_at"] = time.time()
            entry["tokens_sent"] = index + 1
        *events, last = encoder.stream_end(usage)
        for event in events:
            if not await emit(event):
                return
        await exchange.finish(last)
        entry["outcome"] = "ok"
        entry["finished_at"] = time.time()


ENCODERS: dict[str, type[_Encoder]] = {"openai": _OpenAIEncoder, "anthropic": _AnthropicEncoder}


def create_app() -> ASGIApp:
    state = FakeState()

    async def health(request: Request) -> JSONResponse:
        return JSONResponse({"status": "ok"})

    async def configure(request: Request) -> JSONResponse:
        try:
            names = state.configure(await request.json())
        except (TypeError, ValueError) as exc:
            return JSONResponse({"error": str(exc)}, status_code=400)
        return JSONResponse({"configured": names})

    async def reset(request: Request) -> JSONResponse:
        state.reset()
        return JSONResponse({"status": "ok"})

    async def get_log(request: Request) -> JSONResponse:
        return JSONResponse(state.log)

    async def clear_log(request: Request) -> JSONResponse:
        state.log.clear()
        return JSONResponse({"status": "ok"})

    async def models(request: Request) -> JSONResponse:
        data = [{"id": name, "object": "model", "owned_by": "fake"} for name in state.behaviours]
        return JSONResponse({"object": "list", "data": data})

    control = Starlette(
        routes=[
            Route("/_control/health", health, methods=["GET"]),
            Route("/_control/models", configure, methods=["POST"]),
            Route("/_control/reset", reset, methods=["POST"]),
            Route("/_control/log", get_log, methods=["GET"]),
            Route("/_control/log", clear_log, methods=["DELETE"]),
            Route("/v1/models", models, methods=["GET"]),
            Route("/models", models, methods=["GET"]),
        ]
    )

    async def app(scope: Scope, receive: Receive, send: Send) -> None:
        # The chat handler gets the server's own receive/send (not wrapped by middleware) so it can
        # watch for http.disconnect and reach the transport to close the connection abruptly.
        protocol = UPSTREAM_PATHS.get(scope["path"]) if scope["type"] == "http" else None
        if protocol is not None and scope["method"] == "POST":
            await state.handle_upstream(scope, receive, send, protocol)
        else:
            await control(scope, receive, send)

    return app


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description="Fake LLM upstream (OpenAI and Anthropic APIs) for tests")
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--http", default="auto", choices=["auto", "h11", "httptools"])
    args = parser.parse_args(argv)

    import uvicorn

    config = uvicorn.Config(
        create_app(),
        host=args.host,
        port=args.port,
        http=args.http,
        log_level="warning",
        access_log=False,
        timeout_keep_alive=30,
        timeout_graceful_shutdown=1,
    )
    # Hung requests are cancelled on shutdown; that is expected here, so keep stderr quiet about it.
    logging.getLogger("uvicorn.error").addFilter(_drop_shutdown_cancellation)
    uvicorn.Server(config).run()


def _drop_shutdown_cancellation(record: logging.LogRecord) -> bool:
    if record.exc_info and isinstance(record.exc_info[1], asyncio.CancelledError):
        return False
    return "timeout graceful shutdown exceeded" not in record.getMessage()


class FakeUpstream:
    """Runs ``fake_upstream.py`` in a subprocess and drives its control API."""

    def __init__(self, port: int, host: str = "127.0.0.1") -> None:
        self.port = port
        self.host = host
        self._proc: subprocess.Popen[bytes] | None = None
        self._client: httpx.Client | None = None

    @property
    def root_url(self) -> str:
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"http://{host}:{self.port}"

    @property
    def base_url(self) -> str:
        return f"{self.root_url}/v1"

    @property
    def client(self) -> httpx.Client:
        if self._client is None:
            self._client = httpx.Client(base_url=self.root_url, timeout=10.0, trust_env=False)
        return self._client

    def start(self, timeout: float = 15.0) -> None:
        if self._proc is not None:
            raise RuntimeError("fake upstream already started")
        cmd = [sys.executable, str(Path(__file__).resolve()), "--port", str(self.port), "--host", self.host]
        self._proc = subprocess.Popen(cmd, stdin=subprocess.DEVNULL)
        deadline = time.monotonic() + timeout
        while True:
            code = self._proc.poll()
            if code is not None:
                self._proc = None
                raise RuntimeError(f"fake upstream exited with code {code} during startup (port {self.port})")
            try:
                if self.client.get("/_control/health", timeout=1.0).status_code == 200:
                    return
            except httpx.TransportError:
                pass
            if time.monotonic() > deadline:
                self.stop()
                raise RuntimeError(f"fake upstream not healthy after {timeout}s on {self.root_url}")
            time.sleep(0.05)

    def stop(self) -> None:
        proc, self._proc = self._proc, None
        if proc is not None and proc.poll() is None:
            proc.terminate()
            try:
                proc.wait(timeout=5)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait(timeout=5)
        if self._client is not None:
            self._client.close()
            self._client = None

    def __enter__(self) -> Self:
        self.start()
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.stop()

    def configure(self, behaviours: dict[str, dict[str, object]]) -> None:
        response = self.client.post("/_control/models", json=behaviours)
        if response.status_code != 200:
            raise ValueError(f"fake upstream rejected configuration: {response.text}")

    def reset(self) -> None:
        self.client.post("/_control/reset").raise_for_status()

    def log(self) -> list[dict[str, Any]]:
        response = self.client.get("/_control/log")
        response.raise_for_status()
        entries: list[dict[str, Any]] = response.json()
        return entries

    def clear_log(self) -> None:
        self.client.delete("/_control/log").raise_for_status()

    def wait_for(self, predicate: Callable[[list[LogEntry]], bool], timeout: float = 5.0) -> list[LogEntry]:
        deadline = time.monotonic() + timeout
        while True:
            entries = self.log()
            if predicate(entries):
                return entries
            if time.monotonic() > deadline:
                dump = json.dumps(entries, indent=1, default=str)
                raise AssertionError(f"fake upstream log condition not met within {timeout}s; log:\n{dump}")
            time.sleep(POLL_INTERVAL_S)


if __name__ == "__main__":
    main()
