"""What an API key has spent in its budget's period (the UTC day, or the UTC calendar month), as one replica knows it
(docs/keys.md, "How a budget holds across replicas").

The usage records are the truth: the sum of a key's requests' cost since the period began, read from the database
and cached for MOM_KEY_SPEND_CACHE_SECONDS. To it the replica adds its own requests that sum cannot hold yet: those
in flight at their worst case (reserved when they were admitted), and those finished at their cost until their
records are written (the writer's queue is first in, first out, so a record is in the database once the writer's
count of records written reaches its place in the queue). A replica thus never overshoots on its own requests.

What it cannot see is the other replicas' requests since its last read. Near the budget, when what is left would
pay for fewer than NEAR_BUDGET requests like the one asked for, the cache is not used: the sum is read for each
request, so a replica misses only the requests other replicas have in flight (or finished a moment ago, their
records not written yet). With one request of a key at a time per replica, a budget holds within one request per
replica.
"""

from __future__ import annotations

import logging
import time
from calendar import monthrange
from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, datetime
from decimal import Decimal

from sqlalchemy import func, select
from sqlalchemy.exc import SQLAlchemyError
from sqlalchemy.ext.asyncio import AsyncEngine

from mom_service.usage.keys import Period
from mom_service.usage.money import from_pico
from mom_service.usage.schema import requests_table
from mom_service.usage.writer import UsageWriter

logger = logging.getLogger("mom_service")

NEAR_BUDGET = 10  # fewer requests like this one left in the budget than this: the sum is read for each request
STALE_RESERVATION_S = 3600.0  # a reservation whose request never reported its outcome is dropped after this
COMPACT_AT = 1000  # local entries beyond which the written ones are dropped (their keys' sums read again)
WARN_EVERY_S = 60.0
ZERO = Decimal(0)


class SpendUnavailable(Exception):
    """The database did not answer, and this replica has no sum of the key's spend to go on."""


def period_bounds(period: Period, now_s: float) -> tuple[int, int]:
    """The UTC day or calendar month `now_s` falls in: its start and end, in unix milliseconds."""
    now = datetime.fromtimestamp(now_s, UTC)
    if period == "day":
        start = now.replace(hour=0, minute=0, second=0, microsecond=0)
        length_s = 86_400
    else:
        start = now.replace(day=1, hour=0, minute=0, second=0, microsecond=0)
        length_s = monthrange(now.year, now.month)[1] * 86_400
    start_ms = int(start.timestamp() * 1000)
    return start_ms, start_ms + length_s * 1000


async def spend_between(
    engine: AsyncEngine, key_id: str, start_ms: int, end_ms: int | None = None
) -> tuple[Decimal, int]:
    """A key's recorded spend (USD) and requests since `start_ms` (before `end_ms`)."""
    r = requests_table.c
    conditions = [r.key_id == key_id, r.created_ms >= start_ms]
    if end_ms is not None:
        conditions.append(r.created_ms < end_ms)
    query = select(func.coalesce(func.sum(r.cost_pico), 0), func.count()).where(*conditions)
    async with engine.connect() as conn:
        pico, count = (await conn.execute(query)).one()
    return from_pico(int(pico)) or ZERO, int(count)


@dataclass(slots=True)
class _Local:
    """One of this replica's requests that the database's sum may not hold yet."""

    amount: Decimal  # its worst case while it runs, then its cost
    started_ms: int
    reserved_at: float  # monotonic
    place: int | None = None  # its record's place in the writer's queue, once submitted


@dataclass(frozen=True, slots=True)
class _Sum:
    start_ms: int
    amount: Decimal
    written: int  # the writer's count of records written when it was read: those are in it
    read_at: float  # monotonic


class SpendTracker:
    """Each budgeted key's spend in its period, as this replica knows it (the module's docstring)."""

    def __init__(
        self,
        engine: AsyncEngine,
        writer: UsageWriter,
        ttl_s: float,
        clock: Callable[[], float] = time.time,
        monotonic: Callable[[], float] = time.monotonic,
    ) -> None:
        self._engine = engine
        self._writer = writer
        self._ttl_s = ttl_s
        self._clock = clock
        self._monotonic = monotonic
        self._local: dict[str, dict[str, _Local]] = {}  # key id -> request id -> entry
        self._key_of: dict[str, str] = {}  # request id -> key id
        self._sums: dict[str, _Sum] = {}  # key id -> the database's sum, as last read
        self._warned = float("-inf")

    async def spent(self, key_id: str, start_ms: int, budget: Decimal, worst: Decimal) -> Decimal:
        """What the key spent since `start_ms`, this replica's requests in flight included; the database read
        afresh unless its sum is recent and the budget far (NEAR_BUDGET requests costing `worst` still fit)."""
        known = self._sums.get(key_id)
        if known is not None and known.start_ms == start_ms and self._monotonic() - known.read_at < self._ttl_s:
            total = known.amount + self._local_sum(key_id, start_ms)
            if budget - total - worst >= NEAR_BUDGET * worst:
                return total
        return await self._read(key_id, start_ms) + self._local_sum(key_id, start_ms)

    async def _read(self, key_id: str, start_ms: int) -> Decimal:
        written = self._writer.written  # before the query: every record written so far is in its sum
        try:
            amount, _ = await spend_between(self._engine, key_id, start_ms)
        except (SQLAlchemyError, OSError) as exc:
            return self._stale(key_id, start_ms, exc)
        known = self._sums.get(key_id)
        if known is None or known.start_ms != start_ms or known.written <= written:
            self._sums[key_id] = _Sum(start_ms, amount, written, self._monotonic())
            entries = self._local.get(key_id, {})
            for request_id in [r for r, e in entries.items() if e.place is not None and e.place <= written]:
                del entries[request_id]
        return self._sums[key_id].amount  # a read that began later may have finished first: the newer sum

    def _stale(self, key_id: str, start_ms: int, exc: Exception) -> Decimal:
        """The database did not answer: the last sum read, however old; none: SpendUnavailable."""
        known = self._sums.get(key_id)
        now = self._monotonic()
        if now - self._warned >= WARN_EVERY_S:
            self._warned = now
            why = type(exc).__name__
            logger.warning("key spend: the usage database did not answer (%s); using the last sums read", why)
        if known is None or known.start_ms != start_ms:
            raise SpendUnavailable(type(exc).__name__) from exc
        return known.amount

    async def between(self, key_id: str, start_ms: int, end_ms: int) -> tuple[Decimal, int]:
        """A key's recorded spend and requests in [start, end), read now (for the admin API)."""
        try:
            return await spend_between(self._engine, key_id, start_ms, end_ms)
        except (SQLAlchemyError, OSError) as exc:
            raise SpendUnavailable(type(exc).__name__) from exc

    def _local_sum(self, key_id: str, start_ms: int) -> Decimal:
        entries = self._local.get(key_id, {})
        return sum((e.amount for e in entries.values() if e.started_ms >= start_ms), ZERO)

    def reserve(self, key_id: str, request_id: str, worst: Decimal) -> None:
        """A request admitted: its worst case counts until its outcome is known."""
        now_ms = int(self._clock() * 1000)
        self._local.setdefault(key_id, {})[request_id] = _Local(worst, now_ms, self._monotonic())
        self._key_of[request_id] = key_id

    def settle(self, request_id: str, cost: Decimal | None) -> None:
        """A reserved request's outcome was just submitted to the writer: its cost counts until it is written."""
        key_id = self._key_of.pop(request_id, None)
        entry = self._local.get(key_id, {}).get(request_id) if key_id is not None else None
        if entry is None:
            return
        entry.amount, entry.place = cost or ZERO, self._writer.submitted
        if len(self._key_of) + sum(len(e) for e in self._local.values()) > COMPACT_AT:
            self._compact()

    def release(self, request_id: str) -> None:
        """A reserved request's run ended without an outcome so far (or never started): its worst case no longer
        counts. Its outcome, if one still comes, settles it at its cost."""
        key_id = self._key_of.get(request_id)
        entry = self._local.get(key_id, {}).get(request_id) if key_id is not None else None
        if entry is not None and entry.place is None:
            entry.amount = ZERO

    def _compact(self) -> None:
        """Drop the entries whose records are written (their keys' sums are read again) and the reservations
        whose requests never reported."""
        written, now = self._writer.written, self._monotonic()
        for key_id, entries in list(self._local.items()):
            done = [
                r
                for r, e in entries.items()
                if (e.place is not None and e.place <= written)
                or (e.place is None and now - e.reserved_at > STALE_RESERVATION_S)
            ]
            for request_id in done:
                del entries[request_id]
                self._key_of.pop(request_id, None)
            if done:
                self._sums.pop(key_id, None)
            if not entries:
                del self._local[key_id]
