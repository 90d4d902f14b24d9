"""The response cache: whole answers and members' answers, in process (LRU with TTL) or shared in Redis.

Keys are SHA-256 digests of a canonical JSON of everything that decides an answer:

- an answer: the MoM model's panel configuration (its members and concluding LLMs as configured: model, api_base,
  params; the concluding prompt; the thinking settings), the messages and the sampling parameters, but not
  `stream`, `stream_options` or `user`, so a streamed request may replay an answer first given whole;
- a member's answer: that LLM's configuration, the messages as that LLM receives them and the sampling parameters,
  so a change to the concluding prompt or LLM re-runs only the synthesis.

A change in config.yaml changes the digests: old entries are never found again and expire.

Values are orjson bytes. The in-process cache is bounded in bytes (`MOM_CACHE_MAX_BYTES`), least recently used
first out. The Redis cache sets a TTL on every entry; Redis' own `maxmemory` bounds its size. A Redis that is down
or slow (`MOM_CACHE_TIMEOUT_MS`) is a miss, logged (at most once a minute) and reported as degraded in health:
never a failed answer, and after an error requests skip Redis for a few seconds rather than each wait on it.
"""

from __future__ import annotations

import asyncio
import hashlib
import logging
import time
from collections import OrderedDict
from collections.abc import Sequence
from dataclasses import dataclass
from decimal import Decimal
from typing import Any, Protocol

import orjson

from mom_service.config import LLMDefinition, MoMConfig, MoMModelConfig
from mom_service.cost_calculation import ZERO
from mom_service.events import Breakdown, CallReport

logger = logging.getLogger("mom_service")

KEY_VERSION = 1
PREFIX = "mom:cache:"
WARN_EVERY_S = 60.0
UNHEALTHY_FOR_S = 30.0  # after a Redis error, health says degraded this long
BACK_OFF_S = 5.0  # after a Redis error, requests do not wait on Redis (a miss at once) this long
NOT_IN_KEY = frozenset({"user"})  # sampling parameters that do not change an answer


def _digest(kind: str, payload: dict[str, Any]) -> str:
    canonical = orjson.dumps({"v": KEY_VERSION, "kind": kind, **payload}, option=orjson.OPT_SORT_KEYS)
    return hashlib.sha256(canonical).hexdigest()


def _llm_identity(llm: LLMDefinition) -> dict[str, Any]:
    """What about an LLM decides its answers (not its key's variable, timeout, retries or price)."""
    return {"model": llm.model, "api_base": llm.api_base, "params": llm.params, "multimodal": llm.multimodal}


def _params(params: dict[str, Any]) -> dict[str, Any]:
    return {k: v for k, v in params.items() if k not in NOT_IN_KEY}


def panel_identity(config: MoMConfig, mom: MoMModelConfig) -> str:
    """Everything in the config that decides a MoM model's answers, as one digest (made once per MoM model)."""
    names = {*mom.llms_to_query, mom.concluding_llm, *mom.concluding_fallbacks}
    return _digest(
        "panel",
        {
            "mom": mom.name,
            "panel": mom.model_dump(exclude={"name", "description", "cache"}),
            "llms": {name: _llm_identity(config.llm(name)) for name in names},
            "prompt": config.concluding_prompt(mom),
        },
    )


def answer_key(panel: str, messages: Sequence[dict[str, Any]], params: dict[str, Any], owner: str = "") -> str:
    """The key of an answer: the MoM model's `panel_identity`, the messages, the sampling parameters, and whose
    it is (`owner`: the caller's identity, or "" for an answer shared by every caller)."""
    return _digest("answer", {"panel": panel, "messages": messages, "params": _params(params), "owner": owner})


def member_key(
    llm: LLMDefinition,
    messages: list[dict[str, Any]],
    params: dict[str, Any],
    *,
    owner: str = "",
    encoded: bytes | None = None,
) -> str:
    """The key of a member's answer; `encoded` is `messages` already serialized with sorted keys (not again)."""
    payload = {"llm": _llm_identity(llm), "params": _params(params), "owner": owner}
    if encoded is None:
        return _digest("member", {**payload, "messages": messages})
    head = orjson.dumps({"v": KEY_VERSION, "kind": "member", **payload}, option=orjson.OPT_SORT_KEYS)
    return hashlib.sha256(head + b"\x00" + encoded).hexdigest()


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


class RedisCache:
    """Shared by every replica. Each operation is bounded by `timeout_s`; a failure is a miss, never an error."""

    backend = "redis"

    def __init__(self, url: str, timeout_s: float) -> None:
        import redis.asyncio as redis

        self.timeout_s = timeout_s
        self._client = redis.Redis.from_url(
            url, socket_timeout=timeout_s, socket_connect_timeout=timeout_s, retry_on_timeout=False
        )
        self._last_error = float("-inf")
        self._last_warning = float("-inf")
        self._skip_until = float("-inf")
        self.errors = 0

    def _failed(self, action: str, exc: BaseException) -> None:
        self.errors += 1
        now = time.monotonic()
        self._last_error = now
        self._skip_until = now + BACK_OFF_S
        if now - self._last_warning >= WARN_EVERY_S:
            self._last_warning = now
            reason = "timed out" if isinstance(exc, TimeoutError) else type(exc).__name__
            logger.warning("response cache (redis) %s failed: %s; answering without the cache", action, reason)

    def _backing_off(self) -> bool:
        return time.monotonic() < self._skip_until

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
        if time.monotonic() - self._last_error < UNHEALTHY_FOR_S:
            return "errors in the last 30 s"
        return None

    async def close(self) -> None:
        try:
            await self._client.aclose()
        except Exception as exc:  # closing a connection to a dead Redis
            logger.debug("closing the redis cache: %s", type(exc).__name__)


def _cost(value: Decimal | None) -> str | None:
    return None if value is None else str(value)


def _paid(report: CallReport) -> Decimal | None:
    """What the call that produced this answer cost (of an answer itself from the cache: what that one saved)."""
    return report.saved if report.cached else report.cost


def cached_copy(report: CallReport) -> CallReport:
    """A call as a cache hit shows it: no upstream call was made, so nothing is paid; its cost is saved."""
    return CallReport(
        name=report.name,
        model=report.model,
        status=report.status,
        error=report.error,
        error_type=report.error_type,
        cost=ZERO,
        saved=None if report.status == "skipped" else _paid(report),
        cached=True,
        text=report.text,
        role=report.role,
        images=report.images,
    )


@dataclass(slots=True)
class CachedAnswer:
    members: list[CallReport]
    concluding: CallReport
    pieces: list[str]  # the synthesis as it was streamed, replayed as the same chunks
    finish_reason: str


def cacheable(breakdown: Breakdown) -> bool:
    """A whole answer: no member failed or was skipped by its circuit (cut off by design by a quorum or deadline
    is fine), the concluding call answered."""
    return breakdown.concluding.status == "ok" and not any(
        m.status == "error" or m.error_type == "circuit_open" for m in breakdown.members
    )


class ResponseCache:
    """Answers and members' answers over a store (memory or Redis), with their (de)serialization."""

    def __init__(self, store: CacheStore, config: MoMConfig) -> None:
        self.store = store
        self._panels = {m.name: panel_identity(config, m) for m in config.models}

    def answer_key(
        self, mom: str, messages: Sequence[dict[str, Any]], params: dict[str, Any], *, owner: str = ""
    ) -> str:
        return answer_key(self._panels[mom], messages, params, owner)

    async def get_answer(self, key: str) -> CachedAnswer | None:
        raw = await self.store.get("a:" + key)
        if raw is None:
            return None
        try:
            data = orjson.loads(raw)
            members = [self._report(m) for m in data["members"]]
            return CachedAnswer(members, self._report(data["concluding"]), data["pieces"], data["finish_reason"])
        except (orjson.JSONDecodeError, KeyError, TypeError, ValueError):
            return None  # an entry of another version: a miss

    async def put_answer(
        self, key: str, ttl_s: float, breakdown: Breakdown, pieces: list[str], finish_reason: str
    ) -> None:
        data = {
            "members": [self._entry(m) for m in breakdown.members],
            "concluding": self._entry(breakdown.concluding),
            "pieces": pieces,
            "finish_reason": finish_reason,
        }
        await self.store.set("a:" + key, orjson.dumps(data), ttl_s)

    async def get_member(self, key: str) -> tuple[str, Decimal | None] | None:
        """(text, the cost of the call that produced it) of a member's cached answer."""
        raw = await self.store.get("m:" + key)
        if raw is None:
            return None
        try:
            data = orjson.loads(raw)
            return str(data["text"]), None if data["cost"] is None else Decimal(data["cost"])
        except (orjson.JSONDecodeError, KeyError, TypeError, ValueError, ArithmeticError):
            return None

    async def put_member(self, key: str, ttl_s: float, report: CallReport) -> None:
        await self.store.set("m:" + key, orjson.dumps({"text": report.text, "cost": _cost(report.cost)}), ttl_s)

    @staticmethod
    def _entry(report: CallReport) -> dict[str, Any]:
        return {
            "name": report.name,
            "model": report.model,
            "status": report.status,
            "error": report.error,
            "error_type": report.error_type,
            "text": report.text,
            "role": report.role,
            "images": report.images,
            "cost": _cost(_paid(report)),
        }

    @staticmethod
    def _report(data: dict[str, Any]) -> CallReport:
        original = CallReport(
            name=data["name"],
            model=data["model"],
            status=data["status"],
            error=data["error"],
            error_type=data["error_type"],
            text=data["text"],
            role=data["role"],
            images=data["images"],
            cost=None if data["cost"] is None else Decimal(data["cost"]),
        )
        return cached_copy(original)
