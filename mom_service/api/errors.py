"""Errors as HTTP answers: the JSON response (OpenAI's shape), and the app's handlers that turn whatever a request
raised into one. (After a stream began, an error is its last event: each protocol's encoder writes it.)"""

from __future__ import annotations

import logging
from collections.abc import Awaitable, Callable, Mapping
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from starlette.datastructures import Headers
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.responses import Response
from starlette.types import Scope

from mom_service.errors import (
    WITH_TRACEBACK,
    ErrorShape,
    InternalError,
    InvalidRequest,
    MethodNotAllowed,
    MoMError,
    NotFound,
    error_shape,
)

logger = logging.getLogger("mom_service")


def error_response(error: MoMError, shape: ErrorShape = "openai") -> Response:
    """The JSON error response in the surface's shape, with the error's status and headers (Retry-After,
    WWW-Authenticate, ...)."""
    return Response(error.body(shape), error.status_for(shape), headers=error.headers, media_type="application/json")


ANTHROPIC_VERSION = "anthropic-version"


def error_response_for(error: MoMError, path: str, headers: Mapping[str, str] | Headers | None = None) -> Response:
    """`error_response` in the shape of the surface the request belongs to (its path, and on shared endpoints its
    `anthropic-version` header)."""
    anthropic_client = headers is not None and ANTHROPIC_VERSION in headers
    return error_response(error, error_shape(path, anthropic_client))


def scope_error_response(error: MoMError, scope: Scope) -> Response:
    """`error_response_for` from an ASGI scope (for the middleware)."""
    return error_response_for(error, scope["path"], Headers(scope=scope))


def install_error_handlers(app: FastAPI) -> None:
    async def on_mom_error(request: Request, exc: Exception) -> Response:
        assert isinstance(exc, MoMError)
        return error_response_for(exc, request.url.path, request.headers)

    async def on_http_error(request: Request, exc: Exception) -> Response:
        assert isinstance(exc, StarletteHTTPException)
        error: MoMError
        if exc.status_code == 404:
            error = NotFound(f"No such endpoint: {request.method} {request.url.path}", code="not_found")
        elif exc.status_code == 405:
            error = MethodNotAllowed(f"Method {request.method} is not allowed on {request.url.path}.")
        else:
            error = InvalidRequest(str(exc.detail), status_code=exc.status_code)
        response = error_response_for(error, request.url.path, request.headers)
        for name, value in (exc.headers or {}).items():
            response.headers[name] = value
        return response

    async def on_validation_error(request: Request, exc: Exception) -> Response:
        assert isinstance(exc, RequestValidationError)
        first: dict[str, Any] = exc.errors()[0] if exc.errors() else {}
        loc = [str(p) for p in first.get("loc", ()) if p not in ("body", "query", "path", "header")]
        param = ".".join(loc) or None
        message = f"Invalid value for '{param}': {first.get('msg', 'invalid')}."
        return error_response_for(InvalidRequest(message, param=param), request.url.path, request.headers)

    async def on_unexpected(request: Request, exc: Exception) -> Response:
        logger.error("unhandled error on %s %s", request.method, request.url.path, exc_info=exc, extra=WITH_TRACEBACK)
        return error_response_for(
            InternalError("The service failed to answer this request."), request.url.path, request.headers
        )

    handlers: dict[Any, Callable[[Request, Exception], Awaitable[Response]]] = {
        MoMError: on_mom_error,
        StarletteHTTPException: on_http_error,
        RequestValidationError: on_validation_error,
        Exception: on_unexpected,
    }
    for exc_class, handler in handlers.items():
        app.add_exception_handler(exc_class, handler)
