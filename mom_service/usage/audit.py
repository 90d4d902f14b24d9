"""The audit table: every admin action (the admin API's and `mom-service keys`'), who took it, what it was and
when. Never a key: a key's row names it by its id."""

from __future__ import annotations

import time
import uuid
from typing import Any

import orjson
from sqlalchemy.exc import SQLAlchemyError
from sqlalchemy.ext.asyncio import AsyncEngine

from mom_service.usage.schema import audit_table


class AuditUnavailable(Exception):
    """The database did not answer a write or read of the audit table."""


def audit_row(
    actor: str, action: str, target: str | None = None, details: dict[str, Any] | None = None
) -> dict[str, Any]:
    """One audit row: `actor` (admin:<hash of its token>, cli:<user>), `action` (key.create, ...), its target."""
    return {
        "id": str(uuid.uuid4()),
        "created_ms": int(time.time() * 1000),
        "actor": actor,
        "action": action,
        "target": target,
        "details": orjson.dumps(details).decode() if details else None,
    }


async def audit(
    engine: AsyncEngine, actor: str, action: str, target: str | None = None, details: dict[str, Any] | None = None
) -> None:
    """Write one audit row, for an action that changes nothing else in the database (a config reload)."""
    try:
        async with engine.begin() as conn:
            await conn.execute(audit_table.insert().values(audit_row(actor, action, target, details)))
    except SQLAlchemyError as exc:
        raise AuditUnavailable(type(exc).__name__) from exc
