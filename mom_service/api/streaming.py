"""Client disconnects: a stream stops and closes the engine; a wait before the response also notices them.

The same goes for the end of a shutdown's grace period (`stop`): a wait is cancelled with ServerStopping, and a
stream ends with a last frame (an error event and `[DONE]`) instead of being cut off mid-way. Either way the answer
was cut off after its LLM calls began: the endpoint answers `cut_off_by_shutdown` (500), never the 503 that tells a
load balancer the request was refused untouched and may go to another replica.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncGenerator, Coroutine
from typing import Any, TypeVar

import anyio
from starlette.requests import Request
from starlette.responses import StreamingResponse
from starlette.types import Receive, Scope, Send

T = TypeVar("T")

SSE_HEADERS = {"Cache-Control": "no-cache", "X-Accel-Buffering": "no"}


class ClientGone(Exception):
    """The client disconnected before the answer was ready."""


class ServerStopping(Exception):
    """The shutdown's grace period ended before the answer was ready (answered `Admission.cut_off_error()`)."""


async def _wait_for_disconnect(receive: Receive) -> None:
    while True:
        message = await receive()
        if message["type"] == "http.disconnect":
            return


async def unless_disconnected(
    request: Request | None, work: Coroutine[Any, Any, T], stop: asyncio.Event | None = None
) -> T:
    """Run `work`; if the client disconnects first, cancel it (and what it started) and raise ClientGone; if
    `stop` is set first, the same, with ServerStopping. Without a request (its transport watches the client
    itself, as MCP's does), only `stop` is watched.

    The request body must already have been read: the watcher reads the next ASGI message.
    """
    task = asyncio.ensure_future(work)
    watchers: set[asyncio.Future[Any]] = set()
    if request is not None:
        watchers.add(asyncio.ensure_future(_wait_for_disconnect(request.receive)))
    stopper = asyncio.ensure_future(stop.wait()) if stop is not None else None
    if stopper is not None:
        watchers.add(stopper)
    try:
        await asyncio.wait({task, *watchers}, return_when=asyncio.FIRST_COMPLETED)
    finally:
        for watcher in watchers:
            watcher.cancel()
        if not task.done():
            task.cancel()
            with anyio.CancelScope(shield=True):
                await asyncio.wait({task})
    if task.cancelled():
        if stopper is not None and stopper.done() and not stopper.cancelled():
            raise ServerStopping
        raise ClientGone
    return task.result()


class SSEResponse(StreamingResponse):
    """A streaming response that always watches for the client leaving, and then closes its body iterator.

    Closing the iterator runs the engine's cleanup at once, which cancels every upstream call still running.
    """

    media_type = "text/event-stream"

    def __init__(
        self,
        content: AsyncGenerator[bytes],
        stop: asyncio.Event | None = None,
        stop_frame: bytes = b"",
        headers: dict[str, str] | None = None,
    ) -> None:
        super().__init__(content, headers={**SSE_HEADERS, **(headers or {})})
        self._source = content
        self._stop = stop
        self._stop_frame = stop_frame

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        stopped = False
        try:
            async with anyio.create_task_group() as group:

                async def stream() -> None:
                    with contextlib.suppress(OSError):  # the client went away while we were sending
                        await self.stream_response(send)
                    group.cancel_scope.cancel()

                async def until_stopped(stop: asyncio.Event) -> None:
                    nonlocal stopped
                    await stop.wait()
                    stopped = True
                    group.cancel_scope.cancel()

                group.start_soon(stream)
                if self._stop is not None:
                    group.start_soon(until_stopped, self._stop)
                await _wait_for_disconnect(receive)
                group.cancel_scope.cancel()
        finally:
            with anyio.CancelScope(shield=True):
                await self._source.aclose()
                if stopped:  # end the stream in OpenAI's shape rather than cutting it
                    with contextlib.suppress(OSError, RuntimeError):
                        await send({"type": "http.response.body", "body": self._stop_frame, "more_body": False})
