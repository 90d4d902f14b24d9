"""Errors as HTTP answers: the JSON response (OpenAI's shape), and the app's handlers that turn whatever a request
raised into one. (After a stream began, an error is its last event: each protocol's encoder writes it.)"""

from __future__ import annotations

import logging
from collections.abc import Awaitable, Callable
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.responses import Response

from mom_service.errors import WITH_TRACEBACK, InternalError, InvalidRequest, MethodNotAllowed, MoMError, NotFound

logger = logging.getLogger("mom_service")


def error_response(error: MoMError) -> Response:
    """The JSON error response, with the error's status and headers (Retry-After, WWW-Authenticate, ...)."""
    return Response(error.to_json(), error.status_code, headers=error.headers, media_type="application/json")


def install_error_handlers(app: FastAPI) -> None:
    async def on_mom_error(request: Request, exc: Exception) -> Response:
        assert isinstance(exc, MoMError)
        return error_response(exc)

    async def on_http_error(request: Request, exc: Exception) -> Response:
        assert isinstance(exc, StarletteHTTPException)
        error: MoMError
        if exc.status_code == 404:
            error = NotFound(f"No such endpoint: {request.method} {request.url.path}", code="not_found")
        elif exc.status_code == 405:
            error = MethodNotAllowed(f"Method {request.method} is not allowed on {request.url.path}.")
        else:
            error = InvalidRequest(str(exc.detail), status_code=exc.status_code)
        response = error_response(error)
        for name, value in (exc.headers or {}).items():
            response.headers[name] = value
        return response

    async def on_validation_error(request: Request, exc: Exception) -> Response:
        assert isinstance(exc, RequestValidationError)
        first: dict[str, Any] = exc.errors()[0] if exc.errors() else {}
        loc = [str(p) for p in first.get("loc", ()) if p not in ("body", "query", "path", "header")]
        param = ".".join(loc) or None
        message = f"Invalid value for '{param}': {first.get('msg', 'invalid')}."
        return error_response(InvalidRequest(message, param=param))

    async def on_unexpected(request: Request, exc: Exception) -> Response:
        logger.error("unhandled error on %s %s", request.method, request.url.path, exc_info=exc, extra=WITH_TRACEBACK)
        return error_response(InternalError("The service failed to answer this request."))

    handlers: dict[Any, Callable[[Request, Exception], Awaitable[Response]]] = {
        MoMError: on_mom_error,
        StarletteHTTPException: on_http_error,
        RequestValidationError: on_validation_error,
        Exception: on_unexpected,
    }
    for exc_class, handler in handlers.items():
        app.add_exception_handler(exc_class, handler)
