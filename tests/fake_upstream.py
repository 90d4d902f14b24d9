"""Fake LLM upstream for tests: speaks OpenAI's Chat Completions API and Anthropic's Messages API.

Runs as a separate process and speaks real HTTP + SSE (starlette + uvicorn)::

    python tests/fake_upstream.py --port 9001 [--host 127.0.0.1] [--http auto|h11|httptools]
    python -m tests.fake_upstream --port 9001

Readiness: ``GET /_control/health`` -> 200 ``{"status": "ok"}``.

Upstream endpoints:

* OpenAI: ``POST /v1/chat/completions`` and ``POST /chat/completions`` (same handler), ``GET /v1/models``
  and ``GET /models``. LiteLLM: ``model: openai/<name>``, ``api_base: <root>/v1`` (:attr:`FakeUpstream.base_url`);
  the ``openai`` SDK, LangChain's ``ChatOpenAI`` and the Agents SDK's ``OpenAIChatCompletionsModel`` take the
  same ``base_url``. An answer has ``system_fingerprint: "fp_fake"``, ``finish_reason: "stop"`` (``"tool_calls"``
  when it carries tool calls) and ``logprobs: null``. Its stream is a role chunk (``{"role": "assistant",
  "content": ""}``), one chunk per token (``delta.reasoning_content`` for reasoning, then ``delta.content``),
  then, for each tool call in order, a head chunk ``delta.tool_calls: [{"index": i, "id", "type": "function",
  "function": {"name", "arguments": ""}}]`` and its arguments string in :data:`TOOL_ARGUMENT_FRAGMENTS` fragments
  (``{"index": i, "function": {"arguments": "<fragment>"}}``); an answer of tool calls alone has no role chunk,
  its first head carries ``"role": "assistant", "content": null`` (as OpenAI streams it). Then a finish chunk
  (empty delta), the usage chunk if ``stream_options.include_usage``, and ``data: [DONE]``. With
  ``"logprobs": true`` in the request, the non-streamed choice and every content chunk (the role chunk included,
  with no tokens) carry ``logprobs: {"content": [{"token", "logprob", "bytes", "top_logprobs"}], "refusal": null}``,
  deterministic: the n-th content token (from 0) has logprob ``-0.01 * (1 + n % 10)``, and ``top_logprobs``
  (``top_logprobs`` of the request, at most 20) lists the token then ``<alt1>``, ``<alt2>``... each 1 lower.
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
  ``MidStreamFallbackError`` ("... Stream ended before a finish_reason was received"). ``tool_calls`` and
  logprobs are not spoken there (a scripted call is left out of the answer; ``text``/``texts`` or the default
  text answers); ``texts`` and ``after_tool_text`` are (tool results being the ``tool_result`` blocks of the last
  user message).

Both protocols share the behaviours, the per-model counters and the log; a per-protocol encoder spells the
answers, stream events and errors. The system prompt (Anthropic's top-level ``system``) counts towards the
default prompt tokens on both.

Behaviour is chosen per request by the body's ``model`` field (exact name; LiteLLM strips the
``openai/`` or ``anthropic/`` prefix). Unconfigured models fall back to the behaviour configured for ``"*"`` if
any, else to the default behaviour (answer ``"Answer from <model>."``, no delay). Behaviour fields (all
optional, see :data:`BEHAVIOUR_FIELDS`):

``text``               answer text; ``{last_user}`` is replaced by the text of the last user message,
                       ``{tool_results}`` by the contents of the tool messages the conversation ends with, joined
                       by a space (empty if it does not end with any). ``text`` is ``texts: [text]``.
``texts``              answer texts (same placeholders, non-empty list): the model's n-th request since it was
                       configured answers ``texts[n-1]``, every later one the last; every request counts, the
                       failing ones too (e.g. an invalid answer, then a valid one, for a corrective retry).
                       Not with ``text``.
``tool_calls``         list of ``{"name": str, "arguments": <JSON object or string>, "id": str}`` (``arguments``
                       default ``{}``; an object is sent as compact JSON text, a string as it is, so invalid JSON
                       can be scripted; ``id`` default ``call_<model>_<n>``, n numbering the model's answered
                       calls since it was configured, from 1): the answer carries these calls, ``content: null``
                       unless ``text``/``texts`` is set too (that text comes first), ``finish_reason:
                       "tool_calls"``. A call's completion tokens are the words (runs of letters, digits and
                       ``_``) of its name and arguments string, at least 1. OpenAI route only.
``pieces``             the answer text as scripted stream pieces: a list of ``{"text": str, "delay_ms": int}``,
                       each piece one content chunk (its text as it is, not split into tokens), sent ``delay_ms``
                       after the piece before it (the first: after ``ttft_ms``; ``delay_ms`` default 0). The
                       answer's text is the pieces joined (its completion tokens are that text's tokens); a
                       non-streamed answer comes after ``ttft_ms`` + every delay. Not with ``text``/``texts``.
``after_tool_text``    when the conversation ends with tool results (OpenAI: ``role: "tool"`` messages), answer
                       this text (same placeholders) instead of ``tool_calls`` and ``texts``; without it such a
                       conversation gets the normal answer (the tool calls again).
``ttft_ms``            delay before the first token (streaming: response headers are sent at once, the
                       role chunk (Anthropic: message_start, content_block_start, ping) and first token after
                       the delay; non-streaming: before the response).
``token_delay_ms``     delay between tokens (non-streaming: tokens * delay added to the response delay); a tool
                       call's head and each fragment of its arguments count as tokens here.
``status``             HTTP status of an error response (if set and not 200).
``error_message``      overrides the error message; ``error_type`` / ``error_code`` / ``error_param`` override
                       those fields (OpenAI route; ``param`` is null unless set).
``error_delay_ms``     delay before an error response (default 0: errors are immediate).
``fail_times``         only the first N requests (per model since its last configure/reset) misbehave.
``fail_rate``          fraction 0..1 of requests that misbehave, pseudo-random, deterministic with ``seed``.
``hang_rate``          fraction 0..1 of requests that hang (never answer), drawn with ``fail_rate`` from one
                       number per request: below ``fail_rate`` it misbehaves, in the next ``hang_rate`` it hangs.
``seed``               seed for ``fail_rate`` and ``hang_rate`` (default 0).
``retry_after``        adds a ``Retry-After`` header to error responses.
``hang``               accept the request and never answer (until the client disconnects).
``hang_after_tokens``  streaming: send that many tokens (at most all of them), then hang.
``stop_after_tokens``  streaming: send that many tokens (at most all), then, when the next one is due
                       (``token_delay_ms`` later), close the connection (no
                       finish chunk, no [DONE]; Anthropic: no content_block_stop, message_delta or
                       message_stop); non-streaming: close the connection, no response, after the delay.
``end_after_tokens``   streaming: send that many tokens (at most all), then end the response cleanly (the HTTP
                       body is complete) with neither a finish chunk nor [DONE] (Anthropic: no
                       content_block_stop, message_delta or message_stop): a stream cut short that no transport
                       error reveals; non-streaming: ignored.
``reset_connection``   close the TCP connection (RST) without any response.
``finish_reason``      the answer's ``finish_reason`` instead of ``stop``/``tool_calls`` (e.g. ``"length"``, as a
                       server says when ``max_tokens`` cut the answer). OpenAI route only.
``no_usage``           streaming: no usage chunk, even with ``stream_options.include_usage`` (and no ``usage``
                       field in the chunks), as llama-cpp-python's server streams; a whole answer keeps its
                       ``usage``. OpenAI route only.
``context_window``     the model's context window in tokens, refused as llama-cpp-python's server (0.3.x) refuses
                       a conversation longer than it: when the prompt tokens (``prompt_tokens``, else the words)
                       plus ``max_tokens`` (0 when unset) exceed it, a whole call gets a 400 with its body
                       (``error.message`` "This model's maximum context length is N tokens. However, you
                       requested T tokens (P in the messages, M in the completion). Please reduce the length of
                       the messages or completion.", ``type: "invalid_request_error"``, ``param: "messages"``,
                       ``code: "context_length_exceeded"``) and a streamed one a 200 ``text/event-stream`` with an
                       empty body (the log's outcome: ``"error"`` and ``"ended"``). OpenAI route only.
``reasoning_text``     streamed token by token in ``delta.reasoning_content`` (Anthropic: a thinking block)
                       before the content; non-streaming: ``message.reasoning_content`` (a thinking block).
``ranking``            labels, best first (e.g. ``["B", "A", "C"]``): a request whose last user message asks for a
                       ranking (it holds ``RANKING:``) is answered with a line of reasons, then
                       ``RANKING: Response B, Response A, Response C``; other requests answer as usual.
``pick``               a label (e.g. ``"B"``): a request whose last user message asks for the best answer (it
                       holds ``BEST:``) is answered with a line of reasons, then ``BEST: Response B``.
``gate``               a gate's name: the request (logged on arrival) waits until the test opens that gate
                       (``POST /_control/gates/<name>``), then behaves as configured; a client that leaves first
                       is recorded as disconnected. Gates start closed, and close again on reset.
``reasoning_tokens``, ``cached_tokens``, ``prompt_tokens``  usage numbers (``prompt_tokens`` includes the cached
                       ones; ``reasoning_tokens`` are added to the completion/output tokens).

"Misbehaviour" means ``status``, ``reset_connection``, ``hang``, ``hang_after_tokens``, ``stop_after_tokens``
and ``end_after_tokens``. Without ``fail_times``/``fail_rate`` they apply to every request; with them they
apply only to the failing requests (status 500 if no other misbehaviour is configured) and the other
requests get the normal answer. Token counts for ``*_after_tokens`` (and ``tokens_sent``) count the streamed
pieces: reasoning and text tokens, tool call heads and argument fragments.

Control API (JSON): ``POST /_control/models`` ``{"<model>": {behaviour}, ...}`` (replaces the whole
behaviour of each named model and resets its counters; unknown or wrong-typed fields, in a tool call too,
-> 400), ``POST /_control/gates/<name>`` (opens a gate), ``POST /_control/reset``, ``GET /_control/log``,
``DELETE /_control/log``, ``GET /_control/health``.

Log entries (one per upstream request, appended on arrival and updated in place)::

    {"id", "protocol": "openai" | "anthropic", "model", "path", "stream",
     "tools": [names of the request's tools] | null, "tool_choice": <as sent> | null,
     "body" (as sent: tools, tool_choice, parallel_tool_calls, response_format, max_tokens... are there),
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
# what the service's ranking and judging prompts ask a ranking and a pick to follow (engine/strategies)
RANKING_MARK = "RANKING:"
PICK_MARK = "BEST:"

LogEntry = dict[str, Any]

# field name -> expected kind ("int" = non-negative int, "num" = int or float, "texts" = non-empty list of str,
# "tool_calls" = list of {"name", "arguments", "id"} objects, "pieces" = non-empty list of {"text", "delay_ms"})
BEHAVIOUR_FIELDS: dict[str, str] = {
    "text": "str",
    "texts": "texts",
    "pieces": "pieces",
    "after_tool_text": "str",
    "tool_calls": "tool_calls",
    "ttft_ms": "int",
    "token_delay_ms": "int",
    "status": "int",
    "error_message": "str",
    "error_type": "str",
    "error_code": "str",
    "error_param": "str",
    "finish_reason": "str",
    "no_usage": "bool",
    "context_window": "int",
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
    "ranking": "texts",
    "pick": "str",
    "gate": "str",
}

TOOL_CALL_KEYS = frozenset({"name", "arguments", "id"})
TOOL_ARGUMENT_FRAGMENTS = 3  # a streamed tool call's arguments string comes in (at most) this many fragments
MAX_TOP_LOGPROBS = 20

_TOKEN_RE = re.compile(r"\S+\s*|\s+")
_WORD_RE = re.compile(r"[A-Za-z0-9_]+")
_PLACEHOLDER_RE = re.compile(r"\{(last_user|tool_results)\}")


@dataclass(frozen=True)
class ToolCallSpec:
    """A scripted tool call: ``arguments`` is the JSON text sent (an object given in the script is serialized)."""

    name: str
    arguments: str
    id: str | None = None

    @classmethod
    def parse(cls, raw: object, index: int) -> ToolCallSpec:
        where = f"tool_calls[{index}]"
        if not isinstance(raw, dict):
            raise ValueError(f"{where} must be an object with 'name', 'arguments' and optionally 'id'")
        unknown = sorted(set(raw) - TOOL_CALL_KEYS)
        if unknown:
            raise ValueError(f"unknown fields {unknown} in {where}; known: {sorted(TOOL_CALL_KEYS)}")
        name, arguments, call_id = raw.get("name"), raw.get("arguments", {}), raw.get("id")
        if not isinstance(name, str) or not name:
            raise ValueError(f"{where}.name must be a non-empty string, got {name!r}")
        if isinstance(arguments, dict):
            arguments = json.dumps(arguments, separators=(",", ":"))
        elif not isinstance(arguments, str):
            raise ValueError(f"{where}.arguments must be a JSON object or a string, got {arguments!r}")
        if call_id is not None and (not isinstance(call_id, str) or not call_id):
            raise ValueError(f"{where}.id must be a non-empty string, got {call_id!r}")
        return cls(name=name, arguments=arguments, id=call_id)


@dataclass(frozen=True)
class Behaviour:
    text: str | None = None
    texts: tuple[str, ...] | None = None
    after_tool_text: str | None = None
    tool_calls: tuple[ToolCallSpec, ...] = ()
    pieces: tuple[tuple[str, int], ...] | None = None  # (text, delay before it in ms)
    ttft_ms: int = 0
    token_delay_ms: int = 0
    status: int | None = None
    error_message: str | None = None
    error_type: str | None = None
    error_code: str | None = None
    error_param: str | None = None
    finish_reason: str | None = None
    no_usage: bool = False
    context_window: int | None = None
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
    ranking: tuple[str, ...] | None = None
    pick: str | None = None
    gate: str | None = None

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
            if kind == "texts":
                if not isinstance(value, list) or not value or not all(isinstance(t, str) for t in value):
                    raise ValueError(f"behaviour field {name!r} must be a non-empty list of strings, got {value!r}")
                values[name] = tuple(value)
                continue
            if kind == "pieces":
                values[name] = _parse_pieces(value)
                continue
            if kind == "tool_calls":
                if not isinstance(value, list):
                    raise ValueError(f"behaviour field {name!r} must be a list of tool calls, got {value!r}")
                values[name] = tuple(ToolCallSpec.parse(call, index) for index, call in enumerate(value))
                continue
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
        if "text" in values and "texts" in values:
            raise ValueError("set either 'text' or 'texts' (text is texts: [text]), not both")
        if "pieces" in values and ("text" in values or "texts" in values):
            raise ValueError("set either 'pieces' or 'text'/'texts' (the pieces are the text), not both")
        return cls(**values)

    def scripted_text(self, request_number: int) -> str | None:
        """The answer text template of the model's ``request_number``-th request (1-based), None if unscripted."""
        if self.pieces is not None:
            return "".join(text for text, _ in self.pieces)
        texts = self.texts if self.texts is not None else (self.text,) if self.text is not None else ()
        return texts[min(request_number, len(texts)) - 1] if texts else None

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


def _parse_pieces(value: object) -> tuple[tuple[str, int], ...]:
    """``pieces``: a non-empty list of ``{"text": str, "delay_ms": int >= 0}`` (``delay_ms`` optional)."""
    if not isinstance(value, list) or not value:
        raise ValueError(f"behaviour field 'pieces' must be a non-empty list of pieces, got {value!r}")
    pieces = []
    for index, piece in enumerate(value):
        if not isinstance(piece, dict) or set(piece) - {"text", "delay_ms"} or not isinstance(piece.get("text"), str):
            raise ValueError(f"pieces[{index}] must be {{'text': str, 'delay_ms': int}}, got {piece!r}")
        delay = piece.get("delay_ms", 0)
        if not isinstance(delay, int) or isinstance(delay, bool) or delay < 0:
            raise ValueError(f"pieces[{index}].delay_ms must be a non-negative int, got {delay!r}")
        pieces.append((piece["text"], delay))
    return tuple(pieces)


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
    tool_calls: int = 0  # tool calls answered since the model was configured (numbers the default call ids)


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


def _tool_results(body: dict[str, Any]) -> list[str] | None:
    """The contents of the tool results the conversation ends with, None if it does not end with any.

    OpenAI: the trailing ``role: "tool"`` messages. Anthropic: the ``tool_result`` blocks of a last user message.
    """
    messages = _messages(body)
    results: list[str] = []
    for message in reversed(messages):
        if message.get("role") != "tool":
            break
        results.insert(0, _content_text(message.get("content")))
    if results:
        return results
    if messages and messages[-1].get("role") == "user" and isinstance(messages[-1].get("content"), list):
        blocks = [b for b in messages[-1]["content"] if isinstance(b, dict) and b.get("type") == "tool_result"]
        if blocks:
            return [_content_text(block.get("content")) for block in blocks]
    return None


def _fill(template: str, body: dict[str, Any]) -> str:
    """Replace ``{last_user}`` and ``{tool_results}`` (the trailing tool results joined by a space) in one pass."""

    def value(match: re.Match[str]) -> str:
        if match.group(1) == "last_user":
            return _last_user_text(body)
        return " ".join(_tool_results(body) or [])

    return _PLACEHOLDER_RE.sub(value, template)


def _tool_names(body: dict[str, Any]) -> list[str] | None:
    """The names of the tools a request offers (OpenAI ``function.name``, Anthropic ``name``), None without tools."""
    tools = body.get("tools")
    if not isinstance(tools, list):
        return None
    names: list[str] = []
    for tool in tools:
        if not isinstance(tool, dict):
            continue
        spec = tool.get(tool.get("type") or "function")
        name = spec.get("name") if isinstance(spec, dict) else tool.get("name")
        if isinstance(name, str):
            names.append(name)
    return names


def split_tokens(text: str) -> list[str]:
    """Split ``text`` into tokens whose concatenation is exactly ``text``."""
    return _TOKEN_RE.findall(text)


def split_fragments(text: str, count: int = TOOL_ARGUMENT_FRAGMENTS) -> list[str]:
    """Split ``text`` into at most ``count`` non-empty fragments of near-equal length (none for ``""``)."""
    count = min(count, len(text))
    fragments: list[str] = []
    start = 0
    for index in range(count):
        end = start + len(text) // count + (1 if index < len(text) % count else 0)
        fragments.append(text[start:end])
        start = end
    return fragments


def _dumps(obj: object) -> bytes:
    return json.dumps(obj, separators=(",", ":")).encode()


def _sse(data: object, event: str | None = None) -> bytes:
    head = f"event: {event}\n".encode() if event else b""
    return head + b"data: " + _dumps(data) + b"\n\n"


Kind = Literal["reasoning", "text"]
"""What a streamed token belongs to: the reasoning (thinking) or the answer text."""

PieceKind = Literal["reasoning", "text", "tool_call", "tool_arguments"]
"""What a streamed piece is: a reasoning or text token, a tool call's head (id, name) or an arguments fragment."""


@dataclass(frozen=True)
class _ToolCall:
    id: str
    name: str
    arguments: str  # the JSON text, as sent

    @property
    def tokens(self) -> int:
        """Rough completion tokens: the words (runs of letters, digits, _) of the name and the arguments."""
        return max(1, len(_WORD_RE.findall(self.name)) + len(_WORD_RE.findall(self.arguments)))


@dataclass(frozen=True)
class _Piece:
    """One streamed piece of an answer (non-streamed answers take as long as streaming them would)."""

    kind: PieceKind
    text: str  # the token; the fragment of the arguments; "" for a tool call's head
    call_index: int = 0
    call: _ToolCall | None = None
    delay_ms: int | None = None  # scripted (``pieces``): the wait before it; else token_delay_ms between pieces


@dataclass(frozen=True)
class _Answer:
    """What one request answers: text (None: no content, tool calls alone), reasoning and tool calls."""

    text: str | None
    reasoning: str | None
    tool_calls: tuple[_ToolCall, ...] = ()
    scripted: tuple[tuple[str, int], ...] | None = None  # the text as scripted pieces (``pieces``)
    finish: str | None = None  # scripted (``finish_reason``)

    @property
    def finish_reason(self) -> str:
        if self.finish is not None:
            return self.finish
        return "tool_calls" if self.tool_calls else "stop"

    @property
    def completion_tokens(self) -> int:
        """Answer tokens (text tokens + the calls' rough tokens), reasoning excluded."""
        return len(split_tokens(self.text or "")) + sum(call.tokens for call in self.tool_calls)

    def pieces(self) -> list[_Piece]:
        pieces = [_Piece("reasoning", token) for token in split_tokens(self.reasoning or "")]
        if self.scripted is not None:
            pieces += [_Piece("text", text, delay_ms=delay) for text, delay in self.scripted]
        else:
            pieces += [_Piece("text", token) for token in split_tokens(self.text or "")]
        for index, call in enumerate(self.tool_calls):
            pieces.append(_Piece("tool_call", "", index, call))
            pieces += [_Piece("tool_arguments", f, index, call) for f in split_fragments(call.arguments)]
        return pieces


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
    speaks_tool_calls: ClassVar[bool] = False  # False: scripted tool calls are left out of the answer

    def __init__(self, request_id: int, model: str, body: dict[str, Any]) -> None:
        self.request_id = request_id
        self.model = model
        self.body = body
        self.created = int(time.time())

    @abstractmethod
    def error(self, status: int, message: str, error_type: str | None, code: str | None) -> dict[str, Any]:
        """The JSON body of an error response."""

    @abstractmethod
    def message(self, answer: _Answer, usage: _Usage) -> dict[str, Any]:
        """The JSON body of a non-streamed answer."""

    @abstractmethod
    def stream_start(self, usage: _Usage, first: PieceKind) -> bytes:
        """The SSE events sent before the first piece (``first`` is the kind of that piece)."""

    @abstractmethod
    def stream_piece(self, piece: _Piece) -> bytes:
        """The SSE event(s) carrying one piece (a token, a tool call's head, a fragment of its arguments)."""

    @abstractmethod
    def stream_end(self, usage: _Usage, finish_reason: str) -> list[bytes]:
        """The SSE events that end a complete stream, in order (the last one ends the HTTP body)."""


class _OpenAIEncoder(_Encoder):
    protocol = "openai"
    speaks_tool_calls = True

    def __init__(self, request_id: int, model: str, body: dict[str, Any]) -> None:
        super().__init__(request_id, model, body)
        stream_options = body.get("stream_options")
        self.include_usage = isinstance(stream_options, dict) and stream_options.get("include_usage") is True
        self.id = f"chatcmpl-fake-{request_id}"
        self.logprobs = body.get("logprobs") is True
        top = body.get("top_logprobs")
        top = top if isinstance(top, int) and not isinstance(top, bool) else 0
        self.top_logprobs = max(0, min(top, MAX_TOP_LOGPROBS))
        self._position = 0  # content tokens streamed so far (their logprobs depend on the position)
        self._role_sent = False

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

    def _token_logprobs(self, tokens: list[str]) -> dict[str, Any] | None:
        """OpenAI's choice ``logprobs`` for the next content tokens (None unless the request asked for them).

        Deterministic: the n-th content token (from 0) has logprob -0.01 * (1 + n % 10); its ``top_logprobs``
        are the token itself, then ``<alt1>``, ``<alt2>``, ... one nat less likely each.
        """
        if not self.logprobs:
            return None
        content = []
        for token in tokens:
            logprob = round(-0.01 * (1 + self._position % 10), 4)
            self._position += 1
            alternatives = [(token, logprob)] + [
                (f"<alt{n}>", round(logprob - n, 4)) for n in range(1, MAX_TOP_LOGPROBS)
            ]
            top = [
                {"token": t, "logprob": lp, "bytes": list(t.encode())} for t, lp in alternatives[: self.top_logprobs]
            ]
            content.append({"token": token, "logprob": logprob, "bytes": list(token.encode()), "top_logprobs": top})
        return {"content": content, "refusal": None}

    @staticmethod
    def _tool_call(call: _ToolCall) -> dict[str, Any]:
        return {"id": call.id, "type": "function", "function": {"name": call.name, "arguments": call.arguments}}

    def message(self, answer: _Answer, usage: _Usage) -> dict[str, Any]:
        message: dict[str, Any] = {"role": "assistant", "content": answer.text, "refusal": None, "annotations": []}
        if answer.reasoning is not None:
            message["reasoning_content"] = answer.reasoning
        if answer.tool_calls:
            message["tool_calls"] = [self._tool_call(call) for call in answer.tool_calls]
        choice = {
            "index": 0,
            "message": message,
            "logprobs": self._token_logprobs(split_tokens(answer.text or "")),
            "finish_reason": answer.finish_reason,
        }
        return {
            "id": self.id,
            "object": "chat.completion",
            "created": int(time.time()),
            "model": self.model,
            "system_fingerprint": "fp_fake",
            "choices": [choice],
            "usage": self._usage(usage),
        }

    def _chunk(
        self, delta: dict[str, Any], finish_reason: str | None = None, logprobs: dict[str, Any] | None = None
    ) -> bytes:
        data: dict[str, Any] = {
            "id": self.id,
            "object": "chat.completion.chunk",
            "created": self.created,
            "model": self.model,
            "system_fingerprint": "fp_fake",
            "choices": [{"index": 0, "delta": delta, "logprobs": logprobs, "finish_reason": finish_reason}],
        }
        if self.include_usage:
            data["usage"] = None
        return _sse(data)

    def stream_start(self, usage: _Usage, first: PieceKind) -> bytes:
        if first == "tool_call":
            return b""  # as OpenAI does: the role comes with the first tool call
        self._role_sent = True
        return self._chunk({"role": "assistant", "content": ""}, logprobs=self._token_logprobs([]))

    def stream_piece(self, piece: _Piece) -> bytes:
        if piece.kind == "reasoning":
            return self._chunk({"reasoning_content": piece.text})
        if piece.kind == "text":
            return self._chunk({"content": piece.text}, logprobs=self._token_logprobs([piece.text]))
        if piece.kind == "tool_arguments":
            return self._chunk({"tool_calls": [{"index": piece.call_index, "function": {"arguments": piece.text}}]})
        assert piece.call is not None
        head = self._tool_call(piece.call)
        head["function"]["arguments"] = ""
        delta: dict[str, Any] = {"tool_calls": [{"index": piece.call_index, **head}]}
        if not self._role_sent:
            self._role_sent = True
            delta = {"role": "assistant", "content": None, **delta}
        return self._chunk(delta)

    def stream_end(self, usage: _Usage, finish_reason: str) -> list[bytes]:
        events = [self._chunk({}, finish_reason)]
        if self.include_usage:
            usage_chunk = {
                "id": self.id,
                "object": "chat.completion.chunk",
                "created": self.created,
                "model": self.model,
                "system_fingerprint": "fp_fake",
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

    def message(self, answer: _Answer, usage: _Usage) -> dict[str, Any]:
        content: list[dict[str, Any]] = []
        if answer.reasoning is not None:
            content.append({"type": "thinking", "thinking": answer.reasoning, "signature": self.signature})
        content.append({"type": "text", "text": answer.text or ""})
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

    def stream_start(self, usage: _Usage, first: PieceKind) -> bytes:
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
        block = self._open_block("reasoning" if first == "reasoning" else "text")
        return started + block + _sse({"type": "ping"}, "ping")

    def stream_piece(self, piece: _Piece) -> bytes:
        if piece.kind != "reasoning" and piece.kind != "text":
            raise ValueError(f"the Anthropic encoder streams no {piece.kind} pieces")
        kind: Kind = piece.kind
        switch = b"" if kind == self._block_kind else self._close_block() + self._open_block(kind)
        delta = (
            {"type": "thinking_delta", "thinking": piece.text}
            if kind == "reasoning"
            else {"type": "text_delta", "text": piece.text}
        )
        return switch + self._delta(delta)

    def stream_end(self, usage: _Usage, finish_reason: str) -> list[bytes]:
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

    async def wait_for(self, event: asyncio.Event) -> bool:
        """Wait for `event`; return False (and record it) if the client disconnected first."""
        waiters = {asyncio.ensure_future(event.wait()), asyncio.ensure_future(self.disconnected.wait())}
        _, pending = await asyncio.wait(waiters, return_when=asyncio.FIRST_COMPLETED)
        for waiter in pending:
            waiter.cancel()
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
        self.gates: dict[str, asyncio.Event] = {}

    def gate(self, name: str) -> asyncio.Event:
        return self.gates.setdefault(name, asyncio.Event())

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
        self.gates = {}

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
            "tools": _tool_names(body_dict),
            "tool_choice": body_dict.get("tool_choice"),
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
            if behaviour.gate is not None and not await exchange.wait_for(self.gate(behaviour.gate)):
                return
            if protocol == "openai" and await self._refused_as_too_long(exchange, encoder, behaviour):
                return
            if behaviour.no_usage and isinstance(encoder, _OpenAIEncoder):
                encoder.include_usage = False
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
            answer = self._answer(encoder, behaviour, self.counters[model])
            if entry["stream"]:
                await self._stream(exchange, encoder, behaviour, plan, answer)
            else:
                await self._complete(exchange, encoder, behaviour, plan, answer)
        finally:
            exchange.close()
            if entry["finished_at"] is None:
                entry["finished_at"] = time.time()

    async def _refused_as_too_long(self, exchange: _Exchange, encoder: _Encoder, behaviour: Behaviour) -> bool:
        """``context_window``: a conversation longer than it refused as llama-cpp-python's server refuses it."""
        if behaviour.context_window is None:
            return False
        body = encoder.body
        prompt = behaviour.prompt_tokens if behaviour.prompt_tokens is not None else _prompt_word_count(body)
        limit = body.get("max_tokens")
        completion = limit if isinstance(limit, int) and not isinstance(limit, bool) and limit > 0 else 0
        if prompt + completion <= behaviour.context_window:
            return False
        if exchange.entry["stream"]:  # the server fails after it sent its headers: an empty 200 stream
            headers = {"content-type": "text/event-stream; charset=utf-8", "cache-control": "no-store"}
            if await exchange.start_response(200, headers):
                await exchange.finish(b"")
                exchange.entry["outcome"] = "ended"
                exchange.entry["finished_at"] = time.time()
            return True
        message = (
            f"This model's maximum context length is {behaviour.context_window} tokens. However, you requested "
            f"{prompt + completion} tokens ({prompt} in the messages, {completion} in the completion). Please "
            "reduce the length of the messages or completion."
        )
        error_type, code = "invalid_request_error", "context_length_exceeded"
        await self._send_error(exchange, encoder, 400, message, error_type, code, param="messages")
        return True

    async def _send_error(
        self,
        exchange: _Exchange,
        encoder: _Encoder,
        status: int,
        message: str,
        error_type: str | None = None,
        code: str | None = None,
        extra_headers: dict[str, str] | None = None,
        param: str | None = None,
    ) -> None:
        payload = encoder.error(status, message, error_type, code)
        if param is not None and isinstance(payload.get("error"), dict) and encoder.protocol == "openai":
            payload["error"]["param"] = param
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
        await self._send_error(
            exchange, encoder, status, message, behaviour.error_type, behaviour.error_code, extra, behaviour.error_param
        )

    @staticmethod
    def _answer(encoder: _Encoder, behaviour: Behaviour, counter: _ModelCounter) -> _Answer:
        body = encoder.body
        if behaviour.after_tool_text is not None and _tool_results(body) is not None:
            return _Answer(_fill(behaviour.after_tool_text, body), behaviour.reasoning_text)
        asked = _last_user_text(body)
        if behaviour.ranking is not None and RANKING_MARK in asked:
            labels = ", ".join(f"Response {label}" for label in behaviour.ranking)
            return _Answer(f"Some are better than others.\n{RANKING_MARK} {labels}", behaviour.reasoning_text)
        if behaviour.pick is not None and PICK_MARK in asked:
            return _Answer(f"One stands out.\n{PICK_MARK} Response {behaviour.pick}", behaviour.reasoning_text)
        template = behaviour.scripted_text(counter.requests)
        calls: list[_ToolCall] = []
        for spec in behaviour.tool_calls if encoder.speaks_tool_calls else ():
            counter.tool_calls += 1
            call_id = spec.id or f"call_{encoder.model}_{counter.tool_calls}"
            calls.append(_ToolCall(id=call_id, name=spec.name, arguments=spec.arguments))
        if template is not None:
            text: str | None = _fill(template, body)
        else:
            text = None if calls else f"Answer from {encoder.model}."
        return _Answer(text, behaviour.reasoning_text, tuple(calls), behaviour.pieces, behaviour.finish_reason)

    @staticmethod
    def _usage(body: dict[str, Any], behaviour: Behaviour, answer: _Answer) -> _Usage:
        prompt = behaviour.prompt_tokens if behaviour.prompt_tokens is not None else _prompt_word_count(body)
        return _Usage(
            prompt=prompt,
            cached=behaviour.cached_tokens,
            completion=answer.completion_tokens + behaviour.reasoning_tokens,
            reasoning=behaviour.reasoning_tokens,
        )

    async def _complete(
        self, exchange: _Exchange, encoder: _Encoder, behaviour: Behaviour, plan: _Plan, answer: _Answer
    ) -> None:
        entry = exchange.entry
        pieces = answer.pieces()
        delay_ms = behaviour.ttft_ms + sum(
            behaviour.token_delay_ms if piece.delay_ms is None else piece.delay_ms for piece in pieces
        )
        if not await exchange.sleep(delay_ms / 1000):
            return
        if plan.stop_after is not None:
            entry["outcome"] = "stopped"
            entry["finished_at"] = time.time()
            await exchange.close_connection(reset=False)
            return
        payload = encoder.message(answer, self._usage(encoder.body, behaviour, answer))
        headers = {"content-type": "application/json", "x-request-id": f"req-fake-{entry['id']}"}
        if not await exchange.start_response(200, headers):
            return
        entry["first_token_at"] = time.time()
        await exchange.finish(_dumps(payload))
        entry["tokens_sent"] = len(pieces)
        entry["outcome"] = "ok"
        entry["finished_at"] = time.time()

    async def _stream(
        self, exchange: _Exchange, encoder: _Encoder, behaviour: Behaviour, plan: _Plan, answer: _Answer
    ) -> None:
        entry = exchange.entry
        items = answer.pieces()
        usage = self._usage(encoder.body, behaviour, answer)

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
        start = encoder.stream_start(usage, items[0].kind if items else "text")
        if start and not await emit(start):
            return
        for index in range(len(items) + 1):
            if plan.hang_after is not None and index == min(plan.hang_after, len(items)):
                await exchange.hang()
                return
            if plan.stop_after is not None and index == min(plan.stop_after, len(items)):
                # the connection dies when the next token is due (so a client has read what came before it)
                if index > 0 and not await exchange.sleep(behaviour.token_delay_ms / 1000):
                    return
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
            delay_ms = behaviour.token_delay_ms if index > 0 else 0
            if items[index].delay_ms is not None:
                delay_ms = items[index].delay_ms
            if delay_ms and not await exchange.sleep(delay_ms / 1000):
                return
            if not await emit(encoder.stream_piece(items[index])):
                return
            if entry["first_token_at"] is None:
                entry["first_token_at"] = time.time()
            entry["tokens_sent"] = index + 1
        *events, last = encoder.stream_end(usage, answer.finish_reason)
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

    async def open_gate(request: Request) -> JSONResponse:
        state.gate(request.path_params["name"]).set()
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
            Route("/_control/gates/{name}", open_gate, methods=["POST"]),
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

    def open_gate(self, name: str) -> None:
        """Let the requests waiting at gate `name` (and any later ones) go on."""
        self.client.post(f"/_control/gates/{name}").raise_for_status()

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
