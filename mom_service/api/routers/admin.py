"""The admin API (`/admin/...`), behind its own token (ADMIN_TOKEN: api/admin_auth.py): `POST /admin/reload`."""

from __future__ import annotations

from fastapi import APIRouter
from fastapi.responses import JSONResponse

from mom_service.api.admin_auth import Admin
from mom_service.api.state import StateDep

router = APIRouter(prefix="/admin")


@router.post("/reload")
async def reload_config(state: StateDep, who: Admin) -> JSONResponse:
    """Reload the config file: 200 with what changed (or `unchanged`); 400 `invalid_config` with its problems when
    the file is invalid, the running config kept (api/reload.py)."""
    reloaded = await state.reloader.reload(state, source="admin", who=who)
    return JSONResponse(reloaded.as_dict(), headers={"Cache-Control": "no-store"})
