"""The application's state: one typed object on `app.state`, reached through an Annotated dependency."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Annotated

from fastapi import Depends, Request

from mom_service.api.admission import Admission
from mom_service.api.keys import KeyGate
from mom_service.api.reload import Reloader
from mom_service.api.signing import LinkSigner
from mom_service.config import MoMConfig
from mom_service.engine.engine import Engine
from mom_service.errors import ServiceUnavailable
from mom_service.observability.live_checks import LiveChecks
from mom_service.observability.metrics import Metrics
from mom_service.observability.redaction import Redactor
from mom_service.observability.tracing import Tracer
from mom_service.progress.hub import ProgressHub
from mom_service.settings import Settings
from mom_service.usage.database import UsageDatabase
from mom_service.usage.responses_store import ResponseStore
from mom_service.usage.writer import UsageWriter


@dataclass(slots=True)
class AppState:
    settings: Settings
    # the config, the LLMs, the cache: everything an answer needs. A config reload replaces it (one assignment): a
    # request reads it once and holds that engine to its end (`engine = state.engine`), never twice.
    engine: Engine
    redactor: Redactor
    started_at: int
    usage: UsageDatabase
    usage_writer: UsageWriter
    tracer: Tracer
    metrics: Metrics  # Prometheus metrics of this app (its own registry)
    admission: Admission  # in-flight limit, draining at shutdown
    keys: KeyGate  # API keys: their records, rate limits (every caller's), budgets
    responses: ResponseStore  # stored Responses (POST /v1/responses with store: true), in the usage database
    progress: ProgressHub  # every run's progress events (GET /v1/progress/{id}), in process or in Redis
    links: LinkSigner  # the progress streams' link tokens
    reloader: Reloader  # where the running config came from, and its reloads (SIGHUP, /admin/reload, the watch)
    llm_checks: LiveChecks = field(default_factory=LiveChecks)  # the live calls of /health/detailed?check_llm

    @property
    def config(self) -> MoMConfig:
        """The running config (of the engine now: a request holds its engine's, `engine.config`)."""
        return self.engine.config

    @property
    def config_path(self) -> str | None:
        """The running config's file; None for the built-in demo config."""
        return self.reloader.file

    @property
    def tracing_enabled(self) -> bool:
        return self.tracer.enabled


async def get_state(request: Request) -> AppState:
    state = getattr(request.app.state, "mom", None)
    if not isinstance(state, AppState):
        raise ServiceUnavailable("The service is starting or stopping.", code="service_unavailable")
    return state


StateDep = Annotated[AppState, Depends(get_state)]
