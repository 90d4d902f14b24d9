"""The application's state: one typed object on `app.state`, reached through an Annotated dependency."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Annotated

from fastapi import Depends, Request
from sqlalchemy.ext.asyncio import AsyncEngine

from mom_service.admission import Admission
from mom_service.cache import ResponseCache
from mom_service.config import MoMConfig, MoMModelConfig, Settings
from mom_service.core_logic import Engine
from mom_service.errors import ServiceUnavailable
from mom_service.live_checks import LiveChecks
from mom_service.metrics import Metrics
from mom_service.metrics_db import UsageWriter
from mom_service.redaction import Redactor
from mom_service.tracing import Tracer


@dataclass(slots=True)
class AppState:
    settings: Settings
    config: MoMConfig
    config_path: str | None
    engine: Engine
    redactor: Redactor
    started_at: int
    usage_db: AsyncEngine
    usage_writer: UsageWriter
    tracer: Tracer
    vision: dict[str, bool]  # per LLM: can it see images
    metrics: Metrics  # Prometheus metrics of this app (its own registry)
    admission: Admission  # in-flight limit, per-token rate limit, draining at shutdown
    cache: ResponseCache | None  # None when MOM_CACHE_ENABLED=false
    llm_checks: LiveChecks = field(default_factory=LiveChecks)  # the live calls of /health/detailed?check_llm

    def accepts_images(self, model: MoMModelConfig) -> bool:
        """A MoM model accepts images when at least one panel member can see them."""
        return any(self.vision[name] for name in model.llms_to_query)


async def get_state(request: Request) -> AppState:
    state = getattr(request.app.state, "mom", None)
    if not isinstance(state, AppState):
        raise ServiceUnavailable("The service is starting or stopping.", code="service_unavailable")
    return state


StateDep = Annotated[AppState, Depends(get_state)]
