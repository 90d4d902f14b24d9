"""An engine built from the config and the settings that shape it: its callers, prices, circuit breakers and what
each LLM can see. The app builds one at start-up (and, with a config reload, one per config)."""

from __future__ import annotations

from collections.abc import Mapping, Sequence

from mom_service.config import MoMConfig
from mom_service.engine.cached import ResponseCache
from mom_service.engine.calls import Calls
from mom_service.engine.engine import Engine, Recorder
from mom_service.engine.plan import DEFAULT_IMAGES, ImagePolicy
from mom_service.engine.tracing import TraceStarter
from mom_service.observability.redaction import Redactor
from mom_service.providers import litellm_api
from mom_service.providers.caller import LLMCaller
from mom_service.providers.capabilities import capabilities_of
from mom_service.providers.circuit_breaker import CircuitBreakers
from mom_service.providers.pricing import build_price_book


def build_engine(
    config: MoMConfig,
    *,
    env: Mapping[str, str],
    redactor: Redactor,
    lean_calls: bool = True,
    circuit_failures: int = 5,
    circuit_cooldown_s: float = 30.0,
    images: ImagePolicy = DEFAULT_IMAGES,
    cache: ResponseCache | None = None,
    tracer: TraceStarter | None = None,
    recorders: Sequence[Recorder] = (),
    litellm_verbose: bool = False,
) -> Engine:
    """The engine for `config`; keys come from `env`, their values are redacted by `redactor` wherever they could
    show."""
    litellm_api.configure(litellm_verbose)
    breakers = CircuitBreakers(
        (d.name for d in config.llm_definitions), failures=circuit_failures, cooldown_s=circuit_cooldown_s
    )
    calls = Calls(
        caller=LLMCaller(config, env, redactor, lean=lean_calls),
        prices=build_price_book(config, litellm_api.cost_map_entry),
        breakers=breakers,
        cache=cache,
    )
    able = {
        d.name: capabilities_of(d, litellm_api.cost_map_entry, litellm_api.supports_vision)
        for d in config.llm_definitions
    }
    return Engine(
        config,
        calls,
        vision={name: c.vision for name, c in able.items()},
        tools_ok={name: c.tools for name, c in able.items()},
        structured_ok={name: c.structured_output for name, c in able.items()},
        reasoning_ok={name: c.reasoning for name, c in able.items()},
        ceilings={name: c.max_output for name, c in able.items()},
        images=images,
        recorders=recorders,
        tracer=tracer,
    )
