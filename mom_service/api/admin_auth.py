"""The admin API's own token (`ADMIN_TOKEN`, bearer): never open. Unset, every `/admin/` endpoint answers 503
`admin_disabled`; a missing or wrong token is a 401, an API token or a key included (they are not admin tokens).
Constant-time on bytes, as the API's own check (api/auth.py)."""

from __future__ import annotations

import hashlib
import hmac
from typing import Annotated

from fastapi import Depends, Request

from mom_service.api.auth import presented_token
from mom_service.api.state import StateDep
from mom_service.errors import AuthenticationFailed, ServiceUnavailable

_CHALLENGE = {"WWW-Authenticate": "Bearer"}


def admin_id(token: bytes) -> str:
    """Who acted, for the audit table: a hash of the admin token (several may be set, for rotation), never it."""
    return "admin:" + hashlib.sha256(b"mom-admin:" + token).hexdigest()[:16]


async def require_admin(request: Request, state: StateDep) -> str:
    """The admin's identity (`admin_id`), once its bearer token is one of ADMIN_TOKEN's."""
    tokens = state.settings.admin_tokens
    if not tokens:
        raise ServiceUnavailable(
            "The admin API is off: set ADMIN_TOKEN to use it.",
            code="admin_disabled",
        )
    presented = presented_token(request)
    if not presented:
        raise AuthenticationFailed(
            "Missing admin token: send 'Authorization: Bearer <ADMIN_TOKEN>'.", headers=_CHALLENGE
        )
    matched = False
    for token in tokens:  # compare with every token, so timing does not tell which one nearly matched
        matched |= hmac.compare_digest(presented, token)
    if not matched:
        raise AuthenticationFailed("Incorrect admin token.", headers=_CHALLENGE)
    return admin_id(presented)


Admin = Annotated[str, Depends(require_admin)]
