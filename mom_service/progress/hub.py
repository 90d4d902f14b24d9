"""Progress frames, the hub's protocol, and the hub in process.

A run's frames are numbered from 1 (the SSE `id`). Lifecycle frames (run_started, member_done, ...) are always
kept; deltas (member_delta, concluding_delta) are kept up to `max_deltas` per run, the oldest dropped first (the
whole texts are in member_done and run_done). A run is forgotten `ttl_s` after its last frame; in process, at most
`max_runs` runs are kept (the least recently active forgotten first). Each run takes at most `max_subscribers`
subscribers (per replica).

Publishing is synchronous and cheap (an append and a wake-up): it never waits and never fails an answer.
"""

from __future__ import annotations

import asyncio
import bisect
import time
from collections import OrderedDict
from collections.abc import AsyncGenerator, Callable
from dataclasses import dataclass, field
from typing import Any, Protocol

FINAL = frozenset({"run_done", "run_failed"})
DELTAS = frozenset({"member_delta", "concluding_delta"})
HEARTBEAT_S = 15.0  # a subscriber with nothing new gets a heartbeat this often (None from `frames`)


@dataclass(frozen=True, slots=True)
class Frame:
    """One progress event, encoded once as its SSE frame (`id`, `event`, `data` lines)."""

    seq: int
    kind: str
    sse: bytes

    @classmethod
    def of(cls, seq: int, kind: str, data: bytes) -> Frame:
        return cls(seq, kind, b"id: %d\nevent: %s\ndata: %s\n\n" % (seq, kind.encode(), data))

    @property
    def final(self) -> bool:
        return self.kind in FINAL

    @property
    def delta(self) -> bool:
        return self.kind in DELTAS

    def to_wire(self) -> bytes:
        """As stored and published in Redis: `<seq> <kind> <sse>`."""
        return b"%d %s %s" % (self.seq, self.kind.encode(), self.sse)

    @classmethod
    def from_wire(cls, raw: bytes) -> Frame:
        seq, kind, sse = raw.split(b" ", 2)
        return cls(int(seq), kind.decode(), sse)


@dataclass(frozen=True, slots=True)
class Limits:
    ttl_s: float = 600.0
    max_deltas: int = 1000
    max_subscribers: int = 8
    max_runs: int = 1000  # in process only (Redis: the TTL and Redis' own maxmemory)


class UnknownRun(Exception):
    """No such run here: never started, expired, or another caller's."""


class TooManySubscribers(Exception):
    """The run has its most subscribers already."""


class HubUnavailable(Exception):
    """The hub's store (Redis) does not answer."""


class Subscription(Protocol):
    def frames(self, after: int) -> AsyncGenerator[Frame | None]:
        """The run's frames numbered above `after`, then its new ones as they come, up to its final frame (or
        until the run is forgotten). None when it has caught up without a frame to give first, and whenever there
        was nothing new for a heartbeat's time. Nothing at all when the run had ended at `after`."""
        ...

    async def close(self) -> None: ...


class ProgressHub(Protocol):
    backend: str

    def open(self, run_id: str, owner: str) -> None:
        """A run begins; `owner` (the caller's identity) may read it with its bearer token."""

    def publish(self, run_id: str, frame: Frame) -> None:
        """A frame of a run: kept, and handed to its subscribers. Never waits, never raises."""

    async def subscribe(self, run_id: str, owner: str | None) -> Subscription:
        """A subscription to a run (`owner` None: the run's link token was shown, any owner's run will do).
        Raises UnknownRun, TooManySubscribers or HubUnavailable."""
        ...

    async def check(self) -> tuple[dict[str, Any], str | None]:
        """Details for /health/detailed, and None when healthy, else a short reason."""
        ...

    async def close(self) -> None: ...


@dataclass(slots=True, eq=False)
class _Run:
    owner: str
    expires: float
    frames: list[Frame] = field(default_factory=list)
    ended: bool = False  # its final frame is kept
    deltas: int = 0
    subscribers: int = 0
    changed: asyncio.Event = field(default_factory=asyncio.Event)

    def wake(self) -> None:
        self.changed.set()
        self.changed = asyncio.Event()

    def keep(self, frame: Frame, max_deltas: int) -> None:
        self.frames.append(frame)
        self.ended = self.ended or frame.final
        if frame.delta:
            self.deltas += 1
            if self.deltas > max_deltas:  # the oldest delta goes (they follow the first few lifecycle frames)
                del self.frames[next(i for i, f in enumerate(self.frames) if f.delta)]
                self.deltas -= 1
        self.wake()


class MemoryHub:
    """The hub in process: a bounded buffer per run, subscribers reading it from where they are."""

    backend = "memory"

    def __init__(self, limits: Limits, clock: Callable[[], float] = time.monotonic) -> None:
        self.limits = limits
        self._clock = clock
        self._runs: OrderedDict[str, _Run] = OrderedDict()  # least recently active first

    def __len__(self) -> int:
        return len(self._runs)

    def open(self, run_id: str, owner: str) -> None:
        self._sweep()
        self._runs[run_id] = _Run(owner, self._clock() + self.limits.ttl_s)
        self._runs.move_to_end(run_id)
        while len(self._runs) > self.limits.max_runs:
            _, oldest = self._runs.popitem(last=False)
            oldest.wake()  # its subscribers end

    def publish(self, run_id: str, frame: Frame) -> None:
        run = self._runs.get(run_id)
        if run is None:  # forgotten (expired, or pushed out by newer runs)
            return
        run.expires = self._clock() + self.limits.ttl_s
        self._runs.move_to_end(run_id)
        run.keep(frame, self.limits.max_deltas)

    def _sweep(self) -> None:
        now = self._clock()
        while self._runs:
            run_id, run = next(iter(self._runs.items()))
            if run.expires > now:
                return
            del self._runs[run_id]
            run.wake()

    def live(self, run_id: str) -> _Run | None:
        self._sweep()
        return self._runs.get(run_id)

    async def subscribe(self, run_id: str, owner: str | None) -> Subscription:
        run = self.live(run_id)
        if run is None or (owner is not None and owner != run.owner):
            raise UnknownRun(run_id)
        if run.subscribers >= self.limits.max_subscribers:
            raise TooManySubscribers(run_id)
        run.subscribers += 1
        return _MemorySubscription(self, run_id, run)

    async def check(self) -> tuple[dict[str, Any], str | None]:
        self._sweep()
        return {"backend": self.backend, "runs": len(self._runs), "max_runs": self.limits.max_runs}, None

    async def close(self) -> None:
        for run in self._runs.values():
            run.wake()
        self._runs.clear()


class _MemorySubscription:
    def __init__(self, hub: MemoryHub, run_id: str, run: _Run) -> None:
        self._hub, self._id, self._run = hub, run_id, run
        self._closed = False

    async def frames(self, after: int) -> AsyncGenerator[Frame | None]:
        run, seen, first = self._run, after, True
        while self._hub.live(self._id) is run:
            changed = run.changed  # taken before reading: a frame kept while we yield wakes the wait below
            start = bisect.bisect_right(run.frames, seen, key=lambda f: f.seq)
            for frame in run.frames[start:]:
                seen, first = frame.seq, False
                yield frame
                if frame.final:
                    return
            if run.ended and run.frames[-1].seq <= seen:  # (its final frame was at or before `after`)
                return
            if first:
                first = False
                yield None
                continue
            try:
                await asyncio.wait_for(changed.wait(), HEARTBEAT_S)
            except TimeoutError:
                yield None

    async def close(self) -> None:
        if not self._closed:
            self._closed = True
            self._run.subscribers -= 1
