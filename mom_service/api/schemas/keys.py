"""An API key's fields as the admin API takes them (`POST /admin/keys`, `PATCH /admin/keys/{id}`) and as both it
and `mom-service keys` show a key's record. Validated in one place for both: a 400 naming the field."""

from __future__ import annotations

import time
from decimal import Decimal
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError

from mom_service.api.schemas.validation import first_error, parse_time
from mom_service.config import MoMConfig
from mom_service.errors import InvalidRequest
from mom_service.usage.keys import FIELDS, ApiKey
from mom_service.usage.money import usd

MAX_BUDGET_USD = Decimal(1_000_000)
# Fields that are always set: `null` cannot clear them
REQUIRED = frozenset({"name", "disabled"})


class KeyChanges(BaseModel):
    """A key's fields; every one optional (PATCH), `name` required to make one."""

    model_config = ConfigDict(extra="forbid")

    name: str | None = Field(default=None, min_length=1, max_length=128)
    owner: str | None = Field(default=None, max_length=128)
    models: list[str] | None = Field(default=None, max_length=1000)
    budget_usd: Decimal | None = Field(default=None, gt=0, le=MAX_BUDGET_USD)
    budget_period: Literal["day", "month"] | None = None
    rpm_limit: int | None = Field(default=None, gt=0)
    tpm_limit: int | None = Field(default=None, gt=0)
    expires_at: str | int | float | None = None  # ISO 8601 or unix seconds
    disabled: bool | None = None


def key_fields(body: Any, config: MoMConfig, *, new: bool) -> dict[str, Any]:
    """The fields a body sets (FIELDS' names, as the key store takes them); 400 when one is wrong: an unknown
    field, a MoM model that does not exist, an expiry in the past, `null` for `name` or `disabled`, no `name` for a
    new key."""
    if not isinstance(body, dict):
        raise InvalidRequest("The request body must be a JSON object.", code="invalid_request_body")
    try:
        changes = KeyChanges.model_validate(body)
    except ValidationError as exc:
        raise first_error(exc) from None
    given = {name: getattr(changes, name) for name in changes.model_fields_set}
    for name in REQUIRED & given.keys():
        if given[name] is None:
            raise InvalidRequest(f"Invalid value for '{name}': it cannot be null.", param=name, code="invalid_value")
    if new and given.get("name") is None:
        raise InvalidRequest("Missing required parameter: 'name'.", param="name", code="missing_required_parameter")
    if given.get("models") is not None:
        known = {m.name for m in config.models}
        unknown = [m for m in given["models"] if m not in known]
        if unknown:
            raise InvalidRequest(
                f"Invalid value for 'models': no MoM model is named {', '.join(repr(m) for m in unknown)}.",
                param="models",
                code="invalid_value",
            )
        given["models"] = tuple(dict.fromkeys(given["models"]))
    if "expires_at" in given:
        given["expires_ms"] = _expiry(given.pop("expires_at"))
    if new and given.get("budget_usd") is not None and given.get("budget_period") is None:
        given["budget_period"] = "month"
    assert set(given) <= set(FIELDS)
    return given


def _expiry(value: str | int | float | None) -> int | None:
    if value is None:
        return None
    seconds = parse_time(str(value), "expires_at")
    if seconds <= time.time():
        message = "Invalid value for 'expires_at': it is in the past."
        raise InvalidRequest(message, param="expires_at", code="invalid_value")
    return int(seconds * 1000)


def iso_ms(ms: int) -> str:
    """Unix milliseconds as ISO 8601, UTC, to the second."""
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(ms / 1000))


def key_json(key: ApiKey) -> dict[str, Any]:
    """A key's record as the admin API and the CLI show it (never the key)."""
    return {
        "object": "api_key",
        "id": key.id,
        "name": key.name,
        "owner": key.owner,
        "prefix": key.prefix,
        "models": list(key.models) if key.models is not None else None,
        "budget_usd": usd(key.budget_usd),
        "budget_period": key.budget_period,
        "rpm_limit": key.rpm_limit,
        "tpm_limit": key.tpm_limit,
        "expires_at": iso_ms(key.expires_ms) if key.expires_ms is not None else None,
        "disabled": key.disabled,
        "created_at": iso_ms(key.created_ms),
        "updated_at": iso_ms(key.updated_ms),
    }
