"""An engine built from the config and the settings that shape it: its callers, prices, circuit breakers and what
each LLM can see. The app builds one at start-up and, with each config reload, the next one (`successor`)."""

from __future__ import annotations

import asyncio
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

from mom_service.cache.stores import CacheStore
from mom_service.config import MoMConfig
from mom_service.config_changes import ConfigChanges
from mom_service.engine.cached import ResponseCache
from mom_service.engine.calls import Calls
from mom_service.engine.engine import Engine, Recorder
from mom_service.engine.inflight import InFlight
from mom_service.engine.plan import DEFAULT_IMAGES, ImagePolicy
from mom_service.engine.single_flight import Flights
from mom_service.engine.tracing import TraceStarter
from mom_service.observability.redaction import Redactor
from mom_service.providers import litellm_api
from mom_service.providers.caller import LLMCaller
from mom_service.providers.capabilities import capabilities_of
from mom_service.providers.circuit_breaker import CircuitBreakers
from mom_service.providers.openai_http import LeanPool
from mom_service.providers.pricing import build_price_book


@dataclass(frozen=True, slots=True)
class EngineOptions:
    """What the settings decide of an engine: the same for every config the service runs. Keys come from `env`;
    their values are redacted by `redactor` wherever they could show."""

    env: Mapping[str, str]
    redactor: Redactor
    lean_calls: bool = True
    circuit_failures: int = 5
    circuit_cooldown_s: float = 30.0
    images: ImagePolicy = DEFAULT_IMAGES
    cache_store: CacheStore | None = None  # None: the response cache is off
    tracer: TraceStarter | None = None
    litellm_verbose: bool = False


@dataclass(slots=True)
class _Shared:
    """What an engine hands on to the next one on a reload."""

    pool: LeanPool | None = None
    active: InFlight | None = None
    flights: Flights | None = None
    background: set[asyncio.Task[None]] | None = None  # the cache stores running in the background
    recorders: Sequence[Recorder] = ()


def key_values(config: MoMConfig, env: Mapping[str, str]) -> list[str]:
    """The values of the keys the config's LLMs name (`api_key_env`): secrets, redacted wherever they could show."""
    return [env[d.api_key_env] for d in config.llm_definitions if d.api_key_env and env.get(d.api_key_env)]


def build_engine(config: MoMConfig, options: EngineOptions, recorders: Sequence[Recorder] = ()) -> Engine:
    """The engine for `config`."""
    litellm_api.configure(options.litellm_verbose)
    return _engine(config, options, _Shared(recorders=recorders))


def successor(engine: Engine, config: MoMConfig, options: EngineOptions, changes: ConfigChanges) -> Engine:
    """The engine of a reloaded config. It shares with `engine` what outlives a config: the recorders, the count of
    requests in flight, the single flights, the cache stores in the background, the lean path's connections, and
    the circuit breakers of the LLMs whose definitions did not change (those that did start closed). The response
    cache is the same store: its keys hold each LLM's definition, so a changed LLM's stored answers are no longer
    found, and the others' still are. `engine` itself is left as it is, for the requests that hold it."""
    options.redactor.add(key_values(config, options.env))  # a new LLM's key, before any of its calls
    calls = engine.calls
    shared = _Shared(calls.caller.pool, engine.active, engine.flights, calls.background, engine.recorders)
    new = _engine(config, options, shared)
    unchanged = [d.name for d in config.llm_definitions if d.name not in changes.llms.changed]
    new.breakers.carry_over(engine.breakers, unchanged)
    return new


def _engine(config: MoMConfig, options: EngineOptions, shared: _Shared) -> Engine:
    breakers = CircuitBreakers(
        (d.name for d in config.llm_definitions),
        failures=options.circuit_failures,
        cooldown_s=options.circuit_cooldown_s,
    )
    calls = Calls(
        caller=LLMCaller(config, options.env, options.redactor, lean=options.lean_calls, pool=shared.pool),
        prices=build_price_book(config, litellm_api.cost_map_entry),
        breakers=breakers,
        cache=ResponseCache(options.cache_store, config) if options.cache_store is not None else None,
    )
    if shared.background is not None:
        calls.background = shared.background
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
        images=options.images,
        recorders=shared.recorders,
        tracer=options.tracer,
        active=shared.active,
        flights=shared.flights,
    )
