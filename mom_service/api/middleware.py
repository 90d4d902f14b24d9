"""The app's own ASGI middleware: the body-size limit (413 before anything is parsed) and a quiet failed start-up.
(Admission is admission.py; the request log observability/request_log.py; CORS is Starlette's.)"""

from __future__ import annotations

from starlette.responses import Response
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from mom_service.api.errors import scope_error_response
from mom_service.errors import InvalidRequest, PayloadTooLarge


class BodySizeLimit:
    """Refuses bodies over the limit with 413 before they are parsed: by Content-Length, or while reading."""

    def __init__(self, app: ASGIApp, max_bytes: int) -> None:
        self.app = app
        self.max_bytes = max_bytes

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        for name, value in scope["headers"]:
            if name == b"content-length":
                if not value.isdigit():
                    await scope_error_response(InvalidRequest("Invalid Content-Length header."), scope)(
                        scope, receive, send
                    )
                    return
                if int(value) > self.max_bytes:
                    await self._too_large(scope)(scope, receive, send)
                    return
        received = 0

        async def limited_receive() -> Message:
            nonlocal received
            message = await receive()
            if message["type"] == "http.request":
                received += len(message.get("body", b""))
                if received > self.max_bytes:
                    raise self._too_large_error()
            return message

        await self.app(scope, limited_receive, send)

    def _too_large_error(self) -> PayloadTooLarge:
        return PayloadTooLarge(f"The request body is larger than the limit of {self.max_bytes} bytes.")

    def _too_large(self, scope: Scope) -> Response:
        response = scope_error_response(self._too_large_error(), scope)
        response.headers["Connection"] = "close"
        return response


class QuietStartupFailure:
    """Keeps a failed start-up to our one clean log line: no traceback passed on to the server's log."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "lifespan":
            await self.app(scope, receive, send)
            return

        async def quiet_send(message: Message) -> None:
            if message["type"] in ("lifespan.startup.failed", "lifespan.shutdown.failed"):
                message = {"type": message["type"], "message": ""}
            await send(message)

        await self.app(scope, receive, quiet_send)
