"""`/v1/chat/completions`: validate OpenAI's request, turn it into the engine's, run it, encode the events as a
`chat.completion` or its SSE chunks. Thin by design."""

from __future__ import annotations

from fastapi import APIRouter, Request
from fastapi.responses import Response

from mom_service.api.auth import Identified, RateLimitedToken
from mom_service.api.encoders.openai import CompletionCollector, StreamSerializer
from mom_service.api.schemas.openai import RequestLimits, parse_chat_request
from mom_service.api.state import StateDep
from mom_service.api.surface import answer, read_json, request_cache, request_id
from mom_service.engine.plan import Plan
from mom_service.engine.plan import Request as EngineRequest

router = APIRouter(prefix="/v1")


@router.post("/chat/completions")
async def chat_completions(request: Request, state: StateDep, caller: Identified, _: RateLimitedToken) -> Response:
    settings = state.settings
    limits = RequestLimits(max_messages=settings.mom_max_messages, max_text_chars=settings.mom_max_text_chars)
    chat = parse_chat_request(await read_json(request), limits)
    asked = EngineRequest(
        model=chat.model,
        messages=chat.upstream_messages(),
        params=chat.sampling_params(),
        final_params=chat.final_params(),
        tools=chat.upstream_tools(),
        request_id=request_id(request),
        caller=caller.id,
        key=caller.label,
        stream=bool(chat.stream),
        user=chat.user,
        cache=request_cache(request, state),
        surface="chat",
        controls=chat.mom,
        effort=chat.reasoning_effort,
    )

    def collector(plan: Plan) -> CompletionCollector:
        return CompletionCollector(
            plan.mom, json_answer=plan.response_format is not None, notices=plan.steering.notices
        )

    def encoder(plan: Plan) -> StreamSerializer:
        json_answer = plan.response_format is not None
        return StreamSerializer(
            plan.mom, include_usage=chat.include_usage, json_answer=json_answer, notices=plan.steering.notices
        )

    return await answer(request, state, caller, asked, collector=collector, encoder=encoder)
