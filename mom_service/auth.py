"""Bearer-token check: 503 when no token is configured (never open), 401 otherwise, constant-time on bytes."""

from __future__ import annotations

import hmac
from typing import Annotated

from fastapi import Depends, Request

from mom_service.errors import AuthenticationFailed, ServiceUnavailable
from mom_service.state import StateDep

_CHALLENGE = {"WWW-Authenticate": "Bearer"}


async def require_token(request: Request, state: StateDep) -> None:
    tokens = state.settings.api_tokens
    if not tokens:
        raise ServiceUnavailable(
            "The service is misconfigured: no API_TOKEN is set, so protected endpoints are closed.",
            code="service_misconfigured",
        )
    scheme, _, value = request.headers.get("authorization", "").partition(" ")
    presented = value.strip().encode()
    if scheme.lower() != "bearer" or not presented:
        raise AuthenticationFailed(
            "Missing bearer token: send 'Authorization: Bearer <API_TOKEN>'.", headers=_CHALLENGE
        )
    matched = False
    for token in tokens:  # compare with every token, so timing does not tell which one nearly matched
        matched |= hmac.compare_digest(presented, token)
    if not matched:
        raise AuthenticationFailed("Incorrect API token.", headers=_CHALLENGE)


Authorized = Annotated[None, Depends(require_token)]


async def within_rate_limit(request: Request, state: StateDep) -> None:
    """After `Authorized`: one request against the bearer token's per-minute limit (MOM_RATE_LIMIT_RPM)."""
    if state.admission.rpm:
        _, _, token = request.headers.get("authorization", "").partition(" ")
        await state.admission.hit(token.strip().encode())


RateLimitedToken = Annotated[None, Depends(within_rate_limit)]
