"""Health checks: readiness, and the detailed report of every component (config, database, cache, tracing, LLMs).

Every component is checked anew for each report, except the LLMs' live calls (`check_llm=true`), which are billed:
one run at a time, its results reused for a minute (live_checks.py).

Nothing here may leak a secret. The database is named by its backend only, never its URL; error texts are redacted
and stripped of URLs and of every configured `api_base`; the tracing host is not shown at all.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from functools import partial
from typing import Any, Literal, Protocol

from mom_service.cache.stores import MemoryCache
from mom_service.config import LLMDefinition, MoMConfig
from mom_service.engine.engine import Engine
from mom_service.observability.live_checks import LiveChecks, Ping, PingRun
from mom_service.observability.redaction import Redactor
from mom_service.observability.redaction import scrub as scrub_text
from mom_service.progress.hub import ProgressHub
from mom_service.providers.caller import LLMCaller
from mom_service.providers.circuit_breaker import CircuitBreakers, CircuitView
from mom_service.providers.errors import LLMCallError
from mom_service.providers.local_servers import LocalServers
from mom_service.usage.database import UsageDatabase
from mom_service.usage.writer import UsageWriter

Status = Literal["ok", "degraded", "error"]
KeyState = Literal["present", "missing", "not_needed"]

LLM_CHECK_MAX_S = 10.0
# A component that is down makes the whole service `error` (503); any other one only `degraded`.
CRITICAL = frozenset({"config", "database"})

_PING_PARAMS: Mapping[str, Any] = {"max_tokens": 1}
_MAX_ERROR_CHARS = 200


@dataclass(slots=True)
class Component:
    status: Status
    latency_ms: float
    details: dict[str, Any] = field(default_factory=dict)

    def as_dict(self) -> dict[str, Any]:
        return {"status": self.status, "latency_ms": self.latency_ms, **self.details}


def _elapsed_ms(started: float) -> float:
    return round((time.perf_counter() - started) * 1000, 1)


class ConfigOrigin(Protocol):
    """Where the running config came from (api/reload.py's Reloader)."""

    last_error: str | None

    def health(self) -> dict[str, Any]:
        """`file` (None: the demo), `hash`, `loaded_at`, `reloads`, `last_error`."""


class Sources(Protocol):
    """What the report reads (the app's state has it all). `engine` is read once per report: a config reload
    meanwhile does not mix two configs in one report."""

    engine: Engine

    @property
    def reloader(self) -> ConfigOrigin: ...

    redactor: Redactor
    usage: UsageDatabase
    usage_writer: UsageWriter
    progress: ProgressHub

    @property
    def tracing_enabled(self) -> bool: ...


class RateLimitSource(Protocol):
    """The rate limits (api/rate_limits.py): where they are counted."""

    async def check(self) -> dict[str, Any]:
        """`status` (ok, degraded), `backend` (redis, per_replica), and `reason` when per replica."""
        ...


async def check_rate_limits(limits: RateLimitSource) -> Component:
    """Where the rate limits are counted: in Redis (shared by every replica), or per replica (REDIS_URL unset, or
    Redis not answering: `degraded`)."""
    started = time.perf_counter()
    details = await limits.check()
    status = details.pop("status")
    return Component(status, _elapsed_ms(started), details)


class Scrubber:
    """Makes an error text safe to show: every configured `api_base` named as such, then `redaction.scrub` (secrets
    redacted, URLs, hosts, addresses, paths and variable names removed, one short line)."""

    def __init__(self, state: Sources, engine: Engine) -> None:
        self._redact = state.redactor
        bases = {d.api_base.rstrip("/") for d in engine.config.llm_definitions if d.api_base}
        self._bases = sorted(bases, key=len, reverse=True)

    def __call__(self, message: str) -> str:
        for base in self._bases:
            message = message.replace(base, "<api_base>")
        return scrub_text(message, self._redact)[:_MAX_ERROR_CHARS]


# ---------------------------------------------------------------------------------------- database, cache


async def check_database(state: Sources, scrub: Callable[[str], str]) -> Component:
    latency_ms, error = await state.usage.probe()
    writer = state.usage_writer
    details: dict[str, Any] = {
        "backend": state.usage.backend,
        "schema_ready": writer.schema_ready,
        "queue_depth": writer.depth,
        "dropped": writer.dropped,
    }
    if error is not None:
        details["error"] = scrub(error)
    return Component("error" if error else "ok", latency_ms, details)


async def check_cache(engine: Engine) -> Component:
    """The response cache: `none` when off; Redis is pinged (bounded), and `degraded` when down or failing lately."""
    started = time.perf_counter()
    cache = engine.cache
    if cache is None:
        return Component("ok", 0.0, {"backend": "none"})
    store = cache.store
    details: dict[str, Any] = {"backend": store.backend}
    if isinstance(store, MemoryCache):
        details.update(entries=len(store), bytes=store.size, max_bytes=store.max_bytes)
    error = await store.check()
    if error is not None:
        details["error"] = error
    return Component("degraded" if error else "ok", _elapsed_ms(started), details)


async def check_progress(state: Sources) -> Component:
    """The progress stream's hub: Redis is pinged (bounded), and `degraded` when down or failing lately (answers go
    on; only progress is lost)."""
    started = time.perf_counter()
    details, error = await state.progress.check()
    if error is not None:
        details["error"] = error
    return Component("degraded" if error else "ok", _elapsed_ms(started), details)


async def readiness(usage: UsageDatabase | None, *, draining: bool, local: LocalServers | None = None) -> str | None:
    """None when the service is ready to answer, else a short reason (shown without auth: nothing specific but the
    names of the local LLMs whose servers do not answer yet, never their addresses)."""
    if usage is None:
        return "starting or stopping"
    if draining:
        return "shutting down"
    _, error = await usage.probe()
    if error is not None:
        return "database unavailable"
    waiting = await local.not_answering() if local is not None else []
    if waiting:
        names = ", ".join(f"'{name}'" for name in waiting)
        return f"waiting for the server of the local LLM {names}"
    return None


# --------------------------------------------------------------------------------------------------- LLMs


def key_state(caller: LLMCaller, llm: LLMDefinition) -> KeyState:
    if not llm.api_key_env:
        return "not_needed"
    return "missing" if caller.missing_key(llm) is not None else "present"


def circuit_details(view: CircuitView) -> dict[str, Any]:
    details: dict[str, Any] = {"state": view.state, "consecutive_failures": view.consecutive_failures}
    if view.retry_in_s is not None:
        details["retry_in_s"] = view.retry_in_s
    return details


async def ping_llm(caller: LLMCaller, llm: LLMDefinition, scrub: Callable[[str], str]) -> Ping:
    """One single-token call (no retry), bounded by min(its timeout, 10 s)."""
    started = time.perf_counter()
    bound = min(llm.timeout, LLM_CHECK_MAX_S)
    error: str | None = None
    try:
        async with asyncio.timeout(bound):
            await caller.complete(llm, [{"role": "user", "content": "ping"}], _PING_PARAMS, retries=0)
    except TimeoutError:
        error = f"timed out after {bound:g} s"
    except LLMCallError as exc:
        error = scrub(exc.message)
    except Exception as exc:  # a bug in a provider adapter must not break the report
        error = type(exc).__name__
    return Ping(_elapsed_ms(started), error)


async def ping_llms(caller: LLMCaller, llms: Sequence[LLMDefinition], scrub: Callable[[str], str]) -> PingRun:
    """A live call to every LLM that has its key (a missing key is reported, never called), concurrently."""
    started_at, started = time.time(), time.monotonic()
    called = [llm for llm in llms if key_state(caller, llm) != "missing"]
    pings = await asyncio.gather(*(ping_llm(caller, llm, scrub) for llm in called))
    return PingRun(started_at, started, {llm.name: ping for llm, ping in zip(called, pings, strict=True)})


def llm_component(
    caller: LLMCaller, llm: LLMDefinition, *, breakers: CircuitBreakers | None = None, run: PingRun | None = None
) -> Component:
    """The LLM's configuration, key and circuit as they are now; with `run`, its live call's result in that run.

    An open (or half-open) circuit makes the LLM `degraded`: requests skip it until a probe succeeds. A live call
    that failed makes it `error`; its `latency_ms` is that call's, `checked_at` and `checked_age_s` say when it was.
    """
    key = key_state(caller, llm)
    details: dict[str, Any] = {
        "configured": llm.model,
        "client": "lean" if caller.is_lean(llm) else "litellm",
        "key": key,
        "checked": False,
    }
    circuit = breakers.view(llm.name) if breakers is not None and breakers.enabled else None
    if circuit is not None:
        details["circuit"] = circuit_details(circuit)
    circuit_open = circuit is not None and circuit.state != "closed"
    if key == "missing":
        details["error"] = "no API key: the environment variable its api_key_env names is not set"
        return Component("degraded", 0.0, details)
    ping = run.pings.get(llm.name) if run is not None else None
    if run is None or ping is None:
        return Component("degraded" if circuit_open else "ok", 0.0, details)
    details.update(checked=True, checked_at=_iso(run.started_at), checked_age_s=round(run.age_s(), 1))
    if ping.error is not None:
        details["error"] = ping.error
        return Component("error", ping.latency_ms, details)
    return Component("degraded" if circuit_open else "ok", ping.latency_ms, details)


def _iso(unix_s: float) -> str:
    return datetime.fromtimestamp(unix_s, UTC).isoformat(timespec="seconds").replace("+00:00", "Z")


# ------------------------------------------------------------------------------------------------- report


def overall(components: Mapping[str, Component]) -> Status:
    if any(c.status == "error" for name, c in components.items() if name in CRITICAL):
        return "error"
    if any(c.status != "ok" for c in components.values()):
        return "degraded"
    return "ok"


async def _live_results(engine: Engine, live: LiveChecks | None, scrub: Callable[[str], str]) -> PingRun | None:
    if live is None:
        return None
    return await live.results(partial(ping_llms, engine.caller, engine.config.llm_definitions, scrub))


def config_component(state: Sources, config: MoMConfig) -> Component:
    """The running config: its origin (file, hash, when it was loaded, the reloads; `degraded` while the file's
    last reload was refused: the file no longer holds what runs, and a restart would fail), and what it serves."""
    origin = state.reloader.health()
    details = {
        "demo": origin["file"] is None,
        **origin,
        "mom_model_count": len(config.models),
        "mom_models": [m.name for m in config.models],
        "llm_count": len(config.llm_definitions),
        "llms": [d.name for d in config.llm_definitions],
    }
    return Component("degraded" if state.reloader.last_error else "ok", 0.0, details)


async def detailed_report(
    state: Sources, *, live: LiveChecks | None = None, rate_limits: RateLimitSource | None = None
) -> dict[str, Any]:
    """`{"status", "components": {name: {"status", "latency_ms", ...}}}`, each component checked now, concurrently;
    with `live`, the LLMs' live calls too (their results reused from `live`'s last run while it is recent)."""
    engine = state.engine
    scrub = Scrubber(state, engine)
    database, cache, progress, run, limits = await asyncio.gather(
        check_database(state, scrub),
        check_cache(engine),
        check_progress(state),
        _live_results(engine, live, scrub),
        check_rate_limits(rate_limits) if rate_limits is not None else asyncio.sleep(0, None),
    )
    components: dict[str, Component] = {
        "config": config_component(state, engine.config),
        "database": database,
        "cache": cache,
        "progress": progress,
        "tracing": Component("ok", 0.0, {"enabled": state.tracing_enabled}),
    }
    if limits is not None:
        components["rate_limits"] = limits
    for llm in engine.config.llm_definitions:
        components[f"llm:{llm.name}"] = llm_component(engine.caller, llm, breakers=engine.breakers, run=run)
    return {"status": overall(components), "components": {n: c.as_dict() for n, c in components.items()}}
