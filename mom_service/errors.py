"""The service's errors: what went wrong (status, type, code, param, message), with no HTTP in them. The API turns
them into responses and stream events (api/errors.py), in OpenAI's shape (`to_dict`).

Hierarchy::

    MoMError                      any error we answer with: status, type, code, param, message
    ├── InvalidRequest            400 invalid_request_error (bad JSON, wrong field, n != 1, ...)
    ├── AuthenticationFailed      401 authentication_error (missing or wrong bearer token, a key disabled or expired)
    ├── Forbidden                 403 permission_error (code: model_not_allowed: a MoM model the API key may not use)
    ├── NotFound                  404 not_found_error / model_not_found
    ├── MethodNotAllowed          405 invalid_request_error
    ├── PayloadTooLarge           413 invalid_request_error
    ├── RateLimited               429 requests (code: rate_limit_exceeded, over_capacity), with Retry-After
    ├── BudgetExceeded            429 insufficient_quota / budget_exceeded (an API key's budget), with Retry-After
    ├── InternalError             500 server_error (a bug; the message says nothing more)
    ├── CutOffByShutdown          500 server_error / cut_off_by_shutdown (an answer ended by the shutdown's grace
    │                             period: its LLM calls so far are paid, so it must not be re-sent as if refused)
    ├── UpstreamFailed            502 upstream_error (code: members_failed, concluding_failed)
    └── ServiceUnavailable        503 service_unavailable (code: service_misconfigured, shutting_down, ...)

    ConfigError                   a wrong config.yaml: stops start-up, never reaches a client

OpenAI's JSON body is ``{"error": {"message", "type", "param", "code"}}``; after streaming began the same object
is sent as one SSE ``data:`` event, followed by ``data: [DONE]``.

The Anthropic Messages surface answers the same errors in Anthropic's shape (`to_anthropic_dict`):
``{"type": "error", "error": {"type", "message"}}``, its type chosen by the status (`ANTHROPIC_TYPES`); a request
refused for capacity (`over_capacity`) is Anthropic's 529 `overloaded_error`.
"""

from __future__ import annotations

from typing import Any, ClassVar, Literal

import orjson

# nginx's status for "the client closed the connection first": nobody reads it, but logs and metrics do.
CLIENT_CLOSED = 499
# The `extra` of the one log line of an unexpected error (a bug): the redacting log filter keeps its traceback
# (redacted); every other traceback is dropped (observability/redaction.py).
KEEP_TRACEBACK = "keep_traceback"
WITH_TRACEBACK = {KEEP_TRACEBACK: True}

ErrorShape = Literal["openai", "anthropic", "mcp"]
# Anthropic's error types by HTTP status (https://docs.anthropic.com/en/api/errors); any other 5xx is `api_error`
ANTHROPIC_TYPES = {
    400: "invalid_request_error",
    401: "authentication_error",
    403: "permission_error",
    404: "not_found_error",
    405: "invalid_request_error",
    413: "request_too_large",
    429: "rate_limit_error",
    503: "overloaded_error",
    529: "overloaded_error",
}
OVERLOADED = 529  # Anthropic's status for "overloaded: retry later"
ANTHROPIC_PATH = "/v1/messages"


OPENAI_PATHS = ("/v1/chat/", "/v1/responses")
MCP_PATH = "/mcp"
# JSON-RPC's error codes, for what /mcp refuses before MCP sees the request (a client error, or ours)
JSONRPC_INVALID_REQUEST, JSONRPC_INTERNAL_ERROR = -32600, -32603


def error_shape(path: str, anthropic_client: bool = False) -> ErrorShape:
    """The shape errors on this path are answered in: Anthropic's under /v1/messages, and on the shared endpoints
    (`/v1/models`, ...) for a client that says it is Anthropic's (an `anthropic-version` header); a JSON-RPC error
    (MCP's) at /mcp; OpenAI's else."""
    if path == MCP_PATH:
        return "mcp"
    if path == ANTHROPIC_PATH or path.startswith(ANTHROPIC_PATH + "/"):
        return "anthropic"
    return "anthropic" if anthropic_client and not path.startswith(OPENAI_PATHS) else "openai"


class MoMError(Exception):
    """An error answered to the client in OpenAI's shape."""

    default_status: ClassVar[int] = 500
    error_type: ClassVar[str] = "server_error"
    default_code: ClassVar[str | None] = None

    def __init__(
        self,
        message: str,
        *,
        code: str | None = None,
        param: str | None = None,
        headers: dict[str, str] | None = None,
        status_code: int | None = None,
    ) -> None:
        super().__init__(message)
        self.status_code = status_code if status_code is not None else self.default_status
        self.message = message
        self.code = code if code is not None else self.default_code
        self.param = param
        self.headers = headers or {}

    def to_dict(self) -> dict[str, Any]:
        return {
            "error": {
                "message": self.message,
                "type": self.error_type,
                "param": self.param,
                "code": self.code,
            }
        }

    def to_json(self) -> bytes:
        return orjson.dumps(self.to_dict())

    def to_anthropic_dict(self) -> dict[str, Any]:
        status = self.status_for("anthropic")
        kind = ANTHROPIC_TYPES.get(status, "api_error" if status >= 500 else "invalid_request_error")
        return {"type": "error", "error": {"type": kind, "message": self.message}}

    def to_mcp_dict(self) -> dict[str, Any]:
        """A JSON-RPC error, as MCP's clients read one at any HTTP status: the request's id unknown (null), our
        error object as its data."""
        code = JSONRPC_INTERNAL_ERROR if self.status_code >= 500 else JSONRPC_INVALID_REQUEST
        error = {"code": code, "message": self.message, "data": self.to_dict()["error"]}
        return {"jsonrpc": "2.0", "id": None, "error": error}

    def status_for(self, shape: ErrorShape) -> int:
        """The HTTP status in this shape: Anthropic's clients know capacity refusals as 529."""
        return OVERLOADED if shape == "anthropic" and self.code == "over_capacity" else self.status_code

    def body(self, shape: ErrorShape) -> bytes:
        if shape == "mcp":
            return orjson.dumps(self.to_mcp_dict())
        return orjson.dumps(self.to_anthropic_dict()) if shape == "anthropic" else self.to_json()


class InvalidRequest(MoMError):
    default_status = 400
    error_type = "invalid_request_error"


class AuthenticationFailed(MoMError):
    default_status = 401
    error_type = "authentication_error"
    default_code = "invalid_api_key"


class Forbidden(MoMError):
    default_status = 403
    error_type = "permission_error"


class NotFound(MoMError):
    default_status = 404
    error_type = "not_found_error"


class MethodNotAllowed(MoMError):
    default_status = 405
    error_type = "invalid_request_error"
    default_code = "method_not_allowed"


class PayloadTooLarge(MoMError):
    default_status = 413
    error_type = "invalid_request_error"
    default_code = "request_too_large"


class RateLimited(MoMError):
    """Too many requests: OpenAI's own rate-limit errors have the type `requests`."""

    default_status = 429
    error_type = "requests"
    default_code = "rate_limit_exceeded"


class BudgetExceeded(MoMError):
    """An API key's budget for its period is spent (OpenAI's own quota errors have the type `insufficient_quota`)."""

    default_status = 429
    error_type = "insufficient_quota"
    default_code = "budget_exceeded"


class UpstreamFailed(MoMError):
    default_status = 502
    error_type = "upstream_error"


class InternalError(MoMError):
    default_status = 500
    error_type = "server_error"
    default_code = "internal_error"


class CutOffByShutdown(MoMError):
    """An answer still running when the shutdown's grace period ended.

    Not a 503: a 503 means "refused before any upstream call, send it elsewhere" (load balancers retry it, see
    deploy/nginx.conf), while this request has already made, and paid for, LLM calls.
    """

    default_status = 500
    error_type = "server_error"
    default_code = "cut_off_by_shutdown"


class ServiceUnavailable(MoMError):
    default_status = 503
    error_type = "service_unavailable"


class ConfigError(Exception):
    """config.yaml is wrong; the message names the file, the entry and the field."""
