"""The usage database as the rest of the service sees it: one object that connects, migrates, answers the usage
report, checks that it answers (for health), and closes. Nothing outside this package touches SQL."""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Mapping
from typing import Any

import anyio
import orjson
from sqlalchemy import literal, select, text
from sqlalchemy.engine import make_url
from sqlalchemy.exc import DBAPIError, SQLAlchemyError
from sqlalchemy.ext.asyncio import AsyncEngine

from mom_service.usage.audit import AuditUnavailable, audit
from mom_service.usage.report import GroupBy, usage_report
from mom_service.usage.schema import create_engine, migrate

logger = logging.getLogger("mom_service")

PROBE_TIMEOUT_S = 2.0
AUDIT_TIMEOUT_S = 5.0  # an audit write: past it, the action stands and the log line is its record


class UsageUnavailable(Exception):
    """The usage database did not answer a query (the usage API answers 503)."""


class DatabaseFileMissing(Exception):
    """The SQLite file the service was started with is gone (or is no longer a regular file)."""


def url_password(url: str) -> str | None:
    """The password in a database URL, to be redacted wherever it could show."""
    password = make_url(url).password
    return str(password) if password else None


class UsageDatabase:
    def __init__(self, url: str) -> None:
        self.engine: AsyncEngine = create_engine(url)
        self.backend = self.engine.url.get_backend_name()
        self.display_url = make_url(url).render_as_string(hide_password=True)

    async def migrate(self) -> int:
        """Create or upgrade the schema; returns the version found before."""
        return await migrate(self.engine)

    async def report(self, **query: Any) -> dict[str, Any]:
        """`usage_report` over this database; UsageUnavailable when it does not answer."""
        try:
            return await usage_report(self.engine, **query)
        except SQLAlchemyError as exc:
            raise UsageUnavailable(type(exc).__name__) from exc

    async def audit(self, who: str, action: str, detail: Mapping[str, Any]) -> bool:
        """An admin action on record (usage/audit.py), and a log line, so that it is on record even when the
        database does not take it (then False: the action itself is not undone)."""
        logger.info("audit: %s by %s: %s", action, who, orjson.dumps(detail).decode())
        try:
            async with asyncio.timeout(AUDIT_TIMEOUT_S):
                await audit(self.engine, who, action, details=dict(detail))
        except (AuditUnavailable, OSError, TimeoutError) as exc:
            logger.error("audit record of %s by %s not written: %s", action, who, type(exc).__name__)
            return False
        return True

    async def round_trip(self) -> None:
        """One real round trip; raises when the database does not answer.

        SQLite needs more than `SELECT 1`, which a pooled connection answers without touching the file: the file
        must still be there (a pooled connection keeps writing into a deleted one) and its schema page must read.
        """
        url = self.engine.url
        if self.backend != "sqlite":
            async with self.engine.connect() as conn:
                await conn.execute(select(literal(1)))
            return
        database = url.database
        on_disk = bool(database) and database != ":memory:" and not url.query.get("uri")
        if on_disk and not await anyio.Path(str(database)).is_file():
            raise DatabaseFileMissing("the database file is missing or is not a regular file")
        async with self.engine.connect() as conn:
            await conn.execute(text("SELECT count(*) FROM sqlite_master"))

    async def probe(self) -> tuple[float, str | None]:
        """(latency in ms, None when the database answered, else a short reason: the driver's own error, not
        SQLAlchemy's wrapper, which adds the SQL and a link; first line only)."""
        started = time.perf_counter()
        try:
            async with asyncio.timeout(PROBE_TIMEOUT_S):
                await self.round_trip()
        except TimeoutError:
            return _elapsed_ms(started), f"no answer within {PROBE_TIMEOUT_S:g} s"
        except Exception as exc:
            original = exc.orig if isinstance(exc, DBAPIError) and exc.orig is not None else exc
            lines = str(original).strip().splitlines()
            return _elapsed_ms(started), f"{type(original).__name__}: {lines[0]}" if lines else type(original).__name__
        return _elapsed_ms(started), None

    async def dispose(self) -> None:
        await self.engine.dispose()


def _elapsed_ms(started: float) -> float:
    return round((time.perf_counter() - started) * 1000, 1)


__all__ = ["DatabaseFileMissing", "GroupBy", "UsageDatabase", "UsageUnavailable", "url_password"]
