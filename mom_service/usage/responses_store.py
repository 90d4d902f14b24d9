"""Stored Responses (`store: true`): the response, its input items and the conversation up to and with its output,
kept in the usage database (SQLite or PostgreSQL: any replica continues any conversation) for MOM_RESPONSES_TTL_DAYS.

Each row belongs to the caller that made it (a hash of its token): another caller reading, continuing or deleting it
finds nothing, exactly as if it did not exist. Expired rows are never returned, and are deleted lazily: at most once
a minute, by a write.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import orjson
from sqlalchemy import and_, delete, insert, select
from sqlalchemy.exc import SQLAlchemyError
from sqlalchemy.ext.asyncio import AsyncEngine

from mom_service.usage.schema import responses_table

DAY_MS = 86_400_000
PURGE_EVERY_MS = 60_000


class ResponseStoreUnavailable(Exception):
    """The database did not answer a read or write of a stored response."""


@dataclass(frozen=True, slots=True)
class StoredResponse:
    id: str
    response: dict[str, Any]
    input_items: list[dict[str, Any]]
    conversation: list[dict[str, Any]]


class ResponseStore:
    def __init__(self, engine: AsyncEngine, ttl_days: int, clock: Callable[[], float] = time.time) -> None:
        self._engine = engine
        self._ttl_ms = ttl_days * DAY_MS
        self._clock = clock
        self._purged_ms = 0

    def _now_ms(self) -> int:
        return int(self._clock() * 1000)

    async def save(
        self,
        response_id: str,
        owner: str,
        response: dict[str, Any],
        input_items: list[dict[str, Any]],
        conversation: list[dict[str, Any]],
    ) -> None:
        now = self._now_ms()
        row = {
            "id": response_id,
            "owner": owner,
            "created_ms": now,
            "expires_ms": now + self._ttl_ms,
            "response": orjson.dumps(response).decode(),
            "input_items": orjson.dumps(input_items).decode(),
            "conversation": orjson.dumps(conversation).decode(),
        }
        try:
            async with self._engine.begin() as conn:
                await conn.execute(insert(responses_table).values(**row))
                if now - self._purged_ms >= PURGE_EVERY_MS:
                    self._purged_ms = now
                    await conn.execute(delete(responses_table).where(responses_table.c.expires_ms <= now))
        except SQLAlchemyError as exc:
            raise ResponseStoreUnavailable(type(exc).__name__) from exc

    async def get(self, response_id: str, owner: str) -> StoredResponse | None:
        """The stored response, or None when there is none, it expired, or it is another caller's."""
        table = responses_table
        query = select(table.c.response, table.c.input_items, table.c.conversation).where(
            self._mine(response_id, owner)
        )
        try:
            async with self._engine.connect() as conn:
                row = (await conn.execute(query)).first()
        except SQLAlchemyError as exc:
            raise ResponseStoreUnavailable(type(exc).__name__) from exc
        if row is None:
            return None
        return StoredResponse(response_id, orjson.loads(row[0]), orjson.loads(row[1]), orjson.loads(row[2]))

    async def delete(self, response_id: str, owner: str) -> bool:
        """Whether a response of this caller's was there (and is now gone)."""
        try:
            async with self._engine.begin() as conn:
                result = await conn.execute(delete(responses_table).where(self._mine(response_id, owner)))
        except SQLAlchemyError as exc:
            raise ResponseStoreUnavailable(type(exc).__name__) from exc
        return bool(result.rowcount)

    def _mine(self, response_id: str, owner: str) -> Any:
        table = responses_table
        return and_(table.c.id == response_id, table.c.owner == owner, table.c.expires_ms > self._now_ms())
