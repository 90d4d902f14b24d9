"""`/v1/responses`: OpenAI's Responses API. POST validates the request, continues a stored conversation
(`previous_response_id`), runs the engine like the chat surface and encodes the events as a Response or its SSE
stream, storing it (`store`, true by default) before its last bytes leave; GET returns a stored response, its input
items; DELETE removes it. A stored response is its caller's alone: any other token gets a 404, as if it did not
exist. Thin by design."""

from __future__ import annotations

from typing import Annotated, Any, Literal

from fastapi import APIRouter, Query, Request
from fastapi.responses import Response

from mom_service.api.auth import Authorized, Identified, RateLimitedToken
from mom_service.api.encoders.responses import ResponseCollector, ResponseShape
from mom_service.api.encoders.responses_stream import ResponseStreamEncoder
from mom_service.api.schemas.openai import RequestLimits
from mom_service.api.schemas.responses import ResponsesRequest, parse_responses_request
from mom_service.api.schemas.responses_input import Translated, translate
from mom_service.api.schemas.validation import array_too_long, conversation_chars
from mom_service.api.state import AppState, StateDep
from mom_service.api.surface import (
    BodyCollector,
    OnCompleted,
    ORJSONResponse,
    StreamEncoder,
    answer,
    read_json,
    request_cache,
    request_id,
)
from mom_service.engine.plan import Plan
from mom_service.engine.plan import Request as EngineRequest
from mom_service.errors import InvalidRequest, ServiceUnavailable
from mom_service.usage.responses_store import ResponseStoreUnavailable, StoredResponse

router = APIRouter(prefix="/v1")


def _unavailable() -> ServiceUnavailable:
    return ServiceUnavailable(
        "Stored responses are unavailable: the database did not answer. Retry later, or send the whole input with "
        "'store': false.",
        code="database_unavailable",
    )


def not_found(response_id: str) -> InvalidRequest:
    """OpenAI's answer for a response that is not there (or not the caller's: the same answer, so nothing leaks)."""
    return InvalidRequest(f"Response with id '{response_id}' not found.", status_code=404)


async def stored(state: AppState, response_id: str, caller: str) -> StoredResponse | None:
    try:
        return await state.responses.get(response_id, caller)
    except ResponseStoreUnavailable:
        raise _unavailable() from None


async def _turn(state: AppState, asked: ResponsesRequest, caller: str, limits: RequestLimits) -> Translated:
    """The conversation the engine gets: the stored one continued (404 when it is not this caller's), the input."""
    previous: list[dict[str, Any]] = []
    if asked.previous_response_id is not None:
        found = await stored(state, asked.previous_response_id, caller)
        if found is None:
            raise InvalidRequest(
                f"Previous response with id '{asked.previous_response_id}' not found.",
                param="previous_response_id",
                code="previous_response_not_found",
                status_code=404,
            )
        previous = found.conversation
    turn = translate(asked.instructions, asked.input, previous)
    if len(turn.messages) > limits.max_messages:
        raise array_too_long("input", limits.max_messages, len(turn.messages))
    chars = conversation_chars(turn.messages)
    if chars > limits.max_text_chars:
        raise InvalidRequest(
            f"The conversation holds {chars} characters of text; at most {limits.max_text_chars} are accepted.",
            param="input",
            code="request_too_large",
        )
    return turn


@router.post("/responses")
async def create_response(request: Request, state: StateDep, caller: Identified, _: RateLimitedToken) -> Response:
    settings = state.settings
    limits = RequestLimits(max_messages=settings.mom_max_messages, max_text_chars=settings.mom_max_text_chars)
    asked = parse_responses_request(await read_json(request), limits)
    turn = await _turn(state, asked, caller.id, limits)
    engine_request = EngineRequest(
        model=asked.model,
        messages=turn.messages,
        params=asked.sampling_params(),
        final_params=asked.final_params(),
        tools=asked.upstream_tools(),
        request_id=request_id(request),
        caller=caller.id,
        key=caller.label,
        stream=bool(asked.stream),
        user=asked.caller_user,
        cache=request_cache(request, state),
        surface="responses",
        controls=asked.mom,
        effort=asked.reasoning.effort if asked.reasoning is not None else None,
    )
    echo, namespaces = asked.echo(), asked.namespaces()

    def shape(plan: Plan) -> ResponseShape:
        thinking = plan.mom.include_thinking_context
        notices = plan.steering.notices
        return ResponseShape(plan.mom.name, echo, thinking=thinking, namespaces=namespaces, notices=notices)

    def collector(plan: Plan) -> ResponseCollector:
        return ResponseCollector(shape(plan))

    def encoder(plan: Plan) -> ResponseStreamEncoder:
        return ResponseStreamEncoder(shape(plan))

    def store(out: BodyCollector | StreamEncoder) -> OnCompleted:
        async def save() -> None:
            assert isinstance(out, ResponseCollector | ResponseStreamEncoder)
            if out.response is None or out.assistant is None:
                return
            conversation = [*turn.conversation, out.assistant]
            try:
                await state.responses.save(out.shape.id, caller.id, out.response, turn.items, conversation)
            except ResponseStoreUnavailable:
                if isinstance(out, ResponseStreamEncoder):
                    raise  # after the stream began: it ends with response.failed (server_error)
                raise _unavailable() from None

        return save

    on_completed = store if asked.stores else None
    return await answer(
        request, state, caller, engine_request, collector=collector, encoder=encoder, on_completed=on_completed
    )


@router.get("/responses/{response_id}")
async def get_response(
    response_id: str, state: StateDep, caller: Authorized, stream: Annotated[bool, Query()] = False
) -> Response:
    if stream:
        raise InvalidRequest(
            "Unsupported parameter: 'stream': a stored response cannot be streamed again.",
            param="stream",
            code="unsupported_parameter",
        )
    found = await stored(state, response_id, caller)
    if found is None:
        raise not_found(response_id)
    return ORJSONResponse(found.response)


@router.delete("/responses/{response_id}")
async def delete_response(response_id: str, state: StateDep, caller: Authorized) -> Response:
    try:
        deleted = await state.responses.delete(response_id, caller)
    except ResponseStoreUnavailable:
        raise _unavailable() from None
    if not deleted:
        raise not_found(response_id)
    return ORJSONResponse({"id": response_id, "object": "response", "deleted": True})


@router.get("/responses/{response_id}/input_items")
async def list_input_items(
    response_id: str,
    state: StateDep,
    caller: Authorized,
    limit: Annotated[int, Query(ge=1, le=100)] = 20,
    order: Annotated[Literal["asc", "desc"], Query()] = "desc",
    after: Annotated[str | None, Query()] = None,
) -> Response:
    """The input items of a stored response, as OpenAI lists them (newest first by default), a page at a time."""
    found = await stored(state, response_id, caller)
    if found is None:
        raise not_found(response_id)
    items = found.input_items if order == "asc" else found.input_items[::-1]
    if after is not None:
        ids = [item.get("id") for item in items]
        if after not in ids:
            raise InvalidRequest(f"Invalid 'after': no input item has the id '{after}'.", param="after")
        items = items[ids.index(after) + 1 :]
    page = items[:limit]
    return ORJSONResponse(
        {
            "object": "list",
            "data": page,
            "first_id": page[0]["id"] if page else None,
            "last_id": page[-1]["id"] if page else None,
            "has_more": len(items) > limit,
        }
    )
