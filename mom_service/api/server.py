"""Graceful shutdown for `mom-service serve`: on SIGTERM (or Ctrl-C), drain first, then stop.

1. The first signal starts the drain: readiness answers 503, new chat requests are refused with 503
   `shutting_down` (and `Connection: close`), the listening socket stays open so load balancers see the 503s.
2. Answers in flight keep streaming until they are all done, or the grace period (`MOM_SHUTDOWN_GRACE_SECONDS`,
   default 20 s) has passed.
3. Answers still running then are cut off: a stream ends with an error event, a wait is answered 500; both say
   `cut_off_by_shutdown` (not 503 `shutting_down`: their LLM calls are already paid for, and a load balancer
   retries a 503 on another replica). Then uvicorn's own shutdown: the socket closes, what is still running is
   cancelled (its usage records say so), and the lifespan flushes the usage records and traces. The process exits 0.

A second signal skips the wait (a second Ctrl-C forces the exit, as uvicorn does).
"""

from __future__ import annotations

import asyncio
import logging
import socket
from types import FrameType

import uvicorn
from fastapi import FastAPI

from mom_service.api.admission import Admission
from mom_service.observability.logs import LOGGER_NAME

logger = logging.getLogger(LOGGER_NAME)

# After the drain, uvicorn waits this long for the last bytes of finished answers before it cancels the rest.
AFTER_DRAIN_S = 1


class DrainingServer(uvicorn.Server):
    """uvicorn's server, with a drain phase between the first signal and uvicorn's own shutdown."""

    def __init__(self, config: uvicorn.Config, app: FastAPI, grace_s: float) -> None:
        config.timeout_graceful_shutdown = AFTER_DRAIN_S
        super().__init__(config)
        self._app = app
        self._grace_s = grace_s
        self._drain: asyncio.Task[None] | None = None
        self._loop: asyncio.AbstractEventLoop | None = None

    async def serve(self, sockets: list[socket.socket] | None = None) -> None:
        self._loop = asyncio.get_running_loop()
        await super().serve(sockets)

    def _admission(self) -> Admission | None:
        admission = getattr(getattr(self._app.state, "mom", None), "admission", None)
        return admission if isinstance(admission, Admission) else None

    def handle_exit(self, sig: int, frame: FrameType | None) -> None:
        admission = self._admission()
        if admission is None or admission.draining or self.should_exit or self._loop is None:
            # not started yet, or a second signal: stop now (answers still running end with an error event)
            if admission is not None and self._loop is not None:
                self._loop.call_soon_threadsafe(admission.cut_off.set)
            super().handle_exit(sig, frame)
            return
        admission.draining = True  # from this instant: readiness 503, new chat requests 503
        self._loop.call_soon_threadsafe(self._start_drain, admission)

    def _start_drain(self, admission: Admission) -> None:
        if self._drain is None:
            self._drain = asyncio.ensure_future(self._drain_then_exit(admission))

    async def _drain_then_exit(self, admission: Admission) -> None:
        if admission.in_flight:
            logger.info(
                "Shutting down: not taking new requests; waiting up to %g s for %d answer(s) in flight",
                self._grace_s,
                admission.in_flight.count,
            )
        if not await admission.in_flight.wait_idle(self._grace_s):
            logger.warning(
                "Grace period of %g s over: ending %d answer(s) still in flight with a cut_off_by_shutdown error",
                self._grace_s,
                admission.in_flight.count,
            )
            admission.cut_off.set()
            await admission.in_flight.wait_idle(AFTER_DRAIN_S)
        self.should_exit = True
