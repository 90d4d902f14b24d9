"""The service's state for a run, opened and closed as `mom-service mcp` does (api/app.py's `open_state` and
`close_state`): the same config, keys, usage database, writer and records as `serve`, without an HTTP server."""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

from mom_service.api.app import StartupFailed, close_state, open_state
from mom_service.api.state import AppState
from mom_service.config import MoMConfig
from mom_service.evaluation.errors import EvalError
from mom_service.settings import Settings


@asynccontextmanager
async def opened(settings: Settings, config: MoMConfig, config_path: str | None) -> AsyncIterator[AppState]:
    try:
        state = await open_state(settings, config, config_path)
    except StartupFailed:
        raise EvalError("The service's state could not be opened (see the log above).") from None
    try:
        yield state
    finally:  # the usage writer commits every record before it closes
        await close_state(state)
