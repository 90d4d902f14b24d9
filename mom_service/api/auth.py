"""Token check (a bearer token, or `x-api-key`): 503 when no token is configured (never open), 401 otherwise,
constant-time on bytes.

A caller is known by a hash of its token (never the token itself): the response cache keeps each caller's
answers apart (unless a MoM model shares them), and per-token limits count by it.
"""

from __future__ import annotations

import hashlib
import hmac
from typing import Annotated

from fastapi import Depends, Request

from mom_service.api.state import StateDep
from mom_service.errors import AuthenticationFailed, ServiceUnavailable

_CHALLENGE = {"WWW-Authenticate": "Bearer"}


def caller_id(token: bytes) -> str:
    """Who is asking, as a hash of their token: stable across replicas and restarts, and reveals nothing."""
    return hashlib.sha256(b"mom-caller:" + token).hexdigest()[:32]


def presented_token(request: Request) -> bytes:
    """The token the request carries: a bearer token, else an `x-api-key` header (as Anthropic's clients send it);
    empty when it carries neither."""
    scheme, _, value = request.headers.get("authorization", "").partition(" ")
    if scheme.lower() == "bearer" and value.strip():
        return value.strip().encode()
    return request.headers.get("x-api-key", "").strip().encode()


async def require_token(request: Request, state: StateDep) -> str:
    """The caller's identity (`caller_id`), once its token is one of API_TOKEN's."""
    tokens = state.settings.api_tokens
    if not tokens:
        raise ServiceUnavailable(
            "The service is misconfigured: no API_TOKEN is set, so protected endpoints are closed.",
            code="service_misconfigured",
        )
    presented = presented_token(request)
    if not presented:
        raise AuthenticationFailed(
            "Missing API token: send 'Authorization: Bearer <API_TOKEN>' (or 'x-api-key: <API_TOKEN>').",
            headers=_CHALLENGE,
        )
    matched = False
    for token in tokens:  # compare with every token, so timing does not tell which one nearly matched
        matched |= hmac.compare_digest(presented, token)
    if not matched:
        raise AuthenticationFailed("Incorrect API token.", headers=_CHALLENGE)
    return caller_id(presented)


Authorized = Annotated[str, Depends(require_token)]


async def within_rate_limit(request: Request, state: StateDep) -> None:
    """After `Authorized`: one request against the bearer token's per-minute limit (MOM_RATE_LIMIT_RPM)."""
    if state.admission.rpm:
        await state.admission.hit(presented_token(request))


RateLimitedToken = Annotated[None, Depends(within_rate_limit)]
