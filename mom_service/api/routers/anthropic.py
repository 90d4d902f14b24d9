"""`/v1/messages` and `/v1/messages/count_tokens`: validate Anthropic's request, turn it into the engine's, run it
(or count it), encode the events as a `message` or its SSE events. Thin by design; errors under /v1/messages are
answered in Anthropic's shape by the app's handlers."""

from __future__ import annotations

import re
from typing import Any, TypeVar

from fastapi import APIRouter, Request
from fastapi.responses import Response

from mom_service.api.auth import Identified, RateLimitedToken
from mom_service.api.encoders.anthropic import MessageCollector, MessageStreamEncoder
from mom_service.api.keys import Caller
from mom_service.api.schemas.anthropic import (
    CountTokensRequest,
    MessagesRequest,
    anthropic_error,
    invalid,
    parse_request,
)
from mom_service.api.schemas.anthropic_engine import EngineParts, ImagePaths, translate
from mom_service.api.schemas.openai import RequestLimits
from mom_service.api.signing import ThinkingSigner
from mom_service.api.state import AppState, StateDep
from mom_service.api.surface import answer, read_json, request_cache, request_id
from mom_service.engine.plan import Plan
from mom_service.engine.plan import Request as EngineRequest
from mom_service.errors import InvalidRequest

router = APIRouter(prefix="/v1")

_IMAGE_PARAM = re.compile(r"^messages\[(\d+)\]\.content\[(\d+)\]")


R = TypeVar("R", bound=CountTokensRequest)


def _parsed(state: AppState, data: Any, signer: ThinkingSigner, model: type[R]) -> tuple[R, EngineParts]:
    """The validated request, and what it is for the engine."""
    settings = state.settings
    limits = RequestLimits(max_messages=settings.mom_max_messages, max_text_chars=settings.mom_max_text_chars)
    parsed = parse_request(data, model, limits)
    return parsed, translate(parsed, signer.verify, settings.mom_max_text_chars)


def _named(error: InvalidRequest, images: ImagePaths) -> InvalidRequest:
    """An error of the engine's (naming its OpenAI-shaped conversation) named as the client wrote the request."""
    found = _IMAGE_PARAM.match(error.param or "")
    where = images.get((int(found[1]), int(found[2]))) if found else None
    if where is not None:
        return invalid(where, error.message, error.code or "invalid_value")
    return anthropic_error(error)


def _asked(
    request: Request, state: AppState, body: CountTokensRequest, parts: EngineParts, caller: Caller, stream: bool
) -> EngineRequest:
    return EngineRequest(
        model=body.model,
        messages=parts.messages,
        params=parts.params,
        final_params=parts.final_params,
        tools=parts.tools,
        request_id=request_id(request),
        caller=caller.id,
        key=caller.label,
        stream=stream,
        user=parts.user,
        cache=request_cache(request, state),
        surface="messages",
        controls=body.mom,
        effort=parts.effort,
    )


@router.post("/messages")
async def messages(request: Request, state: StateDep, caller: Identified, _: RateLimitedToken) -> Response:
    signer = ThinkingSigner.from_settings(state.settings)
    body, parts = _parsed(state, await read_json(request), signer, MessagesRequest)
    asked = _asked(request, state, body, parts, caller, bool(body.stream))
    asked_thinking = body.thinking is not None and body.thinking.asked

    def thinking(plan: Plan) -> bool:  # the caller's `mom.thinking` decides, else thinking asked or configured
        steered = "thinking" in plan.steering.applied
        return plan.mom.include_thinking_context if steered else asked_thinking or plan.mom.include_thinking_context

    def collector(plan: Plan) -> MessageCollector:
        return MessageCollector(plan.mom.name, thinking=thinking(plan), sign=signer.sign, notices=plan.steering.notices)

    def encoder(plan: Plan) -> MessageStreamEncoder:
        notices = plan.steering.notices
        return MessageStreamEncoder(plan.mom.name, thinking=thinking(plan), sign=signer.sign, notices=notices)

    try:
        return await answer(request, state, caller, asked, collector=collector, encoder=encoder)
    except InvalidRequest as exc:  # the engine's checks (images, tools) name its conversation: name the client's
        raise _named(exc, parts.images) from None


@router.post("/messages/count_tokens")
async def count_tokens(request: Request, state: StateDep, caller: Identified) -> dict[str, int]:
    """The tokens the concluding LLM would read for this request (before the panel's answers), by our count."""
    signer = ThinkingSigner.from_settings(state.settings)
    body, parts = _parsed(state, await read_json(request), signer, CountTokensRequest)
    asked = _asked(request, state, body, parts, caller, stream=False)
    state.keys.allow_model(caller, asked.model)
    try:
        return {"input_tokens": await state.engine.count_tokens(asked)}
    except InvalidRequest as exc:
        raise _named(exc, parts.images) from None
