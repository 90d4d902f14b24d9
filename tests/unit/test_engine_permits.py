"""The engine gives every circuit-breaker permit back, however a member's call ends (here: an adapter bug)."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncGenerator, Mapping
from typing import Any

from mom_service.config import LLMDefinition, parse_config
from mom_service.engine.calls import Calls
from mom_service.engine.engine import Engine
from mom_service.engine.events import Completed, Event, Usage
from mom_service.engine.planning import make_plan
from mom_service.observability.redaction import Redactor
from mom_service.providers.caller import LLMCaller, StreamEnd
from mom_service.providers.circuit_breaker import CircuitBreakers
from mom_service.providers.pricing import build_price_book

CONFIG = parse_config(
    {
        "llm_definitions": [
            {"name": n, "model": f"openai/{n}", "api_base": "http://x"} for n in ("good", "buggy", "j")
        ],
        # members streamed (as the concluding call is): the callers below answer by `stream` alone
        "models": [{"name": "mom", "llms_to_query": ["good", "buggy"], "concluding_llm": "j", "stream_members": "on"}],
    },
    "<test>",
)


class BuggyCaller(LLMCaller):
    """`buggy` raises what no adapter should (not an LLMCallError); the others answer at once (members and the
    concluding call alike are streamed)."""

    async def stream(
        self,
        llm: LLMDefinition,
        messages: list[dict[str, Any]],
        params: Mapping[str, Any],
        *,
        encoded: bytes | None = None,
    ) -> AsyncGenerator[str | StreamEnd]:
        if llm.name == "buggy":
            raise ValueError("an adapter bug")
        yield "synthesis" if llm.name == "j" else f"{llm.name} says hi"
        yield StreamEnd("stop", Usage(5, 1))


def engine_of(caller: LLMCaller, breakers: CircuitBreakers | None = None) -> Engine:
    """An engine over CONFIG calling through `caller` (no cache, no tracer)."""
    calls = Calls(
        caller=caller,
        prices=build_price_book(CONFIG, lambda _: None),
        breakers=breakers or CircuitBreakers((), failures=0),
    )
    return Engine(CONFIG, calls, vision={d.name: False for d in CONFIG.llm_definitions})


async def _ask(engine: Engine) -> list[Event]:
    plan = make_plan(
        CONFIG,
        CONFIG.models[0],
        [{"role": "user", "content": "hi"}],
        {},
        vision={d.name: False for d in CONFIG.llm_definitions},
        has_images=False,
        request_id="r",
        stream=False,
    )
    return [event async for event in engine.run(plan)]


def test_a_member_failing_unexpectedly_is_an_error_and_its_probe_permit_comes_back() -> None:
    clock = [0.0]
    breakers = CircuitBreakers(["good", "buggy", "j"], failures=1, cooldown_s=10, clock=lambda: clock[0])
    buggy_permit = breakers.allow("buggy")
    assert buggy_permit is not None
    breakers.record(buggy_permit, "failure")  # opened
    clock[0] = 11.0  # cool-down over: the next call is the probe
    engine = engine_of(BuggyCaller(CONFIG, {}, Redactor()), breakers)

    events = asyncio.run(_ask(engine))

    completed = events[-1]
    assert isinstance(completed, Completed)  # the request went on with the other member
    buggy = next(m for m in completed.breakdown.members if m.name == "buggy")
    assert (buggy.status, buggy.error_type, buggy.error) == ("error", "error", "failed: ValueError")
    # the probe decided nothing (not an upstream failure), and its permit came back: the next call probes again
    assert breakers.view("buggy").state == "half_open"
    assert breakers.allow("buggy") is not None
    assert engine.active.count == 0
