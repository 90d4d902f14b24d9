"""What sets off a config reload besides `POST /admin/reload`: `SIGHUP`, and with MOM_CONFIG_WATCH=true a change of
the config file. Started and stopped by the app's lifespan (so `mom-service serve` and `uvicorn mom_service.main:app`
alike); each reload is api/reload.py's, logged and audited there."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import signal
import threading
from collections.abc import Coroutine
from pathlib import Path
from typing import Any

from watchfiles import Change, awatch

from mom_service.api.state import AppState
from mom_service.errors import MoMError
from mom_service.observability.logs import LOGGER_NAME

logger = logging.getLogger(LOGGER_NAME)

# The file watch: a change is acted on once the file has been quiet for WATCH_QUIET_MS (an editor's or a deploy
# tool's writes taken as one), and at the latest WATCH_MAX_WAIT_MS after the first of a burst.
WATCH_QUIET_MS = 300
WATCH_MAX_WAIT_MS = 2000
SIGHUP = "signal:SIGHUP"  # who reloaded, in the audit table
FILE_WATCH = "file-watch"


class ReloadTriggers:
    """The SIGHUP handler and the file watch of one app, from its start to its shutdown."""

    def __init__(self, state: AppState) -> None:
        self._state = state
        self._tasks: set[asyncio.Task[None]] = set()
        self._watch: asyncio.Task[None] | None = None
        self._sighup = False

    def start(self) -> None:
        """SIGHUP reloads (where signals can be caught: the main thread of a Unix process); with MOM_CONFIG_WATCH,
        so does a change of the file."""
        loop = asyncio.get_running_loop()
        if threading.current_thread() is threading.main_thread() and hasattr(signal, "SIGHUP"):
            try:
                loop.add_signal_handler(signal.SIGHUP, self._on_sighup)
                self._sighup = True
            except (NotImplementedError, RuntimeError, ValueError) as exc:
                logger.warning("SIGHUP cannot reload the config here (%s)", type(exc).__name__)
        if self._state.settings.mom_config_watch:
            self._watch = asyncio.create_task(self._watch_file(), name="config-watch")

    async def stop(self) -> None:
        if self._sighup:
            asyncio.get_running_loop().remove_signal_handler(signal.SIGHUP)
        tasks = [*self._tasks, *([self._watch] if self._watch is not None else [])]
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)

    def _on_sighup(self) -> None:
        self._spawn(self._reload(SIGHUP))

    def _spawn(self, work: Coroutine[Any, Any, None]) -> None:
        task = asyncio.create_task(work)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _reload(self, who: str) -> None:
        state = self._state
        with contextlib.suppress(MoMError):  # refused: logged, counted and audited; the running config kept
            await state.reloader.reload(state, source="sighup", who=who)

    async def _watch_file(self) -> None:
        """Each burst of changes to the file (or, on Kubernetes, to the ConfigMap's `..data` link beside it) tries a
        reload when the bytes differ from the running config's and from the last refused ones: a file caught half
        written is refused, and the next change tries again."""
        state = self._state
        path = state.reloader.watched_file

        def concerns(change: Change, changed: str) -> bool:
            name = Path(changed).name
            return name == path.name or name.startswith("..data")

        logger.info("Watching %s for changes (MOM_CONFIG_WATCH=true)", path)
        try:
            async for _ in awatch(
                path.parent,
                watch_filter=concerns,
                debounce=WATCH_MAX_WAIT_MS,
                step=WATCH_QUIET_MS,
                recursive=False,
            ):
                with contextlib.suppress(MoMError):  # refused: logged, counted, audited; tried on the next change
                    await state.reloader.reload_if_changed(state, source="watch", who=FILE_WATCH)
        except OSError as exc:  # the folder is gone, or cannot be watched
            logger.error(
                "The config file watch stopped (%s: %s): reload with SIGHUP or /admin/reload", type(exc).__name__, exc
            )
