"""Per-minute limits on requests and tokens (docs/keys.md), counted by the `limits` library: in Redis when REDIS_URL is
set, so that every replica shares them, else (and while Redis does not answer) in this replica's memory.

Requests (RPM): a moving window. In Redis each request is counted by one atomic script (`limits`' own Lua), one
round trip, so two replicas together allow exactly the limit in any minute; the headers' figures are read after it.
Tokens (TPM): a sliding window counter (two per-minute counters, the previous one weighted by how much of it still
overlaps the last minute: constant memory, however many tokens). A request is admitted while its caller's tokens
in the last minute are under the limit; once it has ended, the tokens its calls used (prompt and completion, every
call, as recorded) are added, at most up to the limit. A request therefore never starts past the limit, and the
minute in which one ends may hold up to that request's tokens more than the window shows.

Redis down or slow (MOM_RATE_LIMIT_TIMEOUT_MS per operation): the limits are counted per replica for BACK_OFF_S,
then Redis is tried again; logged once when it happens and once when Redis answers again, and shown in
/health/detailed. Never a failed answer.
"""

from __future__ import annotations

import asyncio
import logging
import math
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any, Literal, TypeVar

from limits import RateLimitItemPerMinute
from limits.aio.storage import MemoryStorage, RedisStorage, Storage
from limits.aio.strategies import MovingWindowRateLimiter, SlidingWindowCounterRateLimiter

from mom_service.errors import RateLimited

logger = logging.getLogger("mom_service")

BACK_OFF_S = 5.0  # after a Redis failure, limits are counted per replica this long before Redis is tried again
KEY_PREFIX = "mom:limits"
T = TypeVar("T")
Backend = Literal["redis", "per_replica"]


@dataclass(frozen=True, slots=True)
class Limits:
    """A caller's per-minute limits (None: no limit)."""

    rpm: int | None = None
    tpm: int | None = None


@dataclass(frozen=True, slots=True)
class _Counters:
    requests: MovingWindowRateLimiter
    tokens: SlidingWindowCounterRateLimiter

    @classmethod
    def on(cls, storage: Storage) -> _Counters:
        return cls(MovingWindowRateLimiter(storage), SlidingWindowCounterRateLimiter(storage))


def _reset_s(reset_time: float) -> int:
    return max(1, math.ceil(reset_time - time.time()))


def _headers(kind: str, limit: int, remaining: int, reset_s: int) -> dict[str, str]:
    """OpenAI's rate-limit headers for requests or tokens."""
    return {
        f"x-ratelimit-limit-{kind}": str(limit),
        f"x-ratelimit-remaining-{kind}": str(max(0, remaining)),
        f"x-ratelimit-reset-{kind}": f"{reset_s}s",
    }


def _refuse(limit: str, noun: str, headers: dict[str, str], retry_after: int) -> None:
    raise RateLimited(
        f"Rate limit reached: {limit} for this {noun}. Retry in {retry_after} s.",
        headers={"Retry-After": str(retry_after), **headers},
    )


class RateLimits:
    """The per-minute counters of every caller, shared through Redis when it is configured and answers."""

    def __init__(self, redis_url: str | None, timeout_s: float) -> None:
        self._local = _Counters.on(MemoryStorage())
        self._shared: _Counters | None = None
        self._storage: RedisStorage | None = None
        if redis_url:
            self._storage = RedisStorage(
                "async+" + redis_url,
                implementation="redispy",
                wrap_exceptions=True,
                key_prefix=KEY_PREFIX,
                socket_timeout=timeout_s,
                socket_connect_timeout=timeout_s,
            )
            self._shared = _Counters.on(self._storage)
        self._timeout_s = timeout_s
        self._skip_until = float("-inf")
        self._failure: str | None = None  # why the limits are per replica now, while Redis does not answer

    @property
    def backend(self) -> Backend:
        return "redis" if self._shared is not None and self._failure is None else "per_replica"

    @property
    def reason(self) -> str | None:
        """Why the limits are counted per replica (None: they are shared)."""
        if self._shared is None:
            return "REDIS_URL is not set"
        return self._failure

    async def admit(self, who: str, limits: Limits, noun: str) -> dict[str, str]:
        """One request of `who` (a key's or a token's id): counted against its requests per minute, refused (429)
        when that is used up or when its tokens in the last minute reached their limit. Returns the rate-limit
        headers of its answer; `noun` names the caller in the refusal ("API key", "API token")."""
        headers: dict[str, str] = {}
        if limits.rpm:
            rpm = RateLimitItemPerMinute(limits.rpm)

            async def requests(counters: _Counters) -> tuple[bool, int, float]:
                allowed = await counters.requests.hit(rpm, "rpm", who)
                stats = await counters.requests.get_window_stats(rpm, "rpm", who)
                return allowed, stats.remaining, stats.reset_time

            allowed, remaining, reset_time = await self._run(requests)
            reset_s = _reset_s(reset_time)
            headers |= _headers("requests", limits.rpm, remaining, reset_s)
            if not allowed:
                _refuse(f"{limits.rpm} requests per minute", noun, headers, reset_s)
        if limits.tpm:
            tpm = RateLimitItemPerMinute(limits.tpm)
            stats = await self._run(lambda counters: counters.tokens.get_window_stats(tpm, "tpm", who))
            reset_s = _reset_s(stats.reset_time)
            headers |= _headers("tokens", limits.tpm, stats.remaining, reset_s)
            if stats.remaining <= 0:
                _refuse(f"{limits.tpm} tokens per minute", noun, headers, reset_s)
        return headers

    async def count_tokens(self, who: str, tpm: int, tokens: int) -> None:
        """Add the tokens a request of `who` used to its window (up to the limit: the window is then full)."""
        item = RateLimitItemPerMinute(tpm)

        async def add(counters: _Counters) -> None:
            for _ in range(2):  # another request may take the room first: once more, with what is left then
                room = (await counters.tokens.get_window_stats(item, "tpm", who)).remaining
                if room <= 0 or await counters.tokens.hit(item, "tpm", who, cost=min(tokens, room)):
                    return

        await self._run(add)

    async def _run(self, operation: Callable[[_Counters], Awaitable[T]]) -> T:
        """The operation on Redis, unless it failed lately; on this replica's counters when Redis fails."""
        if self._shared is not None and time.monotonic() >= self._skip_until:
            try:
                async with asyncio.timeout(self._timeout_s):
                    result = await operation(self._shared)
            except Exception as exc:
                self._failed(exc)
            else:
                self._answered()
                return result
        return await operation(self._local)

    def _failed(self, exc: Exception) -> None:
        self._skip_until = time.monotonic() + BACK_OFF_S
        why = "timed out" if isinstance(exc, TimeoutError) else type(exc).__name__
        if self._failure is None:
            logger.warning("rate limits: Redis did not answer (%s); limits are counted per replica until it does", why)
        self._failure = f"Redis did not answer ({why}): limits are counted per replica until it does"

    def _answered(self) -> None:
        if self._failure is not None:
            logger.info("rate limits: Redis answers again; limits are shared by every replica")
            self._failure = None

    async def check(self) -> dict[str, Any]:
        """For /health/detailed: where the limits are counted, and why not in Redis; Redis pinged (bounded)."""
        if self._storage is not None:
            try:
                async with asyncio.timeout(self._timeout_s):
                    answered = await self._storage.check()
            except TimeoutError:
                answered = False
            if answered:
                self._skip_until = float("-inf")
                self._answered()
            elif self._failure is None:
                self._failed(ConnectionError("no answer to PING"))
        details: dict[str, Any] = {"status": "ok", "backend": self.backend}
        if self.reason is not None:
            details["reason"] = self.reason
        if self._shared is not None and self._failure is not None:
            details["status"] = "degraded"
        return details
