"""rank: after the panel answers, each ranker (the members who answered, or the MoM model's `rankers:`) reads the
answers anonymized under shuffled labels and ranks them, best first; a Borda count with self-votes excluded
aggregates the rankings, and the concluding LLM synthesizes from the answers in ranked order with their scores."""

from __future__ import annotations

import asyncio
import random
from collections.abc import AsyncGenerator, Sequence
from contextlib import aclosing
from typing import Any

from mom_service.engine.calls import Calls
from mom_service.engine.concluding import Concluded, conclude
from mom_service.engine.events import Breakdown, CallReport, Event, PanelDone, StageDone, StageStarted
from mom_service.engine.plan import Concluder, Plan
from mom_service.engine.strategies.ballots import Ballot, anonymize, borda, parse_ranking, standings
from mom_service.engine.strategies.prompts import rank_messages
from mom_service.engine.strategies.stage import ask, reserve, stage_report
from mom_service.engine.tracing import Trace
from mom_service.providers.pricing import ZERO


def _rankers(plan: Plan, answered: Sequence[CallReport]) -> list[Concluder]:
    """Who ranks: the configured rankers, else the members who answered."""
    if plan.mom.rankers is not None:
        return list(plan.rankers)
    names = {r.name for r in answered}
    return [r for r in plan.rankers if r.llm.name in names]


async def rankings(
    calls: Calls, plan: Plan, breakdown: Breakdown, trace: Trace, ballot: Ballot
) -> dict[str, list[str]]:
    """Every ranker asked at once (under a cost cap, each within what is left once the ones before it are
    reserved); each one's ranking as labels (an unreadable one: empty)."""
    answered = [r for _, r in ballot.order]
    asked: list[tuple[Concluder, CallReport, list[dict[str, Any]], dict[str, Any]]] = []
    reserved = breakdown.cost or ZERO
    for who in _rankers(plan, answered):
        report = stage_report(who, "ranker", "rank")
        breakdown.stage_calls.append(report)
        messages = rank_messages(who.conversation, ballot)
        params, worst = reserve(calls, plan, who, report, messages, reserved)
        if params is not None:
            reserved += worst
            asked.append((who, report, messages, params))
    await asyncio.gather(*(ask(calls, who, report, messages, params, trace) for who, report, messages, params in asked))
    labels = list(ballot.names)
    return {report.name: parse_ranking(report.text, labels) for _, report, _, _ in asked if report.status == "ok"}


def summary(ballot: Ballot, ranked: dict[str, list[str]], table: list[dict[str, Any]]) -> str:
    """The rankings as the thinking context shows them."""
    names = ballot.names
    lines = ["Rankings (" + ", ".join(f"Response {letter}: {name}" for letter, name in names.items()) + "):"]
    for ranker, ranking in ranked.items():
        shown = ", ".join(f"Response {letter}" for letter in ranking) or "(no ranking read)"
        lines.append(f"- {ranker}: {shown}")
    lines.append("Borda count (self-votes excluded):")
    lines += [f"{entry['rank']}. {entry['name']}: {entry['score']}" for entry in table]
    return "\n".join(lines) + "\n---\n"


async def rank(
    calls: Calls, plan: Plan, breakdown: Breakdown, trace: Trace, concluded: Concluded
) -> AsyncGenerator[Event]:
    answered = [r for r in breakdown.members if r.status == "ok"]
    yield StageStarted("rank")
    ballot = anonymize(answered, random.Random())
    ranked = await rankings(calls, plan, breakdown, trace, ballot) if len(answered) > 1 else {}
    table = standings(borda(ranked, ballot.names), [r.name for r in answered])
    breakdown.ranking = table
    yield StageDone("rank", summary(ballot, ranked, table))
    yield PanelDone(breakdown.members)
    async with aclosing(conclude(calls, plan, breakdown, trace, concluded)) as events:
        async for event in events:
            yield event
