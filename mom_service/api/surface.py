"""What every surface's router shares: reading the JSON body, the cache directives, and answering one engine run
as one JSON body or as an SSE stream, the client leaving and the shutdown handled the same way everywhere.

A surface brings its encoders: a `BodyCollector` (events -> the whole answer's body) and a `StreamEncoder`
(events -> SSE bytes). The engine's events are the same for all of them.
"""

from __future__ import annotations

import logging
import uuid
from collections.abc import AsyncGenerator, Awaitable, Callable
from contextlib import aclosing
from typing import Any, Protocol

import orjson
from fastapi import Request
from fastapi.responses import JSONResponse, Response

from mom_service.api.admission import Admission
from mom_service.api.keys import Caller
from mom_service.api.state import AppState
from mom_service.api.streaming import ClientGone, ServerStopping, SSEResponse, unless_disconnected
from mom_service.engine.events import Completed, Event, Failed
from mom_service.engine.plan import CachePolicy, Plan
from mom_service.engine.plan import Request as EngineRequest
from mom_service.errors import CLIENT_CLOSED, WITH_TRACEBACK, InternalError, InvalidRequest, MoMError

logger = logging.getLogger(__name__)

# Called once the answer is complete, before its last bytes are sent (the Responses surface stores it there, so a
# client continuing from it at once finds it).
OnCompleted = Callable[[], Awaitable[None]]


class ORJSONResponse(JSONResponse):
    def render(self, content: Any) -> bytes:
        return orjson.dumps(content)


class BodyCollector(Protocol):
    def feed(self, event: Event) -> dict[str, Any] | None:
        """The body at Completed; raises the error at Failed; otherwise collects and returns None."""


class StreamEncoder(Protocol):
    @property
    def started(self) -> bool:
        """Whether any bytes have been produced (after that, errors travel inside the stream)."""

    def feed(self, event: Event) -> bytes:
        """The bytes this event adds to the stream (possibly none)."""

    def error(self, error: MoMError) -> bytes:
        """The stream's last bytes when it fails after it began."""


def cache_policy(cache_control: str) -> CachePolicy:
    """`Cache-Control: no-cache` answers without looking in the cache; `no-store` does not store the answer."""
    directives = {d.strip().lower() for d in cache_control.split(",")}
    return CachePolicy(lookup="no-cache" not in directives, store="no-store" not in directives)


def request_cache(request: Request, state: AppState) -> CachePolicy | None:
    """What this request lets the cache do; None when the service has no cache."""
    return cache_policy(request.headers.get("cache-control", "")) if state.engine.cache is not None else None


def request_id(request: Request) -> str:
    """Our id of this request (the request log's, the usage records' and the trace's)."""
    return getattr(request.state, "request_id", None) or str(uuid.uuid4())


async def read_json(request: Request) -> Any:
    body = await request.body()
    if not body:
        raise InvalidRequest("The request body is empty: send a JSON object.", code="invalid_request_body")
    try:
        return orjson.loads(body)
    except orjson.JSONDecodeError as exc:
        raise InvalidRequest(f"The request body is not valid JSON ({exc.msg}).", code="invalid_json") from None


async def admitted(state: AppState, caller: Caller, asked: EngineRequest) -> Plan:
    """The plan of a request its caller may make: its MoM model one the caller's key may use (403), planned (404,
    400), within the key's budget (429; its worst case reserved). No upstream call before this returns."""
    state.keys.allow_model(caller, asked.model)
    plan = await state.engine.prepare(asked)
    await state.keys.admit_spend(caller, plan, state.engine)
    return plan


async def answer(
    request: Request,
    state: AppState,
    caller: Caller,
    asked: EngineRequest,
    *,
    collector: Callable[[Plan], BodyCollector],
    encoder: Callable[[Plan], StreamEncoder],
    on_completed: Callable[[BodyCollector | StreamEncoder], OnCompleted] | None = None,
) -> Response:
    """Plan (`admitted`) and run one request; answer it whole (`asked.stream` false) or as SSE. A failure before
    the first byte is raised (answered with its status in the surface's shape); after it, it ends the stream."""
    plan = await admitted(state, caller, asked)
    try:
        response = await _respond(request, state, plan, collector, encoder, on_completed)
    except BaseException:
        state.keys.release(plan.request_id)  # a run that never started reports no outcome: nothing was spent
        raise
    if response.status_code == CLIENT_CLOSED:
        state.keys.release(plan.request_id)
    return response


async def _respond(
    request: Request,
    state: AppState,
    plan: Plan,
    collector: Callable[[Plan], BodyCollector],
    encoder: Callable[[Plan], StreamEncoder],
    on_completed: Callable[[BodyCollector | StreamEncoder], OnCompleted] | None,
) -> Response:
    events = state.engine.run(plan)
    stop = state.admission.cut_off
    if not plan.stream:
        body = collector(plan)
        done = on_completed(body) if on_completed is not None else None

        async def collect() -> dict[str, Any]:
            async with aclosing(events):
                async for event in events:
                    out = body.feed(event)
                    if out is not None:
                        if done is not None:
                            await done()
                        return out
            raise RuntimeError("the engine ended without an answer")

        try:
            return ORJSONResponse(await unless_disconnected(request, collect(), stop))
        except ClientGone:
            return Response(status_code=CLIENT_CLOSED)
        except ServerStopping:
            raise Admission.cut_off_error() from None

    stream = encoder(plan)
    frames = _sse(events, stream, on_completed(stream) if on_completed is not None else None)
    try:  # the first bytes worth sending; a failure before them is answered with its HTTP status
        first = await unless_disconnected(request, anext(frames, b""), stop)
    except ClientGone:
        await frames.aclose()
        return Response(status_code=CLIENT_CLOSED)
    except ServerStopping:
        await frames.aclose()
        raise Admission.cut_off_error() from None
    return SSEResponse(_after(first, frames), stop, stream.error(Admission.cut_off_error()))


async def _sse(events: AsyncGenerator[Event], stream: StreamEncoder, done: OnCompleted | None) -> AsyncGenerator[bytes]:
    """The stream's SSE frames, the engine's events closed however it ends. A failure before the first frame is
    raised, to be answered with its HTTP status; after it, it is the stream's last event."""
    async with aclosing(events):
        try:
            async for event in events:
                if isinstance(event, Failed) and not stream.started:
                    raise event.error
                out = stream.feed(event)
                if done is not None and isinstance(event, Completed):
                    await done()
                if out:
                    yield out
        except MoMError:
            raise
        except Exception as exc:  # a bug in the encoding: the stream still ends in the protocol's shape
            logger.error("stream failed", exc_info=exc, extra=WITH_TRACEBACK)
            error = InternalError("The service failed while answering this request.")
            if not stream.started:
                raise error from None
            yield stream.error(error)


async def _after(first: bytes, body: AsyncGenerator[bytes]) -> AsyncGenerator[bytes]:
    async with aclosing(body):
        yield first
        async for out in body:
            yield out
