"""`/admin/keys`: API keys made, listed, read, changed, disabled and deleted, and what each spent (docs/keys.md).
Behind the admin token (api/admin_auth.py: 503 when ADMIN_TOKEN is unset, 401 for any other token, an API token or
key included). Every change is written to the audit table with the admin who made it; the key itself is in the
answer to its creation only, and never in a log, a record or the audit table."""

from __future__ import annotations

import time
from decimal import Decimal
from typing import Annotated, Any, Literal

from fastapi import APIRouter, Query, Request
from fastapi.responses import Response

from mom_service.api.admin_auth import Admin
from mom_service.api.schemas.keys import iso_ms, key_fields, key_json
from mom_service.api.state import AppState, StateDep
from mom_service.api.surface import ORJSONResponse, read_json
from mom_service.errors import NotFound, ServiceUnavailable
from mom_service.usage.keys import ApiKey, KeyStoreUnavailable
from mom_service.usage.money import usd
from mom_service.usage.spend import SpendUnavailable, period_bounds

router = APIRouter(prefix="/admin/keys")


def _unavailable() -> ServiceUnavailable:
    return ServiceUnavailable("The usage database is not answering; try again later.", code="database_unavailable")


def _not_found(key_id: str) -> NotFound:
    return NotFound(f"No API key has the id '{key_id}'.", code="key_not_found")


async def _found(state: AppState, key_id: str) -> ApiKey:
    try:
        key = await state.keys.store.get(key_id)
    except KeyStoreUnavailable:
        raise _unavailable() from None
    if key is None:
        raise _not_found(key_id)
    return key


@router.post("")
async def create_key(request: Request, state: StateDep, admin: Admin) -> Response:
    """A new key: 201 with its record and, this once, the key itself."""
    fields = key_fields(await read_json(request), state.config, new=True)
    try:
        key, secret = await state.keys.store.create(fields, admin)
    except KeyStoreUnavailable:
        raise _unavailable() from None
    return ORJSONResponse({**key_json(key), "key": secret}, status_code=201)


@router.get("")
async def list_keys(state: StateDep, _: Admin) -> dict[str, Any]:
    try:
        keys = await state.keys.store.all()
    except KeyStoreUnavailable:
        raise _unavailable() from None
    return {"object": "list", "data": [key_json(key) for key in keys]}


@router.get("/{key_id}")
async def get_key(key_id: str, state: StateDep, _: Admin) -> dict[str, Any]:
    return key_json(await _found(state, key_id))


@router.patch("/{key_id}")
async def update_key(key_id: str, request: Request, state: StateDep, admin: Admin) -> dict[str, Any]:
    """Any of a key's fields (`null` clears an optional one; `disabled: true` disables it)."""
    changes = key_fields(await read_json(request), state.config, new=False)
    try:
        key = await state.keys.store.update(key_id, changes, admin)
    except KeyStoreUnavailable:
        raise _unavailable() from None
    if key is None:
        raise _not_found(key_id)
    state.keys.forget(key_id)
    return key_json(key)


@router.delete("/{key_id}")
async def delete_key(key_id: str, state: StateDep, admin: Admin) -> dict[str, Any]:
    try:
        deleted = await state.keys.store.delete(key_id, admin)
    except KeyStoreUnavailable:
        raise _unavailable() from None
    if not deleted:
        raise _not_found(key_id)
    state.keys.forget(key_id)
    return {"object": "api_key", "id": key_id, "deleted": True}


@router.get("/{key_id}/spend")
async def key_spend(
    key_id: str,
    state: StateDep,
    _: Admin,
    period: Annotated[Literal["day", "month"] | None, Query(description="default: the key's budget period")] = None,
) -> dict[str, Any]:
    """What a key spent in the current UTC day or month, from the usage records (read now), against its budget."""
    key = await _found(state, key_id)
    counted = period or key.period
    start_ms, end_ms = period_bounds(counted, time.time())
    try:
        spent, requests = await state.keys.spend.between(key.id, start_ms, end_ms)
    except SpendUnavailable:
        raise _unavailable() from None
    budget = key.budget_usd if counted == key.period else None
    return {
        "object": "api_key.spend",
        "id": key.id,
        "name": key.name,
        "period": counted,
        "start": iso_ms(start_ms),
        "end": iso_ms(end_ms),
        "requests": requests,
        "spent_usd": usd(spent),
        "budget_usd": usd(budget),
        "remaining_usd": usd(max(budget - spent, Decimal(0))) if budget is not None else None,
    }
