"""API keys in the usage database (docs/keys.md): made, listed, changed, disabled and deleted, each change written
to the audit table in the same transaction.

A key is `mom-` and 43 characters of `secrets.token_urlsafe(32)` (256 random bits). It is shown once, when it is
made; the database keeps only its SHA-256 (for 256 random bits a plain hash is as strong as a slow one: there is
nothing to guess) and its first characters (`prefix`), for people to recognize it by. A deleted key stays as a row
marked deleted: its usage records and audit rows still name it, and it never authenticates again.
"""

from __future__ import annotations

import hashlib
import secrets
import time
import uuid
from collections.abc import AsyncIterator, Callable, Mapping
from contextlib import AbstractAsyncContextManager, asynccontextmanager
from dataclasses import dataclass
from decimal import Decimal
from typing import Any, Literal

import orjson
from sqlalchemy import RowMapping, select, update
from sqlalchemy.exc import SQLAlchemyError
from sqlalchemy.ext.asyncio import AsyncConnection, AsyncEngine

from mom_service.usage.audit import audit_row
from mom_service.usage.money import from_pico, to_pico
from mom_service.usage.schema import audit_table, keys_table

KEY_PREFIX = "mom-"
KEY_LENGTH = len(KEY_PREFIX) + 43  # token_urlsafe(32): 43 characters
SHOWN_CHARS = 12  # the prefix kept for display: "mom-" and 8 characters (48 of the 256 bits)
Period = Literal["day", "month"]
# What a key's record holds that an admin sets (the admin API's body, the CLI's options)
FIELDS = ("name", "owner", "models", "budget_usd", "budget_period", "rpm_limit", "tpm_limit", "expires_ms", "disabled")


class KeyStoreUnavailable(Exception):
    """The database did not answer a read or write of the keys."""


def new_key() -> str:
    return KEY_PREFIX + secrets.token_urlsafe(32)


def hash_key(key: bytes) -> str:
    """What the database keeps of a key: its SHA-256, hex."""
    return hashlib.sha256(key).hexdigest()


def looks_like_key(token: bytes) -> bool:
    """Whether a token has a key's shape (anything else is refused without asking the database)."""
    return len(token) == KEY_LENGTH and token.startswith(KEY_PREFIX.encode())


@dataclass(frozen=True, slots=True)
class ApiKey:
    """A key's record (never the key)."""

    id: str
    name: str
    prefix: str
    owner: str | None = None
    models: tuple[str, ...] | None = None  # the MoM models it may use; None: all
    budget_usd: Decimal | None = None
    budget_period: Period | None = None
    rpm_limit: int | None = None
    tpm_limit: int | None = None
    expires_ms: int | None = None
    disabled: bool = False
    created_ms: int = 0
    updated_ms: int = 0

    def expired(self, now_ms: int) -> bool:
        return self.expires_ms is not None and self.expires_ms <= now_ms

    def allows(self, model: str) -> bool:
        return self.models is None or model in self.models

    @property
    def period(self) -> Period:
        """The period its budget (or its spend report) counts over: its budget's, else the month."""
        return self.budget_period or "month"


def _record(row: RowMapping) -> ApiKey:
    return ApiKey(
        id=row["id"],
        name=row["name"],
        prefix=row["prefix"],
        owner=row["owner"],
        models=tuple(orjson.loads(row["models"])) if row["models"] is not None else None,
        budget_usd=from_pico(row["budget_pico"]),
        budget_period=row["budget_period"],
        rpm_limit=row["rpm_limit"],
        tpm_limit=row["tpm_limit"],
        expires_ms=row["expires_ms"],
        disabled=bool(row["disabled"]),
        created_ms=int(row["created_ms"]),
        updated_ms=int(row["updated_ms"]),
    )


def _columns(fields: Mapping[str, Any]) -> dict[str, Any]:
    """The columns of the fields given (FIELDS' names, Python values)."""
    columns = {name: value for name, value in fields.items() if name not in ("models", "budget_usd")}
    if "models" in fields:
        models = fields["models"]
        columns["models"] = orjson.dumps(list(models)).decode() if models is not None else None
    if "budget_usd" in fields:
        columns["budget_pico"] = to_pico(fields["budget_usd"])
    return columns


def _details(fields: Mapping[str, Any]) -> dict[str, Any]:
    """The fields as the audit row shows them (JSON: amounts as strings, exact)."""
    return {
        name: str(value) if isinstance(value, Decimal) else list(value) if isinstance(value, tuple) else value
        for name, value in fields.items()
    }


class KeyStore:
    """The keys, in the usage database. Every method raises KeyStoreUnavailable when the database does not answer."""

    def __init__(self, engine: AsyncEngine, clock: Callable[[], float] = time.time) -> None:
        self._engine = engine
        self._clock = clock

    def _now_ms(self) -> int:
        return int(self._clock() * 1000)

    async def create(self, fields: Mapping[str, Any], actor: str) -> tuple[ApiKey, str]:
        """A new key with these fields (`name` at least): its record, and the key itself (to be shown once)."""
        key = new_key()
        now = self._now_ms()
        row = {
            **_columns({"disabled": False, **fields}),
            "id": "key_" + uuid.uuid4().hex[:16],
            "key_hash": hash_key(key.encode()),
            "prefix": key[:SHOWN_CHARS],
            "created_ms": now,
            "updated_ms": now,
        }
        async with self._begin() as conn:
            await conn.execute(keys_table.insert().values(**row))
            await conn.execute(audit_table.insert().values(audit_row(actor, "key.create", row["id"], _details(fields))))
        record = await self.get(row["id"])
        assert record is not None
        return record, key

    async def get(self, key_id: str) -> ApiKey | None:
        """A key's record; None when there is none, or it was deleted."""
        return await self._one(keys_table.c.id == key_id)

    async def by_hash(self, key_hash: str) -> ApiKey | None:
        """The record of the key with this hash (`hash_key`); None when there is none, or it was deleted."""
        return await self._one(keys_table.c.key_hash == key_hash)

    async def all(self) -> list[ApiKey]:
        """Every key not deleted, oldest first."""
        query = select(keys_table).where(keys_table.c.deleted_ms.is_(None)).order_by(keys_table.c.created_ms)
        async with self._connect() as conn:
            return [_record(row) for row in (await conn.execute(query)).mappings()]

    async def names(self, key_ids: list[str]) -> dict[str, str]:
        """The names of these keys (deleted ones too), by id."""
        query = select(keys_table.c.id, keys_table.c.name).where(keys_table.c.id.in_(key_ids))
        async with self._connect() as conn:
            return {row[0]: row[1] for row in await conn.execute(query)}

    async def update(self, key_id: str, changes: Mapping[str, Any], actor: str) -> ApiKey | None:
        """The key with these fields changed (FIELDS' names; None clears an optional one); None when there is no
        such key. An empty change is not audited."""
        if changes:
            live = (keys_table.c.id == key_id) & keys_table.c.deleted_ms.is_(None)
            action = "key.disable" if changes.get("disabled") is True and len(changes) == 1 else "key.update"
            async with self._begin() as conn:
                query = update(keys_table).where(live).values(**_columns(changes), updated_ms=self._now_ms())
                if (await conn.execute(query)).rowcount == 0:
                    return None
                await conn.execute(audit_table.insert().values(audit_row(actor, action, key_id, _details(changes))))
        return await self.get(key_id)

    async def delete(self, key_id: str, actor: str) -> bool:
        """Whether a key was there (it is now deleted: it never authenticates again)."""
        live = (keys_table.c.id == key_id) & keys_table.c.deleted_ms.is_(None)
        now = self._now_ms()
        async with self._begin() as conn:
            deleted = await conn.execute(update(keys_table).where(live).values(deleted_ms=now, updated_ms=now))
            if deleted.rowcount == 0:
                return False
            await conn.execute(audit_table.insert().values(audit_row(actor, "key.delete", key_id)))
        return True

    async def _one(self, condition: Any) -> ApiKey | None:
        query = select(keys_table).where(condition, keys_table.c.deleted_ms.is_(None))
        async with self._connect() as conn:
            row = (await conn.execute(query)).mappings().first()
        return _record(row) if row is not None else None

    def _connect(self) -> AbstractAsyncContextManager[AsyncConnection]:
        return _guarded(self._engine.connect())

    def _begin(self) -> AbstractAsyncContextManager[AsyncConnection]:
        return _guarded(self._engine.begin())


@asynccontextmanager
async def _guarded(context: AbstractAsyncContextManager[AsyncConnection]) -> AsyncIterator[AsyncConnection]:
    """A connection (or a transaction) whose database errors are KeyStoreUnavailable."""
    try:
        async with context as conn:
            yield conn
    except SQLAlchemyError as exc:
        raise KeyStoreUnavailable(type(exc).__name__) from exc
