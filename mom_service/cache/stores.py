"""Where cached entries live: in process (an LRU with a TTL per entry, bounded in bytes: `MOM_CACHE_MAX_BYTES`), or in
Redis, shared by every replica (a TTL on every entry; Redis' own `maxmemory` bounds its size). Values are bytes.

A Redis that is down or slow (`MOM_CACHE_TIMEOUT_MS`) is a miss, logged (at most once a minute) and reported as
degraded in health: never a failed answer, and after an error requests skip Redis for a few seconds rather than
each wait on it.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections import OrderedDict
from typing import Any, Protocol

logger = logging.getLogger("mom_service")

PREFIX = "mom:cache:"
WARN_EVERY_S = 60.0
UNHEALTHY_FOR_S = 30.0  # after a Redis error, health says degraded this long
BACK_OFF_S = 5.0  # after a Redis error, requests do not wait on Redis (a miss at once) this long


class CacheStore(Protocol):
    backend: str

    async def get(self, key: str) -> bytes | None: ...

    async def set(self, key: str, value: bytes, ttl_s: float) -> None: ...

    async def check(self) -> str | None:
        """None when healthy, else a short reason."""
        ...

    async def close(self) -> None: ...


class MemoryCache:
    """In-process LRU with a TTL per entry, bounded in bytes."""

    backend = "memory"

    def __init__(self, max_bytes: int, clock: Any = time.monotonic) -> None:
        self.max_bytes = max_bytes
        self.size = 0
        self._clock = clock
        self._entries: OrderedDict[str, tuple[float, bytes]] = OrderedDict()

    async def get(self, key: str) -> bytes | None:
        entry = self._entries.get(key)
        if entry is None:
            return None
        expires, value = entry
        if expires <= self._clock():
            self._drop(key)
            return None
        self._entries.move_to_end(key)
        return value

    async def set(self, key: str, value: bytes, ttl_s: float) -> None:
        if len(value) > self.max_bytes:
            return
        # An exact-size copy: a bytes object from orjson keeps its whole write buffer (4 KiB at least), which would
        # make the entries take several times the memory `max_bytes` counts.
        value = bytes(memoryview(value))
        if key in self._entries:
            self._drop(key)
        self._entries[key] = (self._clock() + ttl_s, value)
        self.size += len(value)
        while self.size > self.max_bytes:
            self._drop(next(iter(self._entries)))

    def _drop(self, key: str) -> None:
        _, value = self._entries.pop(key)
        self.size -= len(value)

    def __len__(self) -> int:
        return len(self._entries)

    async def check(self) -> str | None:
        return None

    async def close(self) -> None:
        self._entries.clear()
        self.size = 0


def redis_client(url: str, timeout_s: float) -> Any:
    """A Redis client (redis.asyncio.Redis) whose every connect and read is bounded by `timeout_s`."""
    import redis.asyncio as redis

    return redis.Redis.from_url(url, socket_timeout=timeout_s, socket_connect_timeout=timeout_s, retry_on_timeout=False)


class RedisFailures:
    """A Redis user's failures: counted, logged at most once a minute, a back-off after each (its operations are
    skipped for a few seconds rather than each wait on a Redis that is down), and `recent` for health."""

    def __init__(self, what: str, consequence: str) -> None:
        self._what, self._consequence = what, consequence
        self._last_error = float("-inf")
        self._last_warning = float("-inf")
        self._skip_until = float("-inf")
        self.errors = 0

    def failed(self, action: str, exc: BaseException) -> None:
        self.errors += 1
        now = time.monotonic()
        self._last_error = now
        self._skip_until = now + BACK_OFF_S
        if now - self._last_warning >= WARN_EVERY_S:
            self._last_warning = now
            reason = "timed out" if isinstance(exc, TimeoutError) else type(exc).__name__
            logger.warning("%s (redis) %s failed: %s; %s", self._what, action, reason, self._consequence)

    def backing_off(self) -> bool:
        return time.monotonic() < self._skip_until

    @property
    def recent(self) -> bool:
        """Whether Redis failed in the last 30 s."""
        return time.monotonic() - self._last_error < UNHEALTHY_FOR_S


class RedisCache:
    """Shared by every replica. Each operation is bounded by `timeout_s`; a failure is a miss, never an error."""

    backend = "redis"

    def __init__(self, url: str, timeout_s: float) -> None:
        self.timeout_s = timeout_s
        self._client = redis_client(url, timeout_s)
        self.failures = RedisFailures("response cache", "answering without the cache")

    def _failed(self, action: str, exc: BaseException) -> None:
        self.failures.failed(action, exc)

    def _backing_off(self) -> bool:
        return self.failures.backing_off()

    async def get(self, key: str) -> bytes | None:
        if self._backing_off():
            return None
        try:
            async with asyncio.timeout(self.timeout_s):
                value = await self._client.get(PREFIX + key)
        except Exception as exc:
            self._failed("lookup", exc)
            return None
        return value if isinstance(value, bytes) else None

    async def set(self, key: str, value: bytes, ttl_s: float) -> None:
        if self._backing_off():
            return
        try:
            async with asyncio.timeout(self.timeout_s):
                await self._client.set(PREFIX + key, value, px=max(1, int(ttl_s * 1000)))
        except Exception as exc:
            self._failed("store", exc)

    async def check(self) -> str | None:
        try:
            async with asyncio.timeout(self.timeout_s):
                await self._client.ping()
        except Exception as exc:
            self._failed("ping", exc)
            return f"no answer within {self.timeout_s * 1000:g} ms" if isinstance(exc, TimeoutError) else "unreachable"
        if self.failures.recent:
            return "errors in the last 30 s"
        return None

    async def close(self) -> None:
        try:
            await self._client.aclose()
        except Exception as exc:  # closing a connection to a dead Redis
            logger.debug("closing the redis cache: %s", type(exc).__name__)
