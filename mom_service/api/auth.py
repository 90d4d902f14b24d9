"""Who asks: a static token (API_TOKEN, a comma-separated list) or an API key (docs/keys.md), as a bearer token or
`x-api-key`. 503 when neither API_TOKEN nor a valid key is there (never open), 401 otherwise; constant-time on bytes
for the static tokens, and a static token never costs a database round trip (keys are tried after them).

A caller is known by a hash of its token (never the token itself): the response cache keeps each caller's answers
apart (unless a MoM model shares them), stored responses and usage records are their caller's, and per-token
limits count by it (a key's, by the key's id).
"""

from __future__ import annotations

import hashlib
import hmac
import time
from typing import Annotated

from fastapi import Depends, Request

from mom_service.api.keys import Caller, usable
from mom_service.api.state import StateDep
from mom_service.errors import AuthenticationFailed, ServiceUnavailable
from mom_service.observability.request_log import ANSWER_HEADERS
from mom_service.usage.keys import looks_like_key

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


async def require_caller(request: Request, state: StateDep) -> Caller:
    """The caller, once its token is one of API_TOKEN's or a key that is neither disabled nor expired."""
    tokens = state.settings.api_tokens
    presented = presented_token(request)
    if presented:
        matched = False
        for token in tokens:  # compare with every token, so timing does not tell which one nearly matched
            matched |= hmac.compare_digest(presented, token)
        if matched:
            return Caller(caller_id(presented))
        if looks_like_key(presented):
            key = await state.keys.key_of(presented)
            if key is not None:
                return Caller(caller_id(presented), usable(key, int(time.time() * 1000)))
    if not tokens:
        raise ServiceUnavailable(
            "The service is misconfigured: no API_TOKEN is set, so protected endpoints are closed to all but API keys.",
            code="service_misconfigured",
        )
    if not presented:
        raise AuthenticationFailed(
            "Missing API token: send 'Authorization: Bearer <API_TOKEN>' (or 'x-api-key: <API_TOKEN>').",
            headers=_CHALLENGE,
        )
    raise AuthenticationFailed("Incorrect API token.", headers=_CHALLENGE)


Identified = Annotated[Caller, Depends(require_caller)]


async def require_token(caller: Identified) -> str:
    """The caller's identity (`caller_id`), for the endpoints that need no more of it."""
    return caller.id


Authorized = Annotated[str, Depends(require_token)]


async def within_rate_limit(request: Request, state: StateDep, caller: Identified) -> None:
    """After authentication: one request against the caller's per-minute limits (its key's, else
    MOM_RATE_LIMIT_RPM); the rate-limit headers kept for its answer."""
    headers = await state.keys.admit_rate(caller)
    if headers:
        setattr(request.state, ANSWER_HEADERS, headers)


RateLimitedToken = Annotated[None, Depends(within_rate_limit)]
