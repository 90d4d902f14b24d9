"""Config reload without a restart: `SIGHUP`, `POST /admin/reload`, or a change of the file (MOM_CONFIG_WATCH=true).

The file is read and validated first: an invalid one is refused (logged, reported, counted, audited) and the
running config kept. A valid one becomes a new engine (engine/assembly.py `successor`: the circuit breakers of the
LLMs whose definitions did not change carried over), put in place by one assignment of `state.engine`. A request
holds the engine it started with to its end, its stream included; the requests after it take the new one. Reloads
run one at a time. The settings (the environment, provider keys included) are read at start-up only: a reload does
not read them again.
"""

from __future__ import annotations

import asyncio
import hashlib
import logging
import time
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

from mom_service.config import DEFAULT_CONFIG_PATH, MoMConfig, load_config, resolve_config
from mom_service.config_changes import ConfigChanges, config_changes
from mom_service.engine.assembly import EngineOptions, successor
from mom_service.errors import WITH_TRACEBACK, ConfigError, InternalError, InvalidRequest
from mom_service.observability.logs import LOGGER_NAME
from mom_service.settings import Settings

if TYPE_CHECKING:
    from mom_service.api.state import AppState

logger = logging.getLogger(LOGGER_NAME)

SHORT_HASH = 12  # hex digits of the file's SHA-256 shown
ACTION = "config.reload"


def short(digest: str | None) -> str | None:
    return digest[:SHORT_HASH] if digest else None


def iso(unix_s: float) -> str:
    return datetime.fromtimestamp(unix_s, UTC).isoformat(timespec="milliseconds").replace("+00:00", "Z")


@dataclass(frozen=True, slots=True)
class Reloaded:
    """A reload's outcome: what runs now and what changed (nothing: `unchanged`, the same bytes)."""

    status: Literal["reloaded", "unchanged"]
    file: str | None
    digest: str | None
    previous: str | None
    loaded_at: float
    changes: ConfigChanges

    def as_dict(self) -> dict[str, Any]:
        return {
            "status": self.status,
            "file": self.file,
            "hash": short(self.digest),
            "previous_hash": short(self.previous),
            "loaded_at": iso(self.loaded_at),
            **self.changes.as_dict(),
        }


class Reloader:
    """Where the running config came from (its file, hash and load time, the reloads since start-up and the last
    refusal, as /health/detailed shows them), and the reloads themselves, one at a time."""

    def __init__(self, options: EngineOptions, config: MoMConfig, file: str | None) -> None:
        self.options = options  # the settings' part of every engine: the same for each config
        self.file = file  # None: the built-in demo config
        self.digest = config.digest
        self.loaded_at = time.time()
        self.reloads = 0  # successful reloads (with a change) since start-up
        self.last_error: str | None = None  # the last refusal, until a reload succeeds
        self._refused: str | None = None  # the hash of the last file refused: the watch does not try it again
        self._lock = asyncio.Lock()

    @property
    def watched_file(self) -> Path:
        """The file whose changes the watch follows: the running one, or for the demo the one it would read."""
        return Path(self.file or DEFAULT_CONFIG_PATH).absolute()

    async def reload(self, state: AppState, *, source: str, who: str) -> Reloaded:
        """Read, validate and put in place the config file. Raises InvalidRequest (`invalid_config`, the problems
        with their file, entry and field) when it is invalid, InternalError when the new engine cannot be built;
        either way the running config is kept. Audited either way (`who`: the admin's identity, or the trigger)."""
        async with self._lock:
            outcome = await self._attempt(state, source)
        if isinstance(outcome, Reloaded):
            await state.usage.audit(who, ACTION, {"source": source, **outcome.as_dict()})
            return outcome
        detail = {"source": source, "status": "refused", "file": self.file, "error": outcome.message}
        await state.usage.audit(who, ACTION, detail)
        raise outcome

    async def _attempt(self, state: AppState, source: str) -> Reloaded | InvalidRequest | InternalError:
        try:
            reloaded = await self._apply(state)
        except ConfigError as exc:
            refused: InvalidRequest | InternalError = InvalidRequest(
                f"The config was not reloaded (the running config is kept):\n{exc}", code="invalid_config"
            )
        except Exception as exc:  # a bug: logged with its traceback, the running config kept
            logger.error("config reload (%s) failed", source, exc_info=exc, extra=WITH_TRACEBACK)
            refused = InternalError(f"The config could not be applied ({type(exc).__name__}): the running one is kept.")
        else:
            state.metrics.reloads.labels(reloaded.status).inc()
            self._log(source, reloaded)
            return reloaded
        refused.message = self.last_error = state.redactor(refused.message)
        state.metrics.reloads.labels("refused").inc()
        logger.error("Config reload (%s) refused:\n%s", source, self.last_error)
        return refused

    async def reload_if_changed(self, state: AppState, *, source: str, who: str) -> Reloaded | None:
        """A reload when the file's bytes are neither the running config's nor the last refused ones (the file
        watch: an event that changed nothing, or a file still invalid, is not tried again); else None."""
        try:
            data = await asyncio.to_thread(self.watched_file.read_bytes)
        except OSError:
            return None  # gone for now (being replaced): the next event tells
        digest = hashlib.sha256(data).hexdigest()
        if digest in (self.digest, self._refused):
            return None
        try:
            return await self.reload(state, source=source, who=who)
        except InvalidRequest:
            self._refused = digest
            raise

    async def _apply(self, state: AppState) -> Reloaded:
        config, file = await asyncio.to_thread(self._read, state.settings)
        running = state.engine
        previous = running.config
        if file == self.file and config.digest == previous.digest:  # the file holds what runs (again)
            self.last_error = self._refused = None
            return Reloaded("unchanged", file, config.digest, previous.digest, self.loaded_at, ConfigChanges.none())
        changes = config_changes(previous, config)
        engine = successor(running, config, self.options, changes)
        state.metrics.reconfigure(config, engine.breakers)
        state.engine = engine  # the swap: requests in flight keep `running`, every later one gets `engine`
        if changes.llms:
            state.llm_checks.forget()  # live checks of the LLMs as they were
        self.file, self.digest, self.loaded_at = file, config.digest, time.time()
        self.reloads += 1
        self.last_error = self._refused = None
        return Reloaded("reloaded", file, config.digest, previous.digest, self.loaded_at, changes)

    def _read(self, settings: Settings) -> tuple[MoMConfig, str | None]:
        """The running file again; for the demo, what start-up would run now (./config.yaml, once there is one)."""
        if self.file is not None:
            return load_config(self.file), self.file
        return resolve_config(settings)

    def _log(self, source: str, reloaded: Reloaded) -> None:
        file = reloaded.file or "the built-in demo config"
        if reloaded.status == "unchanged":
            logger.info("Config reload (%s): %s unchanged (hash %s)", source, file, short(reloaded.digest))
            return
        models, llms = reloaded.changes.models, reloaded.changes.llms
        logger.info(
            "Config reloaded (%s) from %s: hash %s (was %s); MoM models %s; LLMs %s (a changed one's circuit breaker "
            "is reset)",
            *(source, file, short(reloaded.digest), short(reloaded.previous), models.summary(), llms.summary()),
        )

    def health(self) -> dict[str, Any]:
        """The config's origin, as /health/detailed shows it."""
        return {
            "file": self.file,
            "hash": short(self.digest),
            "loaded_at": iso(self.loaded_at),
            "reloads": self.reloads,
            "last_error": self.last_error,
        }
