"""`/metrics`: every Prometheus metric, in its text format."""

from __future__ import annotations

from fastapi import APIRouter, Depends, Request
from fastapi.responses import Response

from mom_service.api.auth import require_token
from mom_service.api.state import StateDep

router = APIRouter()


async def scrape_allowed(request: Request, state: StateDep) -> None:
    """The bearer token, unless METRICS_PUBLIC=true opens `/metrics` to scrapers without one."""
    if not state.settings.metrics_public:
        await require_token(request, state)


@router.get("/metrics", dependencies=[Depends(scrape_allowed)])
async def prometheus_metrics(state: StateDep) -> Response:
    """Every metric in Prometheus' text format; the usage queue is read now, at scrape time."""
    return Response(content=state.metrics.exposition(), media_type=state.metrics.content_type)
