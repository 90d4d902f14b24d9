"""The live calls of `/health/detailed?check_llm=true`: billed, so made at most once a minute, and shared.

Kept apart from health.py so the app's state can own one `LiveChecks` without importing the checks themselves.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable, Coroutine, Mapping
from dataclasses import dataclass
from typing import Any

# `check_llm=true` makes a billed call to every LLM: its results are reused for this long.
LLM_CHECK_REUSE_S = 60.0


@dataclass(frozen=True, slots=True)
class Ping:
    """One live single-token call: how long it took, and why it failed (None when it answered)."""

    latency_ms: float
    error: str | None


@dataclass(frozen=True, slots=True)
class PingRun:
    """One round of live calls, one to each LLM whose key is there, all at once."""

    started_at: float  # time.time() when the calls began
    started: float  # time.monotonic() then
    pings: Mapping[str, Ping]  # by LLM name

    def age_s(self) -> float:
        return time.monotonic() - self.started


class LiveChecks:
    """The billed calls of `check_llm=true`, made at most once per `reuse_s`.

    A report within `reuse_s` of the last run reuses its results (each LLM says how old they are); reports asked
    for while a run is in flight wait for that run rather than starting their own. The run is shielded: a report
    whose client leaves does not cancel the calls the others are waiting for.
    """

    def __init__(self, reuse_s: float = LLM_CHECK_REUSE_S) -> None:
        self.reuse_s = reuse_s
        self._last: PingRun | None = None
        self._running: asyncio.Task[PingRun] | None = None
        self._stale: set[asyncio.Task[PingRun]] = set()  # runs started before `forget`: their results not kept

    def forget(self) -> None:
        """The LLMs changed (a config reload): the next report calls them anew."""
        self._last = None
        if self._running is not None:
            self._stale.add(self._running)
            self._running = None

    async def results(self, run: Callable[[], Coroutine[Any, Any, PingRun]]) -> PingRun:
        """The last run's results while they are recent, else those of the run in flight, else of a new one."""
        if self._last is not None and self._last.age_s() < self.reuse_s:
            return self._last
        if self._running is None:
            self._running = asyncio.ensure_future(run())
            self._running.add_done_callback(self._finished)
        return await asyncio.shield(self._running)

    def _finished(self, task: asyncio.Task[PingRun]) -> None:
        if task in self._stale:
            self._stale.discard(task)
            return
        self._running = None
        if not task.cancelled() and task.exception() is None:
            self._last = task.result()
