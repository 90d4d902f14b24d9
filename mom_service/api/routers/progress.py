"""`GET /v1/progress/{id}`: a run's progress stream as SSE (docs/progress.md): what happened so far, then what
happens, up to `run_done` or `run_failed`.

Read with the bearer token (the runs of that token's caller), or with the run's link token (`?token=`, the one
`X-MoM-Progress-Url` carries: that run only, whoever's it is; what a browser's EventSource, which sends no headers,
uses). A reconnecting client's `Last-Event-ID` resumes after that event; a run that had ended there answers 204,
which tells an EventSource to stop reconnecting.
"""

from __future__ import annotations

import re
from collections.abc import AsyncGenerator
from typing import Annotated

from fastapi import APIRouter, Header, Query, Request
from fastapi.responses import Response

from mom_service.api.auth import presented_token, require_caller
from mom_service.api.state import AppState, StateDep
from mom_service.api.streaming import SSEResponse
from mom_service.errors import AuthenticationFailed, NotFound, RateLimited, ServiceUnavailable
from mom_service.progress.hub import Frame, HubUnavailable, Subscription, TooManySubscribers, UnknownRun

router = APIRouter(prefix="/v1")

RUN_ID = re.compile(r"[A-Za-z0-9-]{1,64}")
HEARTBEAT = b": keep-alive\n\n"
RETRY_AFTER_S = 5  # a run with its most subscribers: when to try again


class _End:
    """The subscription's frames have ended."""


END = _End()


@router.get("/progress/{run_id}")
async def progress(
    request: Request,
    run_id: str,
    state: StateDep,
    token: Annotated[str | None, Query(max_length=128)] = None,
    last_event_id: Annotated[str | None, Header(max_length=32)] = None,
) -> Response:
    owner = await _reader(request, state, run_id, token)
    if not RUN_ID.fullmatch(run_id):
        raise _not_found(state, run_id)
    try:
        subscription = await state.progress.subscribe(run_id, owner)
    except UnknownRun:
        raise _not_found(state, run_id) from None
    except TooManySubscribers:
        limit = state.settings.mom_progress_max_subscribers
        raise RateLimited(
            f"Run '{run_id}' has {limit} progress subscribers already (MOM_PROGRESS_MAX_SUBSCRIBERS).",
            code="too_many_subscribers",
            headers={"Retry-After": str(RETRY_AFTER_S)},
        ) from None
    except HubUnavailable:
        raise ServiceUnavailable(
            "The progress stream is unavailable: its store does not answer.", code="progress_unavailable"
        ) from None
    frames = subscription.frames(_resumed_after(last_event_id))
    first = await anext(frames, END)
    if isinstance(first, _End):  # the run had ended at Last-Event-ID: nothing more will come
        await frames.aclose()
        await subscription.close()
        return Response(status_code=204)
    return SSEResponse(_stream(subscription, frames, first), state.admission.cut_off)


async def _reader(request: Request, state: AppState, run_id: str, token: str | None) -> str | None:
    """Whose runs the request may read: its bearer token's caller; None (any run's owner) when it shows this run's
    link token. 401 for a wrong token of either kind, or none."""
    if not state.settings.api_tokens or presented_token(request):
        return (await require_caller(request, state)).id  # (503 when the service has no token at all)
    if token is None:
        raise AuthenticationFailed(
            "Missing token: send 'Authorization: Bearer <API_TOKEN>', or the run's link token as '?token=' (the "
            "X-MoM-Progress-Url header of its answer).",
            headers={"WWW-Authenticate": "Bearer"},
        )
    if not state.links.verify(run_id, token):
        raise AuthenticationFailed("This link token is not valid for this run.", code="invalid_link_token")
    return None


def _not_found(state: AppState, run_id: str) -> NotFound:
    ttl = state.settings.mom_progress_ttl_seconds
    return NotFound(
        f"No run '{run_id[:64]}' to follow here: unknown, or over for more than {ttl:g} s.", code="run_not_found"
    )


def _resumed_after(last_event_id: str | None) -> int:
    """The last event a reconnecting client saw (0: none, or an id that is not ours)."""
    return int(last_event_id) if last_event_id is not None and last_event_id.isdigit() else 0


async def _stream(
    subscription: Subscription, frames: AsyncGenerator[Frame | None], first: Frame | None
) -> AsyncGenerator[bytes]:
    try:
        item: Frame | _End | None = first
        while not isinstance(item, _End):
            yield HEARTBEAT if item is None else item.sse
            item = await anext(frames, END)
    finally:
        await frames.aclose()
        await subscription.close()
