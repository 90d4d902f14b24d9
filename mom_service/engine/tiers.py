"""Effort tiers: a request's reasoning effort picks the tier of its MoM model (who is asked, who concludes, the
effort each is asked with), the first step of a plan, before the caller's own overrides.

- No effort in the request: the MoM model as configured, no tier, no `reasoning_effort` sent.
- A MoM model without tiers: its panel as configured, the request's level sent to every LLM that takes it.
- With tiers: the tier named by the request's level, else the nearest on the scale (`none` ... `xhigh`); at equal
  distance, the lower (cheaper) one. Its members and concluding LLM replace the model's (the model's concluding
  chain follows the tier's concluding LLM, without it), and its `effort` and `concluding_effort` say what each
  role is asked with: a level, the request's own (`client`), or nothing (`none`).

The level `none` is never sent: an LLM asked for no effort gets no `reasoning_effort` (its own default), since most
reasoning models refuse the value `none`.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from mom_service.config import LEVELS, Level, MoMModelConfig, TierEffort


@dataclass(frozen=True, slots=True)
class Tiered:
    """A MoM model as one request's effort shapes it."""

    mom: MoMModelConfig  # the effective MoM model: the tier's members and concluding chain
    tier: str | None = None  # the tier chosen (None: the model has none, or the request set no effort)
    member_effort: str | None = None  # the members' `reasoning_effort` (None: not sent)
    concluding_effort: str | None = None  # the concluding call's (and its fallbacks')


def is_level(value: Any) -> bool:
    return value in LEVELS


def nearest_tier(levels: list[Level], effort: Level) -> Level:
    """The tier for a level: its own, else the nearest on the scale; at equal distance, the lower one."""
    wanted = LEVELS.index(effort)
    return min(levels, key=lambda level: (abs(LEVELS.index(level) - wanted), LEVELS.index(level)))


def _sent(choice: TierEffort, effort: str) -> str | None:
    """What a role is asked with: the level the tier names, the request's own, never the level `none`."""
    level = effort if choice == "client" else choice
    return None if level == "none" else level


def choose_tier(mom: MoMModelConfig, effort: str | None) -> Tiered:
    """The MoM model as a request with this effort (a level, or None) gets it."""
    if effort is None or not is_level(effort):
        return Tiered(mom)
    if not mom.tiers:
        sent = _sent("client", effort)
        return Tiered(mom, member_effort=sent, concluding_effort=sent)
    name = nearest_tier(list(mom.tiers), effort)  # type: ignore[arg-type]  # a level: checked above
    tier = mom.tiers[name]
    concluding = tier.concluding_llm or mom.concluding_llm
    chain = [n for n in (mom.concluding_llm, *mom.concluding_fallbacks) if n != concluding]
    effective = mom.model_copy(
        update={
            "llms_to_query": list(tier.llms_to_query or mom.llms_to_query),
            "concluding_llm": concluding,
            "concluding_fallbacks": chain,
        }
    )
    return Tiered(effective, name, _sent(tier.effort, effort), _sent(tier.concluding_effort, effort))


def tiers_shown(mom: MoMModelConfig) -> dict[str, dict[str, Any]] | None:
    """A MoM model's tiers as `GET /v1/models` lists them, each resolved (its members, concluding LLM, efforts)."""
    if not mom.tiers:
        return None
    return {
        level: {
            "llms_to_query": list(tier.llms_to_query or mom.llms_to_query),
            "concluding_llm": tier.concluding_llm or mom.concluding_llm,
            "effort": tier.effort,
            "concluding_effort": tier.concluding_effort,
        }
        for level, tier in sorted(mom.tiers.items(), key=lambda item: LEVELS.index(item[0]))
    }
