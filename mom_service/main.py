"""The app factory: middleware, routers, error handlers, and the lifespan that builds and closes the state."""

from __future__ import annotations

import asyncio
import gc
import logging
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from functools import cache
from typing import Any
from urllib.parse import urlsplit

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.middleware.cors import CORSMiddleware
from fastapi.responses import Response
from sqlalchemy.engine import make_url
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from mom_service import __version__
from mom_service.admission import Admission, AdmissionControl
from mom_service.cache import CacheStore, MemoryCache, RedisCache, ResponseCache
from mom_service.circuit_breaker import CircuitBreakers
from mom_service.config import MoMConfig, Settings, environment, resolve_config
from mom_service.core_logic import Engine
from mom_service.endpoints import health_api, metrics_api, openai_v1
from mom_service.errors import (
    ConfigError,
    InternalError,
    InvalidRequest,
    MethodNotAllowed,
    MoMError,
    NotFound,
    PayloadTooLarge,
)
from mom_service.llm_calls import LLMCaller, configure_litellm, cost_map_entry, supports_vision
from mom_service.logs import LOGGER_NAME, setup_logging
from mom_service.metrics import Metrics
from mom_service.metrics_db import SCHEMA_VERSION, UsageWriter, create_engine, migrate
from mom_service.multimodal_utils import sees_images
from mom_service.pricing_utils import build_price_book
from mom_service.redaction import Redactor
from mom_service.request_log import RequestLog, remember_outcome
from mom_service.state import AppState
from mom_service.tracing import Tracer

logger = logging.getLogger(LOGGER_NAME)

DEMO_BANNER = (
    "No config.yaml found: running the built-in DEMO config (a mock panel through LiteLLM's mock_response: "
    "no keys, no network). To use real providers, copy config.yaml_template to config.yaml (or point MOM_CONFIG "
    "at a file), name your LLMs and the environment variables holding their keys, and restart."
)


class BodySizeLimit:
    """Refuses bodies over the limit with 413 before they are parsed: by Content-Length, or while reading."""

    def __init__(self, app: ASGIApp, max_bytes: int) -> None:
        self.app = app
        self.max_bytes = max_bytes

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        for name, value in scope["headers"]:
            if name == b"content-length":
                if not value.isdigit():
                    await InvalidRequest("Invalid Content-Length header.").to_response()(scope, receive, send)
                    return
                if int(value) > self.max_bytes:
                    await self._too_large()(scope, receive, send)
                    return
        received = 0

        async def limited_receive() -> Message:
            nonlocal received
            message = await receive()
            if message["type"] == "http.request":
                received += len(message.get("body", b""))
                if received > self.max_bytes:
                    raise self._too_large_error()
            return message

        await self.app(scope, limited_receive, send)

    def _too_large_error(self) -> PayloadTooLarge:
        return PayloadTooLarge(f"The request body is larger than the limit of {self.max_bytes} bytes.")

    def _too_large(self) -> Response:
        response = self._too_large_error().to_response()
        response.headers["Connection"] = "close"
        return response


class QuietStartupFailure:
    """Keeps a failed start-up to our one clean log line: no traceback passed on to the server's log."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "lifespan":
            await self.app(scope, receive, send)
            return

        async def quiet_send(message: Message) -> None:
            if message["type"] in ("lifespan.startup.failed", "lifespan.shutdown.failed"):
                message = {"type": message["type"], "message": ""}
            await send(message)

        await self.app(scope, receive, quiet_send)


def build_state(settings: Settings, config: MoMConfig, config_path: str | None) -> AppState:
    """Everything the app needs, built without network I/O: the database is connected by the lifespan."""
    env = environment()
    secrets = [*(t.decode() for t in settings.api_tokens)]
    secrets += [env[d.api_key_env] for d in config.llm_definitions if d.api_key_env and env.get(d.api_key_env)]
    for value in (settings.langfuse_secret_key, settings.langfuse_public_key):
        if value:
            secrets.append(value)
    database_password = make_url(settings.database_url).password
    if database_password:
        secrets.append(str(database_password))
    redis_password = urlsplit(settings.redis_url).password if settings.redis_url else None
    if redis_password:
        secrets.append(redis_password)
    redactor = Redactor(secrets)
    caller = LLMCaller(config, env, redactor, lean=settings.mom_lean_calls)
    usage_db = create_engine(settings.database_url)
    writer = UsageWriter(usage_db, max_queue=settings.mom_usage_queue_size)
    prices = build_price_book(config, cost_map_entry)
    tracer = Tracer(settings)
    breakers = CircuitBreakers(
        (d.name for d in config.llm_definitions),
        failures=settings.mom_circuit_failures,
        cooldown_s=settings.mom_circuit_cooldown_seconds,
    )
    metrics = Metrics(config, writer, breakers)
    cache = ResponseCache(cache_store(settings), config) if settings.mom_cache_enabled else None
    engine = Engine(caller, prices, [writer.submit, metrics.record, remember_outcome], tracer, breakers, cache)
    metrics.watch(engine.active)
    return AppState(
        settings=settings,
        config=config,
        config_path=config_path,
        engine=engine,
        redactor=redactor,
        started_at=int(time.time()),
        usage_db=usage_db,
        usage_writer=writer,
        tracer=tracer,
        vision={d.name: sees_images(d, supports_vision) for d in config.llm_definitions},
        metrics=metrics,
        admission=Admission(settings.mom_max_in_flight, settings.mom_rate_limit_rpm),
        cache=cache,
    )


def cache_store(settings: Settings) -> CacheStore:
    """Redis when REDIS_URL is set (shared by every replica), else in process."""
    if settings.redis_url:
        return RedisCache(settings.redis_url, settings.mom_cache_timeout_ms / 1000)
    return MemoryCache(settings.mom_cache_max_bytes)


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


async def _close(app: FastAPI, state: AppState) -> None:
    """The end of the lifespan: no new requests, the last outcomes recorded, records written, traces flushed."""
    state.admission.draining = True
    await state.engine.active.wait_idle(SETTLE_TIMEOUT_S)
    app.state.mom = None
    await state.usage_writer.close()
    logger.info("Usage records written: %d, dropped: %d", state.usage_writer.written, state.usage_writer.dropped)
    await state.engine.caller.aclose()
    await state.tracer.close()
    if state.cache is not None:
        await state.engine.aclose(CACHE_STORES_TIMEOUT_S)  # the answers being stored in the background
        await state.cache.store.close()
    await state.usage_db.dispose()


def create_app(
    settings: Settings | None = None, config: MoMConfig | None = None, config_path: str | None = None
) -> FastAPI:
    """Build the app. Nothing is read or connected here: the lifespan does that when the server starts.

    `config` is given when the caller (the CLI) has already loaded and announced it.
    """
    settings = settings or Settings()

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        setup_logging(Redactor(), log_format=settings.log_format)
        configure_litellm(settings.litellm_verbose)
        try:
            if config is None:
                loaded, path = resolve_config(settings)
                log_config(loaded, path)
            else:
                loaded, path = config, config_path
            state = build_state(settings, loaded, path)
        except ConfigError as exc:
            logger.error("Invalid config, not starting:\n%s", exc)
            raise StartupFailed from None
        setup_logging(state.redactor)
        log_warnings(state)
        database = make_url(settings.database_url).render_as_string(hide_password=True)
        try:
            async with asyncio.timeout(MIGRATION_TIMEOUT_S):
                version = await migrate(state.usage_db)
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
        app.state.mom = state
        # Everything loaded so far (LiteLLM's tables, the config, the app) lives as long as the process: moved out
        # of the garbage collector's sight, so that a full collection does not walk it again and again, pausing
        # every stream for hundreds of milliseconds under load.
        gc.collect()
        gc.freeze()
        try:
            yield
        finally:
            await _close(app, state)

    app = FastAPI(
        title="MoM Service",
        version=__version__,
        lifespan=lifespan,
        docs_url=None,
        redoc_url=None,
        openapi_url=None,
    )
    _install_error_handlers(app)
    app.include_router(openai_v1.router)
    app.include_router(metrics_api.router)
    app.include_router(metrics_api.prometheus_router)
    app.include_router(health_api.router)
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
            allow_methods=["GET", "POST", "OPTIONS"],
            allow_headers=["Authorization", "Content-Type", "Cache-Control", "X-Request-ID"],
            allow_credentials=False,
            expose_headers=["X-Request-ID"],
            max_age=600,
        )
    app.add_middleware(QuietStartupFailure)  # the lifespan only
    return app


def _install_error_handlers(app: FastAPI) -> None:
    async def on_mom_error(request: Request, exc: Exception) -> Response:
        assert isinstance(exc, MoMError)
        return exc.to_response()

    async def on_http_error(request: Request, exc: Exception) -> Response:
        assert isinstance(exc, StarletteHTTPException)
        error: MoMError
        if exc.status_code == 404:
            error = NotFound(f"No such endpoint: {request.method} {request.url.path}", code="not_found")
        elif exc.status_code == 405:
            error = MethodNotAllowed(f"Method {request.method} is not allowed on {request.url.path}.")
        else:
            error = InvalidRequest(str(exc.detail), status_code=exc.status_code)
        response = error.to_response()
        for name, value in (exc.headers or {}).items():
            response.headers[name] = value
        return response

    async def on_validation_error(request: Request, exc: Exception) -> Response:
        assert isinstance(exc, RequestValidationError)
        first: dict[str, Any] = exc.errors()[0] if exc.errors() else {}
        loc = [str(p) for p in first.get("loc", ()) if p not in ("body", "query", "path", "header")]
        param = ".".join(loc) or None
        message = f"Invalid value for '{param}': {first.get('msg', 'invalid')}."
        return InvalidRequest(message, param=param).to_response()

    async def on_unexpected(request: Request, exc: Exception) -> Response:
        logger.error("unhandled %s on %s %s", type(exc).__name__, request.method, request.url.path)
        return InternalError("The service failed to answer this request.").to_response()

    handlers: dict[Any, Callable[[Request, Exception], Awaitable[Response]]] = {
        MoMError: on_mom_error,
        StarletteHTTPException: on_http_error,
        RequestValidationError: on_validation_error,
        Exception: on_unexpected,
    }
    for exc_class, handler in handlers.items():
        app.add_exception_handler(exc_class, handler)


@cache
def _default_app() -> FastAPI:
    return create_app()


def __getattr__(name: str) -> Any:
    """`uvicorn mom_service.main:app` works; the app is built on first access, not at import."""
    if name == "app":
        return _default_app()
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
