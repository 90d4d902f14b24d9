"""Admission to the chat endpoint: a limit on requests in flight, and draining at shutdown.

`AdmissionControl` (pure ASGI middleware) counts chat requests from their arrival until their response (a whole
stream included) has been sent. Beyond `MOM_MAX_IN_FLIGHT` a request is answered 429 `over_capacity` at once, and
while the service drains for a shutdown, 503 `shutting_down`; both with `Retry-After`, both before the body is read,
so before any upstream call: safe to send elsewhere. An answer still running when the grace period ends is not
refused but cut off (`Admission.cut_off_error`): 500 `cut_off_by_shutdown`, since its LLM calls are already paid for.
Health, metrics and the other endpoints are never refused: a loaded or stopping service still answers its probes.

The per-minute rate limits are counted after authentication (api/auth.py's `RateLimitedToken`, rate_limits.py);
their headers, which that dependency leaves on the request's state, are added here to whatever the answer is.
"""

from __future__ import annotations

import asyncio

from starlette.types import ASGIApp, Receive, Scope, Send

from mom_service.api.errors import scope_error_response
from mom_service.engine.inflight import InFlight
from mom_service.errors import CutOffByShutdown, MoMError, RateLimited, ServiceUnavailable
from mom_service.observability.metrics import Metrics
from mom_service.observability.request_log import ANSWER_PATHS

OVER_CAPACITY_RETRY_S = 1
SHUTTING_DOWN_RETRY_S = 1


class Admission:
    """The chat endpoint's gate. One per app; `in_flight` is what the shutdown waits for."""

    def __init__(self, max_in_flight: int) -> None:
        self.max_in_flight = max_in_flight
        self.in_flight = InFlight()  # chat requests from arrival until their response is sent
        self.draining = False  # shutting down: readiness 503, new chat requests 503
        self.cut_off = asyncio.Event()  # the grace period is over: answers still running end now, with an error

    @staticmethod
    def shutting_down() -> ServiceUnavailable:
        return ServiceUnavailable(
            "The service is shutting down; retry the request (another replica will answer it).",
            code="shutting_down",
            headers={"Retry-After": str(SHUTTING_DOWN_RETRY_S), "Connection": "close"},
        )

    @staticmethod
    def cut_off_error() -> CutOffByShutdown:
        """For an answer still running when the grace period ends: not a 503, which would invite a retry elsewhere."""
        return CutOffByShutdown(
            "The answer was ended by the service's shutdown before it was complete. The LLM calls it made so far are "
            "paid for; sending the request again runs them again.",
            headers={"Connection": "close"},
        )

    def refusal(self) -> MoMError | None:
        """Why a new chat request cannot start now, or None when it can."""
        if self.draining:
            return self.shutting_down()
        if self.in_flight.count >= self.max_in_flight:
            return RateLimited(
                f"The service is answering its limit of {self.max_in_flight} requests at once; retry shortly.",
                code="over_capacity",
                headers={"Retry-After": str(OVER_CAPACITY_RETRY_S)},
            )
        return None


class AdmissionControl:
    """Pure ASGI middleware: admit chat requests (or refuse them) and count them while they are answered."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        state = getattr(getattr(scope.get("app"), "state", None), "mom", None)
        admission = getattr(state, "admission", None)
        chat = scope["type"] == "http" and scope["method"] == "POST" and scope["path"] in ANSWER_PATHS
        if not chat or not isinstance(admission, Admission):
            await self.app(scope, receive, send)
            return
        refusal = admission.refusal()
        if refusal is not None:
            await scope_error_response(refusal, scope)(scope, receive, send)
            return
        metrics = getattr(state, "metrics", None)
        admission.in_flight.enter()
        try:
            if isinstance(metrics, Metrics):
                with metrics.counting_in_flight():
                    await self.app(scope, receive, send)
            else:
                await self.app(scope, receive, send)
        finally:
            admission.in_flight.leave()
