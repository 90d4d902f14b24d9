"""What every surface's router shares: reading the JSON body, the cache directives, and answering one engine run
as one JSON body or as an SSE stream, the client leaving and the shutdown handled the same way everywhere.

A surface brings its encoders: a `BodyCollector` (events -> the whole answer's body) and a `StreamEncoder`
(events -> SSE bytes). The engine's events are the same for all of them, and every run's events are its progress
stream's too (api/encoders/progress.py): once a request is planned, its answer, whole or streamed, and any error
after that carry `X-MoM-Request-Id` and `X-MoM-Progress-Url`.
"""

from __future__ import annotations

import logging
import uuid
from collections.abc import AsyncGenerator, Awaitable, Callable
from contextlib import aclosing
from dataclasses import dataclass
from typing import Any, Protocol

import orjson
from fastapi import Request
from fastapi.responses import JSONResponse, Response

from mom_service.api.admission import Admission
from mom_service.api.encoders.progress import RunProgress, progress_headers
from mom_service.api.errors import error_response_for
from mom_service.api.keys import Caller
from mom_service.api.state import AppState
from mom_service.api.streaming import ClientGone, ServerStopping, SSEResponse, unless_disconnected
from mom_service.engine.engine import Engine
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


async def admitted(state: AppState, engine: Engine, caller: Caller, asked: EngineRequest) -> Plan:
    """The plan of a request its caller may make: its MoM model one the caller's key may use (403), planned by
    `engine` (404, 400), within the key's budget (429; its worst case reserved). No upstream call before this
    returns."""
    state.keys.allow_model(caller, asked.model)
    plan = await engine.prepare(asked)
    await state.keys.admit_spend(caller, plan, engine)
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
    the first byte is answered with its status in the surface's shape; after it, it ends the stream. A failure
    before the plan (a 4xx) is raised: there is no run, so no progress headers."""
    engine = state.engine  # this request's, to its end: a config reload meanwhile does not change it
    plan = await admitted(state, engine, caller, asked)
    progress = RunProgress(state.progress, plan, asked.caller)
    headers = progress_headers(plan.request_id, state.links)
    run = _Run(request, state, engine.run(plan), progress, headers)
    try:
        if not asked.stream:
            body = collector(plan)
            return await _whole(run, body, on_completed(body) if on_completed is not None else None)
        stream = encoder(plan)
        return await _streamed(run, stream, on_completed(stream) if on_completed is not None else None)
    except ClientGone:
        progress.close()  # (the work may have been cancelled before it began)
        state.keys.release(plan.request_id)  # a run that never started reports no outcome: nothing was spent
        return Response(status_code=CLIENT_CLOSED, headers=headers)
    except (MoMError, ServerStopping) as exc:
        progress.close()
        state.keys.release(plan.request_id)
        error = Admission.cut_off_error() if isinstance(exc, ServerStopping) else exc
        response = error_response_for(error, request.url.path, request.headers)
        response.headers.update(headers)
        return response
    except BaseException:
        state.keys.release(plan.request_id)
        raise


@dataclass(frozen=True, slots=True)
class _Run:
    """One planned request on its way to its answer."""

    request: Request
    state: AppState
    events: AsyncGenerator[Event]
    progress: RunProgress
    headers: dict[str, str]


async def _whole(run: _Run, body: BodyCollector, done: OnCompleted | None) -> Response:
    """The answer as one body; raises ClientGone, ServerStopping, or the run's error."""
    events, progress = run.events, run.progress

    async def collect() -> dict[str, Any]:
        try:
            async with aclosing(events):
                async for event in events:
                    progress.see(event)
                    out = body.feed(event)
                    if out is not None:
                        if done is not None:
                            await done()
                        return out
        finally:
            progress.close()
        raise RuntimeError("the engine ended without an answer")

    stop = run.state.admission.cut_off
    return ORJSONResponse(await unless_disconnected(run.request, collect(), stop), headers=run.headers)


async def _streamed(run: _Run, stream: StreamEncoder, done: OnCompleted | None) -> Response:
    """The answer as SSE, once its first bytes are ready; raises ClientGone, ServerStopping, or the run's error
    when it fails before them."""
    stop = run.state.admission.cut_off
    frames = _sse(run.events, stream, done, run.progress)
    try:  # the first bytes worth sending; a failure before them is answered with its HTTP status
        first = await unless_disconnected(run.request, anext(frames, b""), stop)
    except (ClientGone, ServerStopping):
        await frames.aclose()
        raise
    return SSEResponse(_after(first, frames), stop, stream.error(Admission.cut_off_error()), headers=run.headers)


async def _sse(
    events: AsyncGenerator[Event], stream: StreamEncoder, done: OnCompleted | None, progress: RunProgress
) -> AsyncGenerator[bytes]:
    """The stream's SSE frames, the engine's events closed however it ends (and the run's progress with them). A
    failure before the first frame is raised, to be answered with its HTTP status; after it, it is the stream's
    last event."""
    async with aclosing(events):
        try:
            async for event in events:
                progress.see(event)
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
        finally:
            progress.close()


async def _after(first: bytes, body: AsyncGenerator[bytes]) -> AsyncGenerator[bytes]:
    async with aclosing(body):
        yield first
        async for out in body:
            yield out
