"""The audit table: who did what, when, for every admin action (a config reload, by the admin API, a signal or the
file watch). Who is an identity, never a token or key (api/admin_auth.py `admin_id`)."""

from __future__ import annotations

import asyncio
import logging
import time
import uuid
from collections.abc import Mapping
from typing import Any

import orjson
from sqlalchemy.exc import SQLAlchemyError
from sqlalchemy.ext.asyncio import AsyncEngine

from mom_service.usage.schema import audit_table

logger = logging.getLogger("mom_service")

AUDIT_TIMEOUT_S = 5.0


async def audit(engine: AsyncEngine, who: str, action: str, detail: Mapping[str, Any]) -> bool:
    """One row of the audit table; also a log line, so the action is on record even when the database does not
    answer (then False: the action itself is not undone)."""
    logger.info("audit: %s by %s: %s", action, who, orjson.dumps(detail).decode())
    row = {
        "id": str(uuid.uuid4()),
        "created_ms": int(time.time() * 1000),
        "who": who,
        "action": action,
        "detail": orjson.dumps(detail).decode(),
    }
    try:
        async with asyncio.timeout(AUDIT_TIMEOUT_S), engine.begin() as conn:
            await conn.execute(audit_table.insert().values(**row))
    except (SQLAlchemyError, OSError, TimeoutError) as exc:
        logger.error("audit record of %s by %s not written: %s", action, who, type(exc).__name__)
        return False
    return True
