"""What each LLM can do: see images, call tools, honour a response format, take a reasoning effort, and how long an
answer it may write. The config decides where it says so; else LiteLLM's model info; an LLM LiteLLM does not know
(an OpenAI-compatible server behind api_base) is assumed able to call tools and format its answer, not to see images
(sending images to an LLM that cannot see them fails) nor to take `reasoning_effort` (a server that does not know it
may refuse it), and to write at most DEFAULT_MAX_OUTPUT tokens."""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

from mom_service.config import LLMDefinition
from mom_service.providers.caller import configured_limit
from mom_service.providers.images import sees_images

ModelInfo = Callable[[str], Mapping[str, Any] | None]
# An answer's length when neither the config (`params.max_tokens`) nor LiteLLM's model info says what it may be
DEFAULT_MAX_OUTPUT = 4096


@dataclass(frozen=True, slots=True)
class LLMCapabilities:
    vision: bool
    tools: bool
    structured_output: bool
    reasoning: bool
    max_output: int = DEFAULT_MAX_OUTPUT  # the tokens an answer may have: the output ceiling of its calls


def max_output(llm: LLMDefinition, info: Mapping[str, Any] | None) -> int:
    """An LLM's output ceiling: its configured `max_tokens` (or `max_completion_tokens`, the smaller), else the
    model's maximum output in LiteLLM's model info (`max_output_tokens`, else `max_tokens`), else
    DEFAULT_MAX_OUTPUT."""
    limit = configured_limit(llm.params)
    if limit is not None:
        return limit
    for key in ("max_output_tokens", "max_tokens"):
        value = info.get(key) if info is not None else None
        if isinstance(value, int) and not isinstance(value, bool) and value > 0:
            return value
    return DEFAULT_MAX_OUTPUT


def _able(configured: bool | None, info: Mapping[str, Any] | None, key: str) -> bool:
    if configured is not None:
        return configured
    return True if info is None else bool(info.get(key))


def capabilities_of(
    llm: LLMDefinition, model_info: ModelInfo, supports_vision: Callable[[str], bool | None]
) -> LLMCapabilities:
    info = model_info(llm.model)
    return LLMCapabilities(
        vision=sees_images(llm, supports_vision),
        tools=_able(llm.capabilities.tools, info, "supports_function_calling"),
        structured_output=_able(llm.capabilities.structured_output, info, "supports_response_schema"),
        reasoning=_able(llm.capabilities.reasoning, info or {}, "supports_reasoning"),
        max_output=max_output(llm, info),
    )
