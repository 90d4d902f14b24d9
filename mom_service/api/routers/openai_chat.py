"""`/v1/chat/completions`: validate OpenAI's request, turn it into the engine's, run it, encode the events as a
`chat.completion` or its SSE chunks. Thin by design."""

from __future__ import annotations

import logging
import uuid
from collections.abc import AsyncGenerator
from contextlib import aclosing
from typing import Any

import orjson
from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse, Response

from mom_service.api.admission import Admission
from mom_service.api.auth import Authorized, RateLimitedToken
from mom_service.api.encoders.openai import CompletionCollector, StreamSerializer
from mom_service.api.schemas.openai import RequestLimits, parse_chat_request
from mom_service.api.state import StateDep
from mom_service.api.streaming import ClientGone, ServerStopping, SSEResponse, unless_disconnected
from mom_service.engine.events import Event, Failed
from mom_service.engine.plan import CachePolicy
from mom_service.engine.plan import Request as EngineRequest
from mom_service.errors import CLIENT_CLOSED, WITH_TRACEBACK, InternalError, InvalidRequest, MoMError

logger = logging.getLogger(__name__)
router = APIRouter(prefix="/v1")


class ORJSONResponse(JSONResponse):
    def render(self, content: Any) -> bytes:
        return orjson.dumps(content)


def cache_policy(cache_control: str) -> CachePolicy:
    """`Cache-Control: no-cache` answers without looking in the cache; `no-store` does not store the answer."""
    directives = {d.strip().lower() for d in cache_control.split(",")}
    return CachePolicy(lookup="no-cache" not in directives, store="no-store" not in directives)


async def _read_json(request: Request) -> Any:
    body = await request.body()
    if not body:
        raise InvalidRequest("The request body is empty: send a JSON object.", code="invalid_request_body")
    try:
        return orjson.loads(body)
    except orjson.JSONDecodeError as exc:
        raise InvalidRequest(f"The request body is not valid JSON ({exc.msg}).", code="invalid_json") from None


@router.post("/chat/completions")
async def chat_completions(request: Request, state: StateDep, caller: Authorized, _: RateLimitedToken) -> Response:
    settings = state.settings
    limits = RequestLimits(max_messages=settings.mom_max_messages, max_text_chars=settings.mom_max_text_chars)
    chat = parse_chat_request(await _read_json(request), limits)
    request_id = getattr(request.state, "request_id", None) or str(uuid.uuid4())
    cache = cache_policy(request.headers.get("cache-control", "")) if state.engine.cache is not None else None
    plan = await state.engine.prepare(
        EngineRequest(
            model=chat.model,
            messages=chat.upstream_messages(),
            params=chat.sampling_params(),
            final_params=chat.final_params(),
            tools=chat.upstream_tools(),
            request_id=request_id,
            caller=caller,
            stream=bool(chat.stream),
            user=chat.user,
            cache=cache,
        )
    )
    mom = plan.mom
    json_answer = plan.response_format is not None
    events = state.engine.run(plan)
    stop = state.admission.cut_off

    if not chat.stream:
        collector = CompletionCollector(mom, json_answer=json_answer)

        async def collect() -> dict[str, object]:
            async with aclosing(events):
                async for event in events:
                    body = collector.feed(event)
                    if body is not None:
                        return body
            raise RuntimeError("the engine ended without an answer")

        try:
            return ORJSONResponse(await unless_disconnected(request, collect(), stop))
        except ClientGone:
            return Response(status_code=CLIENT_CLOSED)
        except ServerStopping:
            raise Admission.cut_off_error() from None

    serializer = StreamSerializer(mom, include_usage=chat.include_usage, json_answer=json_answer)
    body = _sse(events, serializer)
    try:  # the first bytes worth sending; a failure before them is answered with its HTTP status
        first = await unless_disconnected(request, anext(body, b""), stop)
    except ClientGone:
        await body.aclose()
        return Response(status_code=CLIENT_CLOSED)
    except ServerStopping:
        await body.aclose()
        raise Admission.cut_off_error() from None
    return SSEResponse(_after(first, body), stop, serializer.error(Admission.cut_off_error()))


async def _sse(events: AsyncGenerator[Event], serializer: StreamSerializer) -> AsyncGenerator[bytes]:
    """The stream's SSE frames, the engine's events closed however it ends. A failure before the first frame is
    raised, to be answered with its HTTP status; after it, it is the stream's last event."""
    async with aclosing(events):
        try:
            async for event in events:
                if isinstance(event, Failed) and not serializer.started:
                    raise event.error
                out = serializer.feed(event)
                if out:
                    yield out
        except MoMError:
            raise
        except Exception as exc:  # a bug in the encoding: the stream still ends in OpenAI's shape
            logger.error("stream failed", exc_info=exc, extra=WITH_TRACEBACK)
            error = InternalError("The service failed while answering this request.")
            if not serializer.started:
                raise error from None
            yield serializer.error(error)


async def _after(first: bytes, body: AsyncGenerator[bytes]) -> AsyncGenerator[bytes]:
    async with aclosing(body):
        yield first
        async for out in body:
            yield out
