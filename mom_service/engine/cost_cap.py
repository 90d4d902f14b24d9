"""The hard cost cap (`max_cost_usd`). Before any call: each call's worst case (the tokens it reads at the input
price, its output ceiling at the output price, reasoning included), the strategy's stages included (the rankings,
the later rounds), the most expensive members dropped while min_successful can still be met, else a 400
`cost_cap_exceeded` with the estimate; an LLM without a price is refused (a 400 `cost_cap_unpriced`), never
guessed. Every call of a capped plan is sent with its ceiling as `max_tokens`, so the estimate holds. While it
runs: before each concluding or stage call, its output ceiling from what is left (`room`, `stage_room`)."""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, replace
from decimal import ROUND_FLOOR, Decimal
from typing import Any

from mom_service.engine.events import CallReport
from mom_service.engine.plan import Concluder, Member, Plan
from mom_service.engine.strategies.ballots import Ballot, label
from mom_service.engine.strategies.prompts import rank_messages, references
from mom_service.engine.synthesis import concluding_messages
from mom_service.errors import InvalidRequest
from mom_service.providers.caller import configured_limit
from mom_service.providers.pricing import ZERO, PriceBook, Prices
from mom_service.providers.tokens import count_request

# The fewest tokens a concluding answer is asked for under a cap (or its whole ceiling, when that is smaller): when
# what is left pays for fewer, the call is not made.
MIN_ANSWER_TOKENS = 16
# A stage call's output ceiling (a ranking, a judgement) when its LLM's is not known to the plan: a ranking is short
STAGE_CEILING = 1024

# Our count of a call's input: (model, messages, tools) -> tokens
Counter = Callable[[str, list[dict[str, Any]], list[dict[str, Any]] | None], int]


def usd(value: Decimal) -> str:
    """An amount as the messages show it: exact, without trailing zeros ("$0.0125")."""
    return f"${value.normalize():f}"


def output_price(prices: Prices) -> Decimal:
    """An output token's price at worst: reasoning tokens are output tokens, and may cost more."""
    return max(prices.output, prices.reasoning)


@dataclass(frozen=True, slots=True)
class CallCost:
    """What one call may cost at most: the tokens it reads and the tokens it may write, at its LLM's prices."""

    input_tokens: int
    ceiling: int
    prices: Prices

    def worst(self, more_input: int = 0) -> Decimal:
        """Its worst case, reading `more_input` tokens more (a concluding call: the members' answers)."""
        return (self.input_tokens + more_input) * self.prices.input + self.ceiling * output_price(self.prices)


@dataclass(frozen=True, slots=True)
class Stages:
    """What a strategy's stages add to a plan's worst case, each stage call reading every member's answer at its
    ceiling. best_of's and vote's judge is the concluding LLM reading the same answers: the concluding call's worst
    case covers it."""

    later_rounds: int = 0  # layers: the rounds after the first, where every member answers again
    rounds: tuple[CallCost, ...] = ()  # layers: each member's call in a later round (the answers aside), in order
    rankings: tuple[CallCost, ...] = ()  # rank by the members: each member's ranking (the answers aside), in order
    rankers: tuple[CallCost, ...] = ()  # rank by the configured rankers: each one's ranking

    def keeping(self, kept: Sequence[int]) -> Stages:
        """The stages of the members at the indices `kept` (a member dropped neither answers again nor ranks)."""
        return replace(
            self,
            rounds=tuple(self.rounds[i] for i in kept) if self.rounds else (),
            rankings=tuple(self.rankings[i] for i in kept) if self.rankings else (),
        )

    def worst(self, answers: int) -> Decimal:
        """Their worst case, each call reading `answers` tokens of answers more."""
        later = self.later_rounds * sum((c.worst(answers) for c in self.rounds), ZERO)
        return later + sum((c.worst(answers) for c in (*self.rankings, *self.rankers)), ZERO)


NO_STAGES = Stages()


def estimate(members: Sequence[CallCost], concluders: Sequence[CallCost], stages: Stages = NO_STAGES) -> Decimal:
    """A plan's worst case: every member's, its strategy's stages', plus the most expensive concluding call's,
    reading every member's answer at its ceiling (the fallbacks run only when the one before failed before
    answering)."""
    answers = sum(m.ceiling for m in members)
    own = sum((m.worst() for m in members), ZERO) + stages.worst(answers)
    return own + max(c.worst(answers) for c in concluders)


def fit(
    members: Sequence[CallCost],
    concluders: Sequence[CallCost],
    cap: Decimal,
    keep: int,
    stages: Stages = NO_STAGES,
) -> tuple[list[int], Decimal]:
    """Which members to drop (their indices) so that the plan's worst case fits under `cap`, keeping `keep` at
    least: the most expensive first (the one whose absence lowers the worst case most: its own call, its answer
    read by the concluding call and the stages, its stage calls; of two alike, the later one), one at a time while
    the plan is over the cap. Returns them and the estimate of what is left, which is still over the cap when even
    `keep` members are too many."""

    def total_of(indices: Sequence[int]) -> Decimal:
        return estimate([members[i] for i in indices], concluders, stages.keeping(indices))

    kept = list(range(len(members)))
    dropped: list[int] = []
    total = total_of(kept)
    while total > cap and len(kept) > keep:
        saving = {i: total - total_of([k for k in kept if k != i]) for i in kept}
        index = max(kept, key=lambda i: (saving[i], i))
        kept.remove(index)
        dropped.append(index)
        total = total_of(kept)
    return dropped, total


def ceiling_of(name: str, ceilings: Mapping[str, int], params: Mapping[str, Any]) -> int:
    """A call's output ceiling: its LLM's (config, else LiteLLM's model info, else the default), lowered by a
    limit in the call's own parameters (the client's max_tokens, for the concluding call)."""
    own = configured_limit(params)
    return min(ceilings[name], own) if own is not None else ceilings[name]


def _members_input(members: Sequence[Member], count: Counter) -> list[int]:
    """Our count of what each member reads; members that share a conversation (the plan's one list per provider
    family) and a model share one count."""
    seen: dict[tuple[str, int, bool], int] = {}
    counted = []
    for member in members:
        tools = member.params.get("tools")
        key = (member.llm.model, id(member.messages), bool(tools))  # the plan keeps each list alive
        if key not in seen:
            seen[key] = count(member.llm.model, member.messages, tools)
        counted.append(seen[key])
    return counted


def _concluding_input(plan: Plan, candidate: Concluder, asked: Sequence[Member], count: Counter) -> int:
    """The tokens a concluding call reads besides the members' answers: its prompt, the conversation, the tools,
    and the blocks the answers come in (every member's)."""
    if plan.turn == "relay":
        return count(candidate.llm.model, list(candidate.conversation), plan.tools)
    empty = [CallReport(name=m.llm.name, model=m.llm.model) for m in asked]
    return count(candidate.llm.model, concluding_messages(plan.prompt, candidate.conversation, empty), plan.tools)


def _called(plan: Plan, asked: Sequence[Member]) -> list[str]:
    """The LLMs a plan may call: its members asked, its concluding LLMs, its rankers."""
    return [m.llm.name for m in asked] + [c.llm.name for c in (*plan.concluders, *plan.rankers)]


def _stages(
    plan: Plan, members: Sequence[Member], costs: Sequence[CallCost], priced: Mapping[str, Prices], count: Counter
) -> Stages:
    """The worst case of the plan's strategy's stages: each member's later rounds (layers), each ranking (rank);
    the rankers' calls are sent with their ceilings (`plan.rankers`, set by `capped`)."""
    if plan.strategy == "layers":
        empty = [CallReport(name=m.llm.name, model=m.llm.model) for m in members]
        frame = [count(m.llm.model, [references(empty)], None) for m in members]
        rounds = tuple(replace(c, input_tokens=c.input_tokens + f) for c, f in zip(costs, frame, strict=True))
        return Stages(later_rounds=plan.mom.layers - 1, rounds=rounds)
    if plan.strategy != "rank":
        return NO_STAGES
    ballot = Ballot(tuple((label(i), CallReport(name=m.llm.name, model=m.llm.model)) for i, m in enumerate(members)))
    ranking = {
        r.llm.name: CallCost(
            count(r.llm.model, rank_messages(r.conversation, ballot), None), r.ceiling or 0, priced[r.llm.name]
        )
        for r in plan.rankers
    }
    if plan.mom.rankers is not None:
        return Stages(rankers=tuple(ranking.values()))
    return Stages(rankings=tuple(ranking[m.llm.name] for m in members))


def _prices_of(plan: Plan, asked: Sequence[Member], prices: PriceBook, cap: Decimal) -> dict[str, Prices]:
    """The prices of every LLM the plan may call; a 400 naming those that have none."""
    found = {name: prices.get(name) for name in _called(plan, asked)}
    unpriced = [name for name, price in found.items() if price is None]
    if unpriced:
        listed = ", ".join(f"'{name}'" for name in unpriced)
        raise InvalidRequest(
            f"This request has a cost cap of {usd(cap)} (max_cost_usd), and its LLM(s) {listed} have no known "
            "price: under a cap an unpriced LLM is refused, not guessed. Add `pricing` to its entry in config.yaml.",
            code="cost_cap_unpriced",
        )
    return {name: price for name, price in found.items() if price is not None}


def _refuse_over(plan: Plan, cap: Decimal, total: Decimal, asked: int) -> None:
    fewest = (
        f", even with only {asked} panel member(s) (min_successful: {plan.mom.min_successful})"
        if plan.turn != "relay" and asked > 0
        else ""
    )
    raise InvalidRequest(
        f"This request could cost up to {usd(total)}{fewest}, over its cost cap of {usd(cap)} (max_cost_usd). The "
        "estimate is each call's worst case: the tokens it reads at the input price and its output ceiling "
        "(max_tokens) at the output price. Raise the cap, or lower the LLMs' max_tokens.",
        code="cost_cap_exceeded",
    )


def _call_costs(
    plan: Plan, members: Sequence[Member], priced: Mapping[str, Prices], ceilings: Mapping[str, int], count: Counter
) -> tuple[list[CallCost], list[Concluder], list[CallCost]]:
    """Each asked member's worst case, the concluders with their output ceilings, and each concluder's worst case."""
    costs = [
        CallCost(tokens, ceiling_of(m.llm.name, ceilings, m.params), priced[m.llm.name])
        for m, tokens in zip(members, _members_input(members, count), strict=True)
    ]
    concluders = [
        dataclasses.replace(c, ceiling=ceiling_of(c.llm.name, ceilings, plan.final_params)) for c in plan.concluders
    ]
    concluding = [
        CallCost(_concluding_input(plan, c, members, count), c.ceiling or 0, priced[c.llm.name]) for c in concluders
    ]
    return costs, concluders, concluding


def _with_rankers(plan: Plan, ceilings: Mapping[str, int]) -> Plan:
    """The plan with each ranker's output ceiling: its LLM's, at most STAGE_CEILING (a ranking is short)."""
    rankers = tuple(replace(r, ceiling=min(ceilings[r.llm.name], STAGE_CEILING)) for r in plan.rankers)
    return replace(plan, rankers=rankers)


def worst_case(
    plan: Plan, prices: PriceBook, ceilings: Mapping[str, int], count: Counter = count_request
) -> Decimal | None:
    """A plan's worst case as the cost cap computes it (every member asked, the strategy's stages, the dearest
    concluding call reading every answer at its ceiling); None when an LLM it may call has no price. For callers
    that keep their own budget (the evaluation's `--max-cost-usd`)."""
    members = [m for m in plan.members if m.skipped is None]
    found = {name: prices.get(name) for name in _called(plan, members)}
    priced = {name: price for name, price in found.items() if price is not None}
    if len(priced) < len(found):
        return None
    plan = _with_rankers(plan, ceilings)
    costs, _, concluding = _call_costs(plan, members, priced, ceilings, count)
    return estimate(costs, concluding, _stages(plan, members, costs, priced, count))


def capped(plan: Plan, prices: PriceBook, ceilings: Mapping[str, int], count: Counter = count_request) -> Plan:
    """The plan under its cost cap (the plan itself without one): the most expensive members dropped (skipped,
    `cost_cap`) while min_successful can still be met, every call's output ceiling set; a 400 when an LLM it would
    call has no price, or when even the cheapest plan could cost more than the cap. No upstream call is made."""
    cap = plan.max_cost_usd
    if cap is None:
        return plan
    asked = [i for i, m in enumerate(plan.members) if m.skipped is None]
    members = [plan.members[i] for i in asked]
    priced = _prices_of(plan, members, prices, cap)
    plan = _with_rankers(plan, ceilings)
    costs, concluders, concluding = _call_costs(plan, members, priced, ceilings, count)
    stages = _stages(plan, members, costs, priced, count)
    dropped, total = fit(costs, concluding, cap, plan.mom.min_successful, stages)
    if total > cap:
        _refuse_over(plan, cap, total, len(members) - len(dropped))
    shaped = list(plan.members)
    for index, cost in zip(asked, costs, strict=True):
        shaped[index] = dataclasses.replace(shaped[index], params={**shaped[index].params, "max_tokens": cost.ceiling})
    for number in dropped:
        reason = (
            f"not asked: at worst it costs {usd(costs[number].worst())} (its answer read by the concluding call "
            f"costs more), which would take the request over its cost cap of {usd(cap)}"
        )
        shaped[asked[number]] = Member(members[number].llm, [], skipped=reason, skipped_kind="cost_cap")
    return dataclasses.replace(plan, members=tuple(shaped), concluders=tuple(concluders))


@dataclass(frozen=True, slots=True)
class Room:
    """What a capped plan leaves a concluding call: the output ceiling it is sent with, or why it is not made."""

    tokens: int
    refused: str | None = None


def room(
    plan: Plan,
    candidate: Concluder,
    messages: list[dict[str, Any]],
    spent: Decimal,
    prices: Prices | None,
    count: Counter = count_request,
) -> Room | None:
    """Under a cap (None without one): the concluding call's output ceiling from what is left once what was spent
    and what this call reads (our count) are paid, at most its own ceiling; refused when that is fewer than
    MIN_ANSWER_TOKENS (or its whole ceiling, when smaller)."""
    if candidate.ceiling is None or prices is None:
        return None
    return stage_room(plan, candidate.llm.model, candidate.ceiling, messages, spent, prices, plan.tools, count)


def stage_room(
    plan: Plan,
    model: str,
    ceiling: int,
    messages: list[dict[str, Any]],
    spent: Decimal,
    prices: Prices | None,
    tools: list[dict[str, Any]] | None = None,
    count: Counter = count_request,
) -> Room | None:
    """Under a cap (None without one): any call's output ceiling from what is left (`room`, for a strategy's
    stages too: a ranking, a judgement); an unpriced LLM is refused."""
    cap = plan.max_cost_usd
    if cap is None:
        return None
    if prices is None:
        return Room(0, f"under the cost cap of {usd(cap)}, an LLM without a known price is not asked")
    left = cap - spent - count(model, messages, tools) * prices.input
    price = output_price(prices)
    if price > 0:
        affordable = int((left / price).to_integral_value(rounding=ROUND_FLOOR)) if left > 0 else 0
    else:
        affordable = ceiling if left >= 0 else 0
    tokens = min(ceiling, affordable)
    if tokens >= min(MIN_ANSWER_TOKENS, ceiling) and tokens > 0:
        return Room(tokens)
    why = (
        f"of the cost cap of {usd(cap)}, {usd(spent)} was spent and {usd(max(left, ZERO))} is left once its input "
        f"is paid: {tokens} token(s) of answer, too few"
    )
    return Room(tokens, why)


def worst_of(
    tokens: int, messages: list[dict[str, Any]], model: str, prices: Prices, count: Counter = count_request
) -> Decimal:
    """A call's worst case: what it reads (our count) and `tokens` of answer."""
    return count(model, messages, None) * prices.input + tokens * output_price(prices)


@dataclass(frozen=True, slots=True)
class Reservation:
    """A call made under the cost cap: refused (why), or its output ceiling and the worst case to reserve before
    the next call made at the same time. Without a cap: neither (`max_tokens` None, nothing reserved)."""

    refused: str | None = None
    max_tokens: int | None = None
    worst: Decimal = ZERO


def reservation(
    plan: Plan, model: str, ceiling: int, messages: list[dict[str, Any]], spent: Decimal, prices: Prices | None
) -> Reservation:
    """A stage call's or a later round's member's place under the cap, after `spent` (and what is reserved)."""
    space = stage_room(plan, model, ceiling, messages, spent, prices)
    if space is None:
        return Reservation()
    if space.refused is not None or prices is None:
        return Reservation(refused=f"not asked: {space.refused}")
    return Reservation(max_tokens=space.tokens, worst=worst_of(space.tokens, messages, model, prices))
