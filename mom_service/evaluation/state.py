"""The service's state for a run, opened and closed as `mom-service mcp` does (api/app.py's `open_state` and
`close_state`): the same config, keys, usage database, writer and records as `serve`, without an HTTP server."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

from mom_service.api.app import StartupFailed, close_state, open_state
from mom_service.api.state import AppState
from mom_service.config import MoMConfig
from mom_service.evaluation.errors import EvalError
from mom_service.settings import Settings
from mom_service.usage.writer import UsageWriter

RECORDS_TIMEOUT_S = 15.0
TICK_S = 0.05


async def records_written(writer: UsageWriter, timeout_s: float = RECORDS_TIMEOUT_S) -> None:
    """Until the writer has committed every record, its batch being committed included (or `timeout_s`).
    `close_state` cancels the writer's task: a run ends with a burst of records, and a batch cut in the middle of
    its commit can leave SQLite locked for the drain that follows."""
    for _ in range(int(timeout_s / TICK_S)):
        if not writer.depth:
            return
        await asyncio.sleep(TICK_S)


@asynccontextmanager
async def opened(settings: Settings, config: MoMConfig, config_path: str | None) -> AsyncIterator[AppState]:
    try:
        state = await open_state(settings, config, config_path)
    except StartupFailed:
        raise EvalError("The service's state could not be opened (see the log above).") from None
    try:
        yield state
        await records_written(state.usage_writer)
    finally:
        await close_state(state)
