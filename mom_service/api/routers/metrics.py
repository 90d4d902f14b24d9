"""`/metrics`: every Prometheus metric, in its text format."""

from __future__ import annotations

from fastapi import APIRouter, Depends, Request
from fastapi.responses import Response

from mom_service.api.auth import require_caller
from mom_service.api.state import StateDep
from mom_service.errors import Forbidden

router = APIRouter()


async def scrape_allowed(request: Request, state: StateDep) -> None:
    """A static token (API_TOKEN), unless METRICS_PUBLIC=true opens `/metrics` to scrapers without one. Not an API
    key: the metrics count every key's requests and cost, and a key sees only its own."""
    if not state.settings.metrics_public and (await require_caller(request, state)).key is not None:
        raise Forbidden("An API key cannot read the metrics (they show every key's usage).", code="metrics_not_allowed")


@router.get("/metrics", dependencies=[Depends(scrape_allowed)])
async def prometheus_metrics(state: StateDep) -> Response:
    """Every metric in Prometheus' text format; the usage queue is read now, at scrape time."""
    return Response(content=state.metrics.exposition(), media_type=state.metrics.content_type)
