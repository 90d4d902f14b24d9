"""The hub in Redis, shared by every replica: a run's progress readable on any of them.

Per run (`mom:progress:<id>:`): `owner` (a string: who may read it with a bearer token; its existence says the run
is known), `life` (a list: every lifecycle frame), `deltas` (a list, trimmed to the newest `max_deltas`), and the
channel `mom:progress:<id>` where every frame is published as it comes. Every key expires `ttl_s` after the run's
last frame. A subscriber subscribes to the channel first, then reads both lists (merged by frame number), then
follows the channel, skipping what it has already sent.

Publishing never waits on Redis: frames go into a bounded queue that one background task writes in pipelines.
Redis down or slow is logged (at most once a minute), reported by health, and drops progress frames (counted) for
a few seconds at a time; the answers themselves never notice. Reading answers 503 meanwhile.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections import deque
from collections.abc import AsyncGenerator
from typing import Any

from mom_service.cache.stores import RedisFailures, redis_client
from mom_service.progress.hub import HEARTBEAT_S, Frame, HubUnavailable, Limits, TooManySubscribers, UnknownRun

logger = logging.getLogger("mom_service")

PREFIX = "mom:progress:"
TIMEOUT_S = 2.0  # each Redis operation (a pipeline of frames, a subscription's set-up)
MAX_QUEUE = 10_000  # frames waiting for the writer; beyond, dropped (counted)
BATCH = 500  # frames per pipeline
APPEAR_S = 1.0  # a run not (yet) in Redis: how long a new subscriber waits for it (its first frames in flight)
CLOSE_S = 1.0  # at shutdown, how long the writer gets to send what is queued

Item = tuple[str, str | None, Frame | None]  # (run id, its owner when it opens, a frame)


def _key(run_id: str, part: str) -> str:
    return f"{PREFIX}{run_id}:{part}"


def channel(run_id: str) -> str:
    return PREFIX + run_id


class RedisHub:
    backend = "redis"

    def __init__(self, url: str, limits: Limits) -> None:
        self.limits = limits
        self._client = redis_client(url, TIMEOUT_S)
        self.failures = RedisFailures("progress stream", "progress events are dropped meanwhile")
        self._queue: deque[Item] = deque()
        self._pending = asyncio.Event()
        self._writer: asyncio.Task[None] | None = None
        self._closing = False
        self._subscribers: dict[str, int] = {}  # per run, on this replica
        self.dropped = 0

    # ------------------------------------------------------------------------------------------------ writing

    def open(self, run_id: str, owner: str) -> None:
        self._enqueue((run_id, owner, None))

    def publish(self, run_id: str, frame: Frame) -> None:
        self._enqueue((run_id, None, frame))

    def _enqueue(self, item: Item) -> None:
        if len(self._queue) >= MAX_QUEUE or self.failures.backing_off():
            self.dropped += 1
            return
        self._queue.append(item)
        self._pending.set()
        if self._writer is None:  # started by the first frame, in the running loop
            self._writer = asyncio.create_task(self._write())

    async def _write(self) -> None:
        while not self._closing:
            await self._pending.wait()
            self._pending.clear()
            while self._queue:
                batch = [self._queue.popleft() for _ in range(min(len(self._queue), BATCH))]
                try:
                    async with asyncio.timeout(TIMEOUT_S):
                        await self._send(batch)
                except Exception as exc:
                    self.failures.failed("publishing", exc)
                    self.dropped += len(batch)

    async def _send(self, batch: list[Item]) -> None:
        ttl_ms = max(1, int(self.limits.ttl_s * 1000))
        pipe = self._client.pipeline(transaction=False)
        touched: set[str] = set()
        for run_id, owner, frame in batch:
            if frame is None:
                pipe.set(_key(run_id, "owner"), owner or "", px=ttl_ms)
            else:
                wire = frame.to_wire()
                pipe.rpush(_key(run_id, "deltas" if frame.delta else "life"), wire)
                pipe.publish(channel(run_id), wire)
            touched.add(run_id)
        for run_id in touched:
            pipe.ltrim(_key(run_id, "deltas"), -self.limits.max_deltas, -1)
            for part in ("owner", "life", "deltas"):
                pipe.pexpire(_key(run_id, part), ttl_ms)
        await pipe.execute()

    # ------------------------------------------------------------------------------------------------ reading

    async def subscribe(self, run_id: str, owner: str | None) -> _RedisSubscription:
        if self._subscribers.get(run_id, 0) >= self.limits.max_subscribers:
            raise TooManySubscribers(run_id)
        pubsub = self._client.pubsub()
        try:
            async with asyncio.timeout(TIMEOUT_S + APPEAR_S):
                await pubsub.subscribe(channel(run_id))
                known = await self._owner(run_id)
        except Exception as exc:
            await _close(pubsub)
            self.failures.failed("subscribing", exc)
            raise HubUnavailable(run_id) from None
        if known is None or (owner is not None and owner != known):
            await _close(pubsub)
            raise UnknownRun(run_id)
        self._subscribers[run_id] = self._subscribers.get(run_id, 0) + 1
        return _RedisSubscription(self, run_id, pubsub)

    async def _owner(self, run_id: str) -> str | None:
        """The run's owner; a run not known yet is waited for a moment (its first frames may be on their way)."""
        loop = asyncio.get_running_loop()
        until = loop.time() + APPEAR_S
        while True:
            found = await self._client.get(_key(run_id, "owner"))
            if found is not None or loop.time() >= until:
                return found.decode() if found is not None else None
            await asyncio.sleep(0.1)

    async def backlog(self, run_id: str) -> list[Frame]:
        pipe = self._client.pipeline(transaction=False)
        pipe.lrange(_key(run_id, "life"), 0, -1)
        pipe.lrange(_key(run_id, "deltas"), 0, -1)
        async with asyncio.timeout(TIMEOUT_S):
            life, deltas = await pipe.execute()
        return sorted((Frame.from_wire(raw) for raw in (*life, *deltas)), key=lambda f: f.seq)

    async def known(self, run_id: str) -> bool:
        async with asyncio.timeout(TIMEOUT_S):
            return bool(await self._client.exists(_key(run_id, "owner")))

    def left(self, run_id: str) -> None:
        count = self._subscribers.get(run_id, 0) - 1
        if count > 0:
            self._subscribers[run_id] = count
        else:
            self._subscribers.pop(run_id, None)

    # ------------------------------------------------------------------------------------------------- health

    async def check(self) -> tuple[dict[str, Any], str | None]:
        details: dict[str, Any] = {"backend": self.backend, "dropped": self.dropped, "queued": len(self._queue)}
        try:
            async with asyncio.timeout(TIMEOUT_S):
                await self._client.ping()
        except Exception as exc:
            self.failures.failed("ping", exc)
            return details, f"no answer within {TIMEOUT_S:g} s" if isinstance(exc, TimeoutError) else "unreachable"
        return details, "errors in the last 30 s" if self.failures.recent else None

    async def close(self) -> None:
        if self._writer is not None:  # what is queued is written (for a moment at most), then the writer ends
            self._closing = True
            self._pending.set()
            done, _ = await asyncio.wait({self._writer}, timeout=CLOSE_S)
            if not done:
                self._writer.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await self._writer
        await _close(self._client)


async def _close(closable: Any) -> None:
    try:
        await closable.aclose()
    except Exception as exc:  # a connection to a dead Redis
        logger.debug("closing a progress connection: %s", type(exc).__name__)


class _RedisSubscription:
    def __init__(self, hub: RedisHub, run_id: str, pubsub: Any) -> None:
        self._hub, self._id, self._pubsub = hub, run_id, pubsub
        self._closed = False

    async def frames(self, after: int) -> AsyncGenerator[Frame | None]:
        """The stored frames, then the channel's; the subscription was made before the lists were read, so that
        nothing falls between them (what both gave is sent once). A Redis failure ends the stream."""
        seen = after
        try:
            backlog = await self._hub.backlog(self._id)
            for frame in backlog:
                if frame.seq > seen:
                    seen = frame.seq
                    yield frame
                    if frame.final:
                        return
            if any(frame.final for frame in backlog):  # (its final frame was at or before `after`)
                return
            if seen == after:
                yield None
            while True:
                message = await self._pubsub.get_message(ignore_subscribe_messages=True, timeout=HEARTBEAT_S)
                if message is None:
                    if not await self._hub.known(self._id):  # expired meanwhile (its replica went away)
                        return
                    yield None
                    continue
                frame = Frame.from_wire(message["data"])
                if frame.seq > seen:
                    seen = frame.seq
                    yield frame
                    if frame.final:
                        return
        except Exception as exc:
            self._hub.failures.failed("reading", exc)

    async def close(self) -> None:
        if not self._closed:
            self._closed = True
            self._hub.left(self._id)
            await _close(self._pubsub)
