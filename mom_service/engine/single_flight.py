"""Single flight: identical requests in flight at the same time share one fan-out.

The first request's engine run is pumped by a task of its own into a `Flight`; that request and every identical
one arriving before it ends follow the same events, each from the start. The run is cancelled (its upstream calls
closed) only when every follower has left before its final event; after it, the run finishes its work (storing
the answer in the cache) whoever is still there.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncGenerator, Callable
from contextlib import aclosing

from mom_service.engine.events import Completed, Event, Failed


class Flights:
    """The runs in flight: by cache key (those identical requests may join), and every pump task, referenced
    until it ends. One per app (a reloaded config's engine takes over the one before it): no state at module level."""

    def __init__(self) -> None:
        self._by_key: dict[str, Flight] = {}
        self._pumps: set[asyncio.Task[None]] = set()

    def get(self, key: str) -> Flight | None:
        return self._by_key.get(key)

    def start(self, source: AsyncGenerator[Event], key: str | None = None) -> Flight:
        """A flight pumping `source`; under `key` (until it ends) when identical requests may join it."""
        flight = Flight(source, self._pumps, on_done=None if key is None else lambda: self._land(key, flight))
        if key is not None:
            self._by_key[key] = flight
        return flight

    def _land(self, key: str, flight: Flight) -> None:
        if self._by_key.get(key) is flight:
            del self._by_key[key]


class Flight:
    def __init__(
        self,
        source: AsyncGenerator[Event],
        pumps: set[asyncio.Task[None]],
        on_done: Callable[[], None] | None = None,
    ) -> None:
        self.events: list[Event] = []
        self.finished = False  # the run has ended
        self.concluded = False  # its final event (Completed or Failed) is out
        self._followers = 0
        self._changed = asyncio.Event()
        self._on_done = on_done
        self._task = asyncio.create_task(self._pump(source))
        pumps.add(self._task)
        self._task.add_done_callback(pumps.discard)

    async def _pump(self, source: AsyncGenerator[Event]) -> None:
        try:
            async with aclosing(source):
                async for event in source:
                    self.events.append(event)
                    if isinstance(event, Completed | Failed):
                        self.concluded = True
                    self._wake()
        finally:
            self.finished = True
            self._wake()
            if self._on_done is not None:
                self._on_done()

    def _wake(self) -> None:
        self._changed.set()
        self._changed = asyncio.Event()

    async def follow(self) -> AsyncGenerator[Event]:
        """Every event of the run, from the first, up to its final event."""
        self._followers += 1
        seen = 0
        try:
            while True:
                while seen < len(self.events):
                    event = self.events[seen]
                    seen += 1
                    yield event
                    if isinstance(event, Completed | Failed):
                        return
                if self.finished:
                    return
                await self._changed.wait()
        finally:
            self._followers -= 1
            if self._followers == 0 and not self.concluded:
                self._task.cancel()  # nobody waits for this answer any more: its upstream calls are closed
