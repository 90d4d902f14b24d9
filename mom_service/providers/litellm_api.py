"""LiteLLM, imported on first use and set up then: its bundled model cost map (never the internet), its own retries
and telemetry off, parameters a provider does not take dropped. Importing the service changes nothing in the
process's environment; the first call of `litellm()` does, before LiteLLM reads it."""

from __future__ import annotations

import os
from functools import cache
from types import ModuleType
from typing import Any


@cache
def litellm() -> ModuleType:
    os.environ.setdefault("LITELLM_LOCAL_MODEL_COST_MAP", "True")  # read by LiteLLM as it is imported
    import litellm as module

    module.suppress_debug_info = True
    module.drop_params = True
    module.telemetry = False
    return module


def configure(verbose: bool) -> None:
    """Process-wide settings, at start-up: LiteLLM's debug logs when asked for (LITELLM_VERBOSE)."""
    if verbose:
        litellm()._turn_on_debug()


def openai_catalog() -> frozenset[str]:
    """The model names of OpenAI's own catalog (LiteLLM adapts its parameters for those)."""
    module = litellm()
    return frozenset(module.open_ai_chat_completion_models) | frozenset(module.open_ai_text_completion_models)


def cost_map_entry(model: str) -> dict[str, Any] | None:
    """LiteLLM's bundled cost-map entry for a model string, or None when the model is not in it."""
    try:
        info = litellm().get_model_info(model)
    except Exception:
        return None
    return dict(info)


def supports_vision(model: str) -> bool | None:
    """Whether LiteLLM's model info says the model sees images; None when the model is unknown to it."""
    try:
        return bool(litellm().supports_vision(model=model))
    except Exception:
        return None
