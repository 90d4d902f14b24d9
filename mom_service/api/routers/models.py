"""`/v1/models` and `/v1/models/{id}`: the MoM models (those an API key may use, for a key), in OpenAI's list and
object shapes, or in Anthropic's when the request carries `anthropic-version` (as Anthropic's SDK and Claude Code
send it)."""

from __future__ import annotations

from typing import Any

from fastapi import APIRouter, Request

from mom_service.api.auth import Identified
from mom_service.api.errors import ANTHROPIC_VERSION
from mom_service.api.keys import Caller
from mom_service.api.schemas.anthropic import anthropic_model, anthropic_model_list
from mom_service.api.schemas.openai import Capabilities, Panel, model_object
from mom_service.api.state import StateDep
from mom_service.config import MoMConfig, MoMModelConfig
from mom_service.engine.engine import Engine
from mom_service.engine.tiers import tiers_shown
from mom_service.errors import NotFound

router = APIRouter(prefix="/v1")


def capabilities(engine: Engine, mom: str) -> Capabilities:
    takes = engine.takes(mom)
    return {"vision": takes.vision, "tools": takes.tools, "structured_output": takes.structured_output}


def panel(mom: MoMModelConfig) -> Panel:
    return {
        "members": list(mom.llms_to_query),
        "concluding_llm": mom.concluding_llm,
        "strategy": mom.strategy,
        "steerable": mom.overrides.enabled,
    }


def openai_model(engine: Engine, mom: MoMModelConfig, created: int) -> dict[str, Any]:
    """A MoM model as OpenAI's model object, with what it takes, its panel and its effort tiers."""
    return dict(model_object(mom.name, created, capabilities(engine, mom.name), panel(mom), tiers_shown(mom)))


def usable_models(config: MoMConfig, caller: Caller) -> list[MoMModelConfig]:
    """The MoM models the caller may use: its key's, else all."""
    return [m for m in config.models if caller.key is None or caller.key.allows(m.name)]


@router.get("/models")
async def list_models(request: Request, state: StateDep, caller: Identified) -> dict[str, Any]:
    engine = state.engine  # one config throughout, even across a reload
    models = usable_models(engine.config, caller)
    if ANTHROPIC_VERSION in request.headers:
        return dict(anthropic_model_list([m.name for m in models], state.started_at))
    return {"object": "list", "data": [openai_model(engine, mom, state.started_at) for mom in models]}


@router.get("/models/{model_id:path}")
async def get_model(model_id: str, request: Request, state: StateDep, caller: Identified) -> dict[str, Any]:
    engine = state.engine
    mom = engine.config.mom_model(model_id)
    if mom is None or (caller.key is not None and not caller.key.allows(mom.name)):
        raise NotFound(f"The model '{model_id}' does not exist.", code="model_not_found", param="model")
    if ANTHROPIC_VERSION in request.headers:
        return dict(anthropic_model(mom.name, state.started_at))
    return openai_model(engine, mom, state.started_at)
