"""The queued writer: records never delay an answer; they are committed in batches by one background task, kept and
retried while the database does not answer, and drained at shutdown."""

from __future__ import annotations

import asyncio
import contextlib
import logging

import anyio
from sqlalchemy.dialects import postgresql, sqlite
from sqlalchemy.ext.asyncio import AsyncEngine

from mom_service.engine.events import RequestOutcome
from mom_service.usage.records import Batch, rows_for
from mom_service.usage.schema import SCHEMA_VERSION, calls_table, migrate, requests_table

logger = logging.getLogger("mom_service")


class UsageWriter:
    """A bounded queue and one background task that commits records in batches.

    `submit` never waits: a full queue drops the record, counts it and logs it. A flush that fails or is
    cancelled keeps its rows and tries again; `close` drains everything before the process exits.
    """

    def __init__(self, engine: AsyncEngine, *, max_queue: int = 10_000, batch_size: int = 500) -> None:
        self.engine = engine
        self.batch_size = batch_size
        self.queue: asyncio.Queue[Batch] = asyncio.Queue(max_queue)
        self.dropped = 0
        self.submitted = 0  # records queued so far: the last one's place in the queue (first in, first out)
        self.written = 0  # records committed so far: every record whose place is at most this is in the database
        self.schema_ready = False  # set once migrations ran; until then each flush tries them first
        self._pending: list[Batch] = []
        self._task: asyncio.Task[None] | None = None
        self._flushing: asyncio.Task[None] | None = None  # the background task's commit in progress
        self._insert = postgresql.insert if engine.dialect.name == "postgresql" else sqlite.insert

    def submit(self, outcome: RequestOutcome) -> None:
        try:
            self.queue.put_nowait(rows_for(outcome))
            self.submitted += 1
        except asyncio.QueueFull:
            self.dropped += 1
            if self.dropped == 1 or self.dropped % 100 == 0:
                logger.error(
                    "usage queue full (%d records waiting): record of request %s dropped (%d dropped so far)",
                    self.queue.qsize(),
                    outcome.request_id,
                    self.dropped,
                )

    @property
    def depth(self) -> int:
        return self.queue.qsize() + len(self._pending)

    def start(self) -> None:
        self._task = asyncio.create_task(self._run(), name="usage-writer")

    async def _run(self) -> None:
        backoff = 0.5
        while True:
            if not self._pending:
                self._pending.append(await self.queue.get())
            self._take_waiting()
            try:
                # shielded: cancelling the task (close) never cuts a commit in the middle; close waits for it
                self._flushing = asyncio.ensure_future(self._flush())
                await asyncio.shield(self._flushing)
                backoff = 0.5
            except asyncio.CancelledError:
                raise
            except Exception as exc:
                logger.error(
                    "usage database write failed (%s); %d records kept, retrying in %.1f s",
                    type(exc).__name__,
                    len(self._pending),
                    backoff,
                )
                await asyncio.sleep(backoff)
                backoff = min(backoff * 2, 30.0)

    def _take_waiting(self) -> None:
        while len(self._pending) < self.batch_size:
            try:
                self._pending.append(self.queue.get_nowait())
            except asyncio.QueueEmpty:
                return

    async def _flush(self) -> None:
        """Commit the pending batch in one transaction; on any failure the rows stay pending."""
        batch = self._pending[: self.batch_size]
        if not batch:
            return
        if not self.schema_ready:
            await migrate(self.engine)
            self.schema_ready = True
            logger.info("usage database answers again: schema version %d", SCHEMA_VERSION)
        requests = [request for request, _ in batch]
        calls = [call for _, rows in batch for call in rows]
        async with self.engine.begin() as conn:
            await conn.execute(self._insert(requests_table).on_conflict_do_nothing(), requests)
            if calls:
                await conn.execute(self._insert(calls_table).on_conflict_do_nothing(), calls)
        del self._pending[: len(batch)]
        self.written += len(batch)

    async def close(self, drain_seconds: float = 15.0) -> None:
        """Stop the background task (its commit in progress ends first), then write every record still queued or
        pending, within `drain_seconds` in all."""
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
            self._task = None
        with anyio.CancelScope(shield=True), anyio.move_on_after(drain_seconds) as scope:
            if self._flushing is not None:  # a failed commit keeps its rows pending: the drain retries them
                await asyncio.wait({self._flushing})
            while self._pending or not self.queue.empty():
                self._take_waiting()
                try:
                    await self._flush()
                except Exception as exc:
                    logger.error("usage database write failed at shutdown (%s); retrying", type(exc).__name__)
                    await asyncio.sleep(0.5)
        if self._flushing is not None and not self._flushing.done():  # the deadline passed during that commit
            self._flushing.cancel()
        if scope.cancelled_caught:
            logger.error("usage records not written at shutdown: %d (the database did not answer)", self.depth)
