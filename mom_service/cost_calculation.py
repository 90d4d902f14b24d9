"""Pure cost arithmetic, exact in Decimal: the cost of one call, of a request, and their stored form."""

from __future__ import annotations

from decimal import ROUND_HALF_EVEN, Decimal

from mom_service.events import Usage
from mom_service.pricing_utils import Prices

ZERO = Decimal(0)
# Costs are stored as integer pico-USD: exact to sum in SQL, and a $0.0375-per-million price is still whole.
PICO_PER_USD = Decimal(10**12)


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


def to_pico(cost: Decimal | None) -> int | None:
    if cost is None:
        return None
    return int((cost * PICO_PER_USD).to_integral_value(rounding=ROUND_HALF_EVEN))


def from_pico(pico: int | None) -> Decimal | None:
    return None if pico is None else Decimal(pico) / PICO_PER_USD


def usd(cost: Decimal | None) -> float | None:
    """The JSON form of a cost: one conversion to float at the very end, never a float sum."""
    return None if cost is None else float(cost)
