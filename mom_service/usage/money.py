"""Money as it is stored and shown: exact pico-USD integers in the database, one float in JSON at the very end."""

from __future__ import annotations

from decimal import ROUND_HALF_EVEN, Decimal

# Costs are stored as integer pico-USD: exact to sum in SQL, and a $0.0375-per-million price is still whole.
PICO_PER_USD = Decimal(10**12)


def to_pico(cost: Decimal | None) -> int | None:
    if cost is None:
        return None
    return int((cost * PICO_PER_USD).to_integral_value(rounding=ROUND_HALF_EVEN))


def from_pico(pico: int | None) -> Decimal | None:
    return None if pico is None else Decimal(pico) / PICO_PER_USD


def usd(cost: Decimal | None) -> float | None:
    """The JSON form of a cost: one conversion to float at the very end, never a float sum."""
    return None if cost is None else float(cost)
