"""`/v1/models` and `/v1/models/{id}`: the MoM models, in OpenAI's list and object shapes."""

from __future__ import annotations

from fastapi import APIRouter

from mom_service.api.auth import Authorized
from mom_service.api.schemas.openai import Capabilities, ModelList, ModelObject, model_object
from mom_service.api.state import AppState, StateDep
from mom_service.errors import NotFound

router = APIRouter(prefix="/v1")


def capabilities(state: AppState, mom: str) -> Capabilities:
    takes = state.engine.takes(mom)
    return {"vision": takes.vision, "tools": takes.tools, "structured_output": takes.structured_output}


@router.get("/models")
async def list_models(state: StateDep, _: Authorized) -> ModelList:
    data = [model_object(m.name, state.started_at, capabilities(state, m.name)) for m in state.config.models]
    return {"object": "list", "data": data}


@router.get("/models/{model_id:path}")
async def get_model(model_id: str, state: StateDep, _: Authorized) -> ModelObject:
    mom = state.config.mom_model(model_id)
    if mom is None:
        raise NotFound(f"The model '{model_id}' does not exist.", code="model_not_found", param="model")
    return model_object(model_id, state.started_at, capabilities(state, mom.name))
