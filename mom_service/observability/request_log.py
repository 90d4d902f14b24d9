"""Request logs: every HTTP request gets an id (`X-Request-ID`, echoed) and exactly one log line when it ends (but
CORS preflights, which the CORS layer answers before this middleware sees them).

`RequestLog` is a pure ASGI middleware, so streaming and disconnect detection pass through untouched. It logs
when the response is complete or the client has left.

Two ids: every request gets a fresh one of ours (a uuid4), which the engine uses for the usage records and the
trace (`request.state.request_id`). A client's own valid `X-Request-ID` is echoed and logged as `request_id`, with
ours beside it as `internal_id`: the client's id is not unique (retries reuse it, anyone can repeat one) and may be
longer than the usage records' key, so it never becomes the key of a record. Without one, both are the same id.

For a chat request that reached the engine, the line adds the engine's outcome: `remember_outcome`, an engine
recorder, hands it to the middleware of the request that ran it (through a context variable, set per request).

Nothing a client sends is logged except the path, and, with `LOG_CONTENT=true`, the last user message (truncated).
The redacting filter on the handler still applies to every line.
"""

from __future__ import annotations

import logging
import re
import time
import uuid
from contextvars import ContextVar
from dataclasses import dataclass, field
from decimal import Decimal
from typing import Any

import orjson
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from mom_service.engine.events import RequestOutcome
from mom_service.errors import CLIENT_CLOSED, ErrorShape, InternalError, error_shape
from mom_service.settings import Settings

logger = logging.getLogger("mom_service.requests")

HEADER = b"x-request-id"
VALID_ID = re.compile(r"[A-Za-z0-9._:-]{1,128}")
# The endpoints that ask the engine for an answer (admitted, counted in flight, their content loggable); /mcp's
# POSTs carry MCP's messages, `consult` among them
ANSWER_PATHS = frozenset({"/v1/chat/completions", "/v1/messages", "/v1/responses", "/mcp"})
CONTENT_LIMIT = 500  # characters of the last user message, with LOG_CONTENT=true
TEXT_PARTS = ("text", "input_text")  # a text part of a message, in each surface's words
MAX_PATH = 256
MAX_ERROR_BODY = 16 * 1024  # an error body larger than this is not read for its code
# Polled endpoints (probes, scrapes): their successful answers are logged at DEBUG, not to flood the log.
QUIET_PATHS = ("/health", "/metrics")
STRUCTURED = "structured"  # the LogRecord attribute that marks a message as one JSON object (LOG_FORMAT=json)
_PLAIN = re.compile(r'[^\s"=\\]+')
_CODE = re.compile(r"[A-Za-z0-9_.-]{1,64}")


@dataclass(slots=True)
class RequestContext:
    """One request as the middleware follows it; the engine's outcome is left here when there is one."""

    internal_id: str  # ours: the plan's, the usage records' and the trace's id
    request_id: str  # what the client sees in X-Request-ID: its own valid id, else ours
    outcome: RequestOutcome | None = None


_current: ContextVar[RequestContext | None] = ContextVar("mom_request", default=None)


def remember_outcome(outcome: RequestOutcome) -> None:
    """Engine recorder: hand a finished request's outcome to the middleware that logs it."""
    context = _current.get()
    if context is not None and context.internal_id == outcome.request_id:
        context.outcome = outcome


def incoming_id(scope: Scope) -> str | None:
    """The client's X-Request-ID when it is 1-128 characters of [A-Za-z0-9._:-]; None otherwise."""
    for name, value in scope["headers"]:
        if name == HEADER:
            text = value.decode("latin-1")
            return text if VALID_ID.fullmatch(text) else None
    return None


@dataclass(slots=True)
class _Response:
    status: int | None = None
    json_error: bool = False  # an error answered in JSON: its body is read for the error code
    error_body: bytearray = field(default_factory=bytearray)


def last_user_text(body: bytes) -> str | None:
    """The text of the last user message of a request body (Chat's or Anthropic's `messages`, Responses' `input`),
    truncated; None when there is none."""
    try:
        request = orjson.loads(body)
    except orjson.JSONDecodeError:
        return None
    if not isinstance(request, dict):
        return None
    messages = request.get("messages", request.get("input"))
    if isinstance(messages, str):  # Responses' input as one string
        return messages[:CONTENT_LIMIT]
    if not isinstance(messages, list):
        return None
    for message in reversed(messages):
        if isinstance(message, dict) and message.get("role") == "user":
            content = message.get("content")
            if isinstance(content, list):
                parts = [p.get("text") for p in content if isinstance(p, dict) and p.get("type") in TEXT_PARTS]
                content = " ".join(p for p in parts if isinstance(p, str))
            return content[:CONTENT_LIMIT] if isinstance(content, str) else None
    return None


def _error_code(body: bytes) -> str | None:
    try:
        parsed = orjson.loads(body)
    except orjson.JSONDecodeError:
        return None
    error = parsed.get("error") if isinstance(parsed, dict) else None
    if isinstance(error, dict) and isinstance(error.get("data"), dict):
        error = error["data"]  # a JSON-RPC error (MCP's, at /mcp) carries ours as its data
    if not isinstance(error, dict):
        return None
    code = error.get("code") or error.get("type")
    return code if isinstance(code, str) and _CODE.fullmatch(code) else None


def _cost(value: Decimal | None, structured: bool) -> str | float | None:
    if value is None:
        return None
    return float(value) if structured else format(value.normalize(), "f")


def line_fields(
    *,
    request_id: str,
    internal_id: str | None,
    method: str,
    path: str,
    status: int | None,
    latency_ms: float,
    cancelled: bool,
    outcome: RequestOutcome | None,
    error_code: str | None,
    content: str | None,
    structured: bool,
) -> dict[str, Any]:
    """The fields of one request line, in order; None values are left out of text lines."""
    if outcome is not None:
        result: str = outcome.status
        error_code = outcome.error_code
    elif cancelled or status == CLIENT_CLOSED:
        result = "cancelled"
    else:
        result = "ok" if status is not None and status < 400 else "error"
    fields: dict[str, Any] = {
        "request_id": request_id,
        "internal_id": internal_id,
        "method": method,
        "path": path[:MAX_PATH],
        "status": status,
        "outcome": result,
        "error": error_code,
        "latency_ms": latency_ms,
    }
    if outcome is not None:
        breakdown = outcome.breakdown
        usage = breakdown.usage()
        fields |= {
            "model": outcome.mom_model,
            "surface": outcome.surface,
            "stream": outcome.stream,
            "members_answered": breakdown.answered,
            "members_asked": breakdown.asked,
            "members_failed": [m.name for m in breakdown.members if m.status == "error"],
            "ttft_ms": outcome.ttft_ms,
            "prompt_tokens": usage.prompt_tokens,
            "completion_tokens": usage.completion_tokens,
            "cost": _cost(breakdown.cost, structured),
            "unpriced": breakdown.unpriced,
            "cache": breakdown.cache,
            "turn": breakdown.turn,
            "overrides": outcome.overrides or None,
            "notices": len(breakdown.notices),
            "tier": breakdown.tier,
            "key": outcome.key.id if outcome.key is not None else None,  # the API key's id (docs/keys.md)
        }
    if content is not None:
        fields["content"] = content
    return fields


def _text_value(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    text = ",".join(value) if isinstance(value, list) else str(value)
    return text if _PLAIN.fullmatch(text) else orjson.dumps(text).decode()


def render_text(fields: dict[str, Any]) -> str:
    """`key=value` pairs; values with spaces, quotes or `=` are JSON-quoted; empty values are left out."""
    shown = dict(fields)
    if "members_answered" in shown:
        shown["members"] = f"{shown.pop('members_answered')}/{shown.pop('members_asked')}"
        shown["failed"] = shown.pop("members_failed")
        # keep the members right after the stream flag, where a reader looks for them
        order = [k for k in fields if k not in ("members_answered", "members_asked", "members_failed")]
        order.insert(order.index("stream") + 1, "members")
        order.insert(order.index("members") + 1, "failed")
        shown = {k: shown[k] for k in order}
    return " ".join(f"{k}={_text_value(v)}" for k, v in shown.items() if v is not None and v != [])


# request.state's: headers for the answer's start, set by the app (the rate-limit headers a request was counted
# with, api/auth.py); added here, by the one send wrapper every answer passes, not by a wrapper of their own
ANSWER_HEADERS = "answer_headers"


class RequestLog:
    """Pure ASGI middleware: request id in and out, one log line per request."""

    def __init__(self, app: ASGIApp, settings: Settings) -> None:
        self.app = app
        self.structured = settings.log_format == "json"
        self.log_content = settings.log_content
        self.max_body = settings.mom_max_body_bytes

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        started = time.perf_counter()
        internal_id = str(uuid.uuid4())  # 36 characters, the usage records' key length
        request_id = incoming_id(scope) or internal_id
        scope.setdefault("state", {})["request_id"] = internal_id
        context = RequestContext(internal_id, request_id)
        chat = scope["method"] == "POST" and scope["path"] in ANSWER_PATHS
        response = _Response()
        body = bytearray() if chat and self.log_content else None

        async def send_with_id(message: Message) -> None:
            if message["type"] == "http.response.start":
                headers = [(k, v) for k, v in message.get("headers", ()) if k.lower() != HEADER]
                headers.append((HEADER, request_id.encode()))
                extra = scope.get("state", {}).get(ANSWER_HEADERS)
                if extra:  # (those it does not carry already: a refusal carries its own)
                    present = {name.lower() for name, _ in headers}
                    headers += [(k.encode(), v.encode()) for k, v in extra.items() if k.encode() not in present]
                message = {**message, "headers": headers}
                response.status = int(message["status"])
                response.json_error = response.status >= 400 and any(
                    k.lower() == b"content-type" and v.startswith(b"application/json") for k, v in headers
                )
            elif message["type"] == "http.response.body" and response.json_error:
                response.error_body += message.get("body", b"")[: MAX_ERROR_BODY - len(response.error_body)]
            await send(message)

        async def receive_copy() -> Message:
            message = await receive()
            if body is not None and message["type"] == "http.request" and len(body) <= self.max_body:
                body.extend(message.get("body", b""))
            return message

        cancelled = False
        token = _current.set(context)
        try:
            await self.app(scope, receive_copy if body is not None else receive, send_with_id)
        except Exception:
            if response.status is None:
                # Starlette answers unexpected errors outside every middleware: answer here, to carry the id.
                await self._internal_error(send_with_id, error_shape(scope["path"]))
            raise
        except BaseException:
            cancelled = True
            raise
        finally:
            _current.reset(token)
            self._log(scope, context, response, started, cancelled, body)

    @staticmethod
    async def _internal_error(send: Send, shape: ErrorShape) -> None:
        error = InternalError("The service failed to answer this request.")
        body = error.body(shape)
        headers = [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())]
        try:
            await send({"type": "http.response.start", "status": error.status_code, "headers": headers})
            await send({"type": "http.response.body", "body": body})
        except OSError:
            pass  # the client is gone

    def _log(
        self,
        scope: Scope,
        context: RequestContext,
        response: _Response,
        started: float,
        cancelled: bool,
        body: bytearray | None,
    ) -> None:
        status = response.status
        fields = line_fields(
            request_id=context.request_id,
            internal_id=context.internal_id if context.internal_id != context.request_id else None,
            method=scope["method"],
            path=scope["path"],
            status=status,
            latency_ms=round((time.perf_counter() - started) * 1000, 1),
            cancelled=cancelled,
            outcome=context.outcome,
            error_code=_error_code(bytes(response.error_body)) if response.error_body else None,
            content=last_user_text(bytes(body)) if body else None,
            structured=self.structured,
        )
        if status is not None and status >= 500:
            level = logging.WARNING
        elif scope["path"].startswith(QUIET_PATHS) and status is not None and status < 400:
            level = logging.DEBUG
        else:
            level = logging.INFO
        if self.structured:
            logger.log(level, orjson.dumps(fields).decode(), extra={STRUCTURED: True})
        else:
            logger.log(level, render_text(fields))
