"""Health endpoints.

`/health` and `/health/live`: liveness, fast, no I/O, no auth, reveal nothing. `/health/ready`: no auth; ready when
the config is loaded, the usage database answers and every local LLM's server answers (providers/local_servers.py).
`/health/detailed[?check_llm=true]`: bearer; every component, checked for each report, except the LLMs' billed live
calls: one run at a time, reused for 60 s (observability/live_checks.py).
"""

from __future__ import annotations

from typing import Annotated, Any

from fastapi import APIRouter, Query, Request
from fastapi.responses import JSONResponse

from mom_service.api.auth import Authorized
from mom_service.api.state import AppState, StateDep
from mom_service.observability import health

router = APIRouter()

_NO_STORE = {"Cache-Control": "no-store"}


def _json(body: dict[str, Any], status_code: int = 200) -> JSONResponse:
    return JSONResponse(body, status_code=status_code, headers=_NO_STORE)


@router.get("/health")
async def liveness() -> dict[str, str]:
    return {"status": "ok"}


@router.get("/health/live")
async def live() -> dict[str, str]:
    return {"status": "ok"}


@router.get("/health/ready")
async def ready(request: Request) -> JSONResponse:
    state = getattr(request.app.state, "mom", None)
    if isinstance(state, AppState):
        local = state.engine.caller.local_servers
        reason = await health.readiness(state.usage, draining=state.admission.draining, local=local)
    else:
        reason = await health.readiness(None, draining=False)
    if reason is None:
        return _json({"status": "ready"})
    return _json({"status": "not_ready", "reason": reason}, 503)


@router.get("/health/detailed")
async def detailed(
    state: StateDep,
    _: Authorized,
    check_llm: Annotated[
        bool, Query(description="one single-token call to every LLM (billed; results reused for 60 s)")
    ] = False,
) -> JSONResponse:
    live = state.llm_checks if check_llm else None
    report = await health.detailed_report(state, live=live, rate_limits=state.keys.limits)
    return _json(report, 503 if report["status"] == "error" else 200)
