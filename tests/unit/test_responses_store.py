"""The stored Responses (usage/responses_store.py) on a real SQLite database: saved, read back by their owner only,
deleted, gone once expired (an injected clock, no sleeps), and expired rows purged by a later write."""

from __future__ import annotations

from pathlib import Path

from sqlalchemy import func, select

from mom_service.usage.database import UsageDatabase
from mom_service.usage.responses_store import DAY_MS, ResponseStore
from mom_service.usage.schema import responses_table


class Clock:
    def __init__(self) -> None:
        self.now = 1_800_000_000.0

    def __call__(self) -> float:
        return self.now


async def _store(tmp_path: Path, clock: Clock, ttl_days: int = 2) -> tuple[UsageDatabase, ResponseStore]:
    database = UsageDatabase(f"sqlite+aiosqlite:///{tmp_path / 'mom.db'}")
    await database.migrate()
    return database, ResponseStore(database.engine, ttl_days, clock=clock)


async def _rows(database: UsageDatabase) -> int:
    async with database.engine.connect() as conn:
        return int((await conn.execute(select(func.count()).select_from(responses_table))).scalar() or 0)


async def test_saved_read_by_its_owner_only_and_deleted(tmp_path: Path) -> None:
    database, store = await _store(tmp_path, Clock())
    try:
        conversation = [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello"}]
        await store.save("resp_1", "alice", {"id": "resp_1"}, [{"id": "msg_1"}], conversation)
        found = await store.get("resp_1", "alice")
        assert found is not None and found.response == {"id": "resp_1"} and found.conversation == conversation
        assert found.input_items == [{"id": "msg_1"}]
        assert await store.get("resp_1", "bob") is None and await store.get("resp_2", "alice") is None
        assert await store.delete("resp_1", "bob") is False
        assert await store.delete("resp_1", "alice") is True
        assert await store.get("resp_1", "alice") is None and await store.delete("resp_1", "alice") is False
    finally:
        await database.dispose()


async def test_expired_rows_are_gone_then_purged(tmp_path: Path) -> None:
    clock = Clock()
    database, store = await _store(tmp_path, clock, ttl_days=2)
    try:
        await store.save("resp_old", "alice", {}, [], [])
        clock.now += 2 * DAY_MS / 1000 - 1
        assert await store.get("resp_old", "alice") is not None  # a second before its TTL ends
        clock.now += 1
        assert await store.get("resp_old", "alice") is None
        assert await store.delete("resp_old", "alice") is False
        assert await _rows(database) == 1  # not read, but still there until a write purges it
        await store.save("resp_new", "alice", {}, [], [])
        assert await _rows(database) == 1 and await store.get("resp_new", "alice") is not None
    finally:
        await database.dispose()
