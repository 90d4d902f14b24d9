"""The app factory: the state built from the settings and the config, the middleware, the routers, the error
handlers, and the lifespan that connects, starts and closes it all."""

from __future__ import annotations

import asyncio
import gc
import logging
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager, nullcontext
from typing import TYPE_CHECKING
from urllib.parse import urlsplit

from fastapi import FastAPI
from fastapi.middleware.cors import CORSMiddleware

from mom_service import __version__
from mom_service.api.admission import Admission, AdmissionControl
from mom_service.api.errors import install_error_handlers
from mom_service.api.keys import KeyGate
from mom_service.api.middleware import BodySizeLimit, QuietStartupFailure
from mom_service.api.rate_limits import RateLimits
from mom_service.api.reload import Reloader
from mom_service.api.reload_triggers import ReloadTriggers
from mom_service.api.routers import (
    admin,
    admin_keys,
    anthropic,
    health,
    metrics,
    models,
    openai_chat,
    progress,
    responses,
    usage,
)
from mom_service.api.routers.ui import ui_router
from mom_service.api.signing import LinkSigner
from mom_service.api.state import AppState
from mom_service.cache.stores import CacheStore, MemoryCache, RedisCache
from mom_service.config import MoMConfig, resolve_config
from mom_service.engine.assembly import EngineOptions, build_engine, key_values
from mom_service.engine.plan import ImagePolicy
from mom_service.errors import ConfigError
from mom_service.observability.logs import LOGGER_NAME, setup_logging
from mom_service.observability.metrics import Metrics
from mom_service.observability.redaction import Redactor
from mom_service.observability.request_log import RequestLog, remember_outcome
from mom_service.observability.tracing import Tracer
from mom_service.progress.hub import Limits, MemoryHub, ProgressHub
from mom_service.progress.redis_hub import RedisHub
from mom_service.settings import Settings, environment
from mom_service.usage.database import UsageDatabase, url_password
from mom_service.usage.keys import KeyStore
from mom_service.usage.responses_store import ResponseStore
from mom_service.usage.schema import SCHEMA_VERSION
from mom_service.usage.spend import SpendTracker
from mom_service.usage.writer import UsageWriter

if TYPE_CHECKING:
    from mcp.server.mcpserver import MCPServer

logger = logging.getLogger(LOGGER_NAME)

DEMO_BANNER = (
    "No config.yaml found: running the built-in DEMO config (a mock panel through LiteLLM's mock_response: "
    "no keys, no network). To use real providers, copy config.yaml_template to config.yaml (or point MOM_CONFIG "
    "at a file), name your LLMs and the environment variables holding their keys, and restart."
)


def build_state(settings: Settings, config: MoMConfig, config_path: str | None) -> AppState:
    """Everything the app needs, built without network I/O: the database is connected by the lifespan."""
    env = environment()
    secrets = [*(t.decode() for t in settings.api_tokens), *(t.decode() for t in settings.admin_tokens)]
    secrets += key_values(config, env)
    secrets += [s for s in (settings.langfuse_secret_key, settings.langfuse_public_key) if s]
    secrets += [key.get_secret_value() for key in (settings.mom_signing_key, settings.mom_mcp_token) if key]
    secrets += [s for s in (url_password(settings.database_url), _redis_password(settings.redis_url)) if s]
    redactor = Redactor(secrets)
    usage = UsageDatabase(settings.database_url)
    writer = UsageWriter(usage.engine, max_queue=settings.mom_usage_queue_size)
    tracer = Tracer(settings)
    options = EngineOptions(
        env=env,
        redactor=redactor,
        lean_calls=settings.mom_lean_calls,
        circuit_failures=settings.mom_circuit_failures,
        circuit_cooldown_s=settings.mom_circuit_cooldown_seconds,
        images=ImagePolicy(
            max_images=settings.mom_max_images,
            allow_private=settings.mom_allow_private_image_urls,
            max_bytes=settings.mom_max_image_bytes,
            fetch_timeout_s=settings.mom_image_fetch_timeout_seconds,
        ),
        cache_store=cache_store(settings) if settings.mom_cache_enabled else None,
        tracer=tracer,
        litellm_verbose=settings.litellm_verbose,
    )
    engine = build_engine(config, options)
    metrics = Metrics(config, writer, engine.breakers, max_keys=settings.mom_metrics_max_keys)
    metrics.watch(engine.active)
    keys = KeyGate(
        KeyStore(usage.engine),
        SpendTracker(usage.engine, writer, settings.mom_key_spend_cache_seconds),
        RateLimits(settings.redis_url, settings.mom_rate_limit_timeout_ms / 1000),
        settings,
    )
    # the keys' recorder right after the writer's: a reserved request's record has just been queued
    engine.add_recorders(writer.submit, keys.record, metrics.record, remember_outcome)
    return AppState(
        settings=settings,
        engine=engine,
        redactor=redactor,
        started_at=int(time.time()),
        usage=usage,
        usage_writer=writer,
        tracer=tracer,
        metrics=metrics,
        admission=Admission(settings.mom_max_in_flight),
        keys=keys,
        responses=ResponseStore(usage.engine, settings.mom_responses_ttl_days),
        progress=progress_hub(settings),
        links=LinkSigner.from_settings(settings),
        reloader=Reloader(options, config, config_path),
    )


def _redis_password(url: str | None) -> str | None:
    return urlsplit(url).password if url else None


def cache_store(settings: Settings) -> CacheStore:
    """Redis when REDIS_URL is set (shared by every replica), else in process."""
    if settings.redis_url:
        return RedisCache(settings.redis_url, settings.mom_cache_timeout_ms / 1000)
    return MemoryCache(settings.mom_cache_max_bytes)


def progress_hub(settings: Settings) -> ProgressHub:
    """Redis when REDIS_URL is set (every replica reads every run), else in process."""
    limits = Limits(
        ttl_s=settings.mom_progress_ttl_seconds,
        max_deltas=settings.mom_progress_max_deltas,
        max_subscribers=settings.mom_progress_max_subscribers,
        max_runs=settings.mom_progress_max_runs,
    )
    return RedisHub(settings.redis_url, limits) if settings.redis_url else MemoryHub(limits)


def log_config(config: MoMConfig, config_path: str | None) -> None:
    """The first lines: which config runs (and, for the demo, how to configure real providers)."""
    if config_path is None:
        logger.warning(DEMO_BANNER)
    else:
        logger.info("Loaded config %s", config_path)
    logger.info(
        "MoM models: %s; LLMs: %s",
        ", ".join(m.name for m in config.models),
        ", ".join(d.name for d in config.llm_definitions),
    )


def log_warnings(state: AppState) -> None:
    if not state.settings.api_tokens:
        logger.warning("API_TOKEN is not set: protected endpoints answer 503 service_misconfigured until it is.")
    for llm in state.config.llm_definitions:
        if llm.api_key_env and state.engine.caller.missing_key(llm) is not None:
            logger.warning(
                "LLM '%s': environment variable %s is not set; its calls will fail", llm.name, llm.api_key_env
            )


MIGRATION_TIMEOUT_S = 15.0


class StartupFailed(Exception):
    """Start-up cannot go on; the reason has been logged."""


# At shutdown, how long requests cancelled by the server get to record their outcome before the writer closes.
SETTLE_TIMEOUT_S = 5.0
# ... and how long the cache stores still running in the background get before the cache closes.
CACHE_STORES_TIMEOUT_S = 2.0


async def close_state(state: AppState, app: FastAPI | None = None) -> None:
    """The end of the lifespan (or of `mom-service mcp`): no new requests, the last outcomes recorded, records
    written, traces flushed."""
    state.admission.draining = True
    await state.engine.active.wait_idle(SETTLE_TIMEOUT_S)
    if app is not None:
        app.state.mom = None
    await state.keys.close()
    await state.usage_writer.close()
    logger.info("Usage records written: %d, dropped: %d", state.usage_writer.written, state.usage_writer.dropped)
    await state.engine.caller.aclose()
    await state.tracer.close()
    if state.engine.cache is not None:
        await state.engine.aclose(CACHE_STORES_TIMEOUT_S)  # the answers being stored in the background
        await state.engine.cache.store.close()
    await state.progress.close()
    await state.usage.dispose()


async def open_state(settings: Settings, config: MoMConfig | None, config_path: str | None) -> AppState:
    """The start of the lifespan (or of `mom-service mcp`): the config (unless the CLI loaded it), the state, the
    usage database migrated (or, when it does not answer, records queued until it does), the writer started."""
    setup_logging(Redactor(), log_format=settings.log_format)
    try:
        if config is None:
            config, config_path = resolve_config(settings)
            log_config(config, config_path)
        state = build_state(settings, config, config_path)
    except ConfigError as exc:
        logger.error("Invalid config, not starting:\n%s", exc)
        raise StartupFailed from None
    setup_logging(state.redactor)
    log_warnings(state)
    database = state.usage.display_url
    try:
        async with asyncio.timeout(MIGRATION_TIMEOUT_S):
            version = await state.usage.migrate()
    except Exception as exc:
        # Answers do not need the database: start anyway, keep records queued, and let the writer
        # migrate and write once the database answers. Health reports the database as down meanwhile.
        logger.error(
            "Usage database %s is not usable (%s): starting without it; records are queued until it answers",
            database,
            state.redactor(str(exc)) or type(exc).__name__,
        )
    else:
        state.usage_writer.schema_ready = True
        logger.info("Usage database %s (schema version %d, was %d)", database, SCHEMA_VERSION, version)
    state.usage_writer.start()
    return state


def create_app(
    settings: Settings | None = None, config: MoMConfig | None = None, config_path: str | None = None
) -> FastAPI:
    """Build the app. Nothing is read or connected here: the lifespan does that when the server starts.

    `config` is given when the caller (the CLI) has already loaded and announced it.
    """
    settings = settings or Settings()
    mcp: MCPServer | None = None

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        state = await open_state(settings, config, config_path)
        app.state.mom = state
        reloading = ReloadTriggers(state)  # SIGHUP, and the file watch (MOM_CONFIG_WATCH)
        reloading.start()
        # Everything loaded so far (LiteLLM's tables, the config, the app) lives as long as the process: moved out
        # of the garbage collector's sight, so that a full collection does not walk it again and again, pausing
        # every stream for hundreds of milliseconds under load.
        gc.collect()
        gc.freeze()
        try:
            async with mcp.session_manager.run() if mcp is not None else nullcontext():
                yield
        finally:
            await reloading.stop()
            await close_state(state, app)

    app = FastAPI(
        title="MoM Service", version=__version__, lifespan=lifespan, docs_url=None, redoc_url=None, openapi_url=None
    )
    install_error_handlers(app)
    routers = (
        *(openai_chat.router, anthropic.router, responses.router, progress.router),
        *(models.router, usage.router, metrics.router, admin_keys.router),
    )
    for router in (*routers, health.router, admin.router):
        app.include_router(router)
    if settings.mom_ui_enabled:
        app.include_router(ui_router())
    if settings.mom_mcp_enabled:
        from mom_service.api.mcp import add_mcp  # the MCP SDK is imported only when the server is on

        mcp = add_mcp(app, settings)
    _add_middleware(app, settings)
    return app


def _add_middleware(app: FastAPI, settings: Settings) -> None:
    # The last added is the outermost.
    app.add_middleware(BodySizeLimit, max_bytes=settings.mom_max_body_bytes)
    app.add_middleware(AdmissionControl)
    app.add_middleware(RequestLog, settings=settings)
    if settings.cors_origins:
        # Around everything that answers: the refusals the middleware above send themselves (413, 429
        # over_capacity, 503 shutting_down, the request log's 500) carry the CORS headers too, so that a browser
        # sees the status and its error rather than an opaque failure. Preflights are answered here, unlogged.
        app.add_middleware(
            CORSMiddleware,
            allow_origins=settings.cors_origins,
            allow_methods=["GET", "POST", "PATCH", "DELETE", "OPTIONS"],
            allow_headers=[
                *("Authorization", "Content-Type", "Cache-Control", "X-Request-ID"),
                *("X-Api-Key", "Anthropic-Version", "Anthropic-Beta"),  # Anthropic's clients
                *("Mcp-Protocol-Version", "Mcp-Session-Id", "Last-Event-ID"),  # MCP's clients (/mcp)
            ],
            allow_credentials=False,
            expose_headers=["X-Request-ID", "X-MoM-Request-Id", "X-MoM-Progress-Url"],
            max_age=600,
        )
    app.add_middleware(QuietStartupFailure)  # the lifespan only
