"""The price table (per LLM, USD per token, from config.yaml's `pricing`, else LiteLLM's bundled cost map), and the
exact cost of one call in Decimal."""

from __future__ import annotations

import logging
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from decimal import Decimal
from typing import Any, Literal

from mom_service.config import MoMConfig, Pricing
from mom_service.providers.tokens import Usage

logger = logging.getLogger("mom_service")

MILLION = Decimal(1_000_000)
ZERO = Decimal(0)


@dataclass(frozen=True, slots=True)
class Prices:
    """Exact USD prices per token."""

    input: Decimal
    output: Decimal
    reasoning: Decimal
    cached_input: Decimal
    source: Literal["config", "cost_map", "local"]


# A local LLM with no `pricing`: its server is the operator's own, its calls cost nothing (their tokens still count).
LOCAL = Prices(input=ZERO, output=ZERO, reasoning=ZERO, cached_input=ZERO, source="local")


def from_config(pricing: Pricing) -> Prices:
    """config.yaml gives USD per million tokens; reasoning and cached prices default to output and input."""
    reasoning = (
        pricing.reasoning_per_million if pricing.reasoning_per_million is not None else pricing.output_per_million
    )
    cached = (
        pricing.cached_input_per_million if pricing.cached_input_per_million is not None else pricing.input_per_million
    )
    return Prices(
        input=pricing.input_per_million / MILLION,
        output=pricing.output_per_million / MILLION,
        reasoning=reasoning / MILLION,
        cached_input=cached / MILLION,
        source="config",
    )


def _decimal(value: Any) -> Decimal | None:
    if value is None or isinstance(value, bool) or not isinstance(value, int | float | str):
        return None
    # repr of a float is the shortest string that round-trips: 1.5e-07 stays exactly 0.00000015
    return Decimal(repr(value)) if isinstance(value, float) else Decimal(value)


def from_cost_map(entry: Mapping[str, Any]) -> Prices | None:
    """Prices from a LiteLLM cost-map entry (USD per token), or None when it lacks input or output prices."""
    input_price = _decimal(entry.get("input_cost_per_token"))
    output_price = _decimal(entry.get("output_cost_per_token"))
    if input_price is None or output_price is None:
        return None
    reasoning = _decimal(entry.get("output_cost_per_reasoning_token"))
    cached = _decimal(entry.get("cache_read_input_token_cost"))
    return Prices(
        input=input_price,
        output=output_price,
        reasoning=reasoning if reasoning is not None else output_price,
        cached_input=cached if cached is not None else input_price,
        source="cost_map",
    )


PriceBook = Mapping[str, Prices | None]


def build_price_book(
    config: MoMConfig, cost_map_entry: Callable[[str], Mapping[str, Any] | None]
) -> dict[str, Prices | None]:
    """Prices for every configured LLM: its `pricing`, else zero for a local LLM, else LiteLLM's cost map; one
    warning per LLM whose price is unknown (its cost is reported as null)."""
    book: dict[str, Prices | None] = {}
    for llm in config.llm_definitions:
        prices: Prices | None
        if llm.pricing is not None:
            prices = from_config(llm.pricing)
        elif llm.is_local:
            prices = LOCAL
        else:
            entry = cost_map_entry(llm.model)
            prices = from_cost_map(entry) if entry is not None else None
        if prices is None:
            logger.warning(
                "LLM '%s' (%s) has no known price: its cost is reported as null. Add `pricing` to its entry "
                "in config.yaml.",
                llm.name,
                llm.model,
            )
        book[llm.name] = prices
    return book


def call_cost(usage: Usage | None, prices: Prices | None) -> Decimal | None:
    """USD for one upstream call; None when its price is unknown. A call that reported no usage costs 0.

    Completion tokens include reasoning tokens (as OpenAI reports them): reasoning tokens are priced at the
    reasoning price, the rest at the output price; cached prompt tokens at the cached-input price.
    """
    if usage is None:
        return ZERO
    if prices is None:
        return None
    cached = min(max(usage.cached_tokens, 0), usage.prompt_tokens)
    reasoning = min(max(usage.reasoning_tokens, 0), usage.completion_tokens)
    return (
        (usage.prompt_tokens - cached) * prices.input
        + cached * prices.cached_input
        + (usage.completion_tokens - reasoning) * prices.output
        + reasoning * prices.reasoning
    )
