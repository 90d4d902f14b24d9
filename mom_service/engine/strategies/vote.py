"""vote, for short answers: each member's final answer (the MoM model's `vote_pattern`, else its last line),
normalized; the most common one wins and the first member (in the panel's order) who gave it has its whole answer
returned verbatim; a tie goes to best_of among the tied answers."""

from __future__ import annotations

from collections.abc import AsyncGenerator, Sequence
from typing import Any

from mom_service.engine.calls import Calls
from mom_service.engine.concluding import Concluded
from mom_service.engine.events import Breakdown, CallReport, Event, PanelDone, StageDone, StageStarted
from mom_service.engine.plan import Plan
from mom_service.engine.strategies.ballots import final_answer, normalize
from mom_service.engine.strategies.best_of import judged, returned
from mom_service.engine.tracing import Trace


def count_votes(answered: Sequence[CallReport], pattern: str | None) -> list[dict[str, Any]]:
    """Each final answer given (normalized), its count and its members, the most common first (ties in the order
    first given); members whose final answer cannot be read cast no vote."""
    votes: dict[str, list[str]] = {}
    for report in answered:
        final = final_answer(report.text, pattern)
        if final is not None and normalize(final):
            votes.setdefault(normalize(final), []).append(report.name)
    tallied = [{"answer": answer, "count": len(names), "members": names} for answer, names in votes.items()]
    return sorted(tallied, key=lambda entry: -entry["count"])


def _summary(votes: list[dict[str, Any]]) -> str:
    lines = ["Votes:"] + [f"- {v['answer']!r}: {v['count']} ({', '.join(v['members'])})" for v in votes]
    return "\n".join(lines or ["Votes: none could be read"]) + "\n"


async def vote(
    calls: Calls, plan: Plan, breakdown: Breakdown, trace: Trace, concluded: Concluded
) -> AsyncGenerator[Event]:
    answered = [r for r in breakdown.members if r.status == "ok"]
    yield StageStarted("vote")
    votes = breakdown.votes = count_votes(answered, plan.mom.vote_pattern)
    top = [v for v in votes if v["count"] == votes[0]["count"]] if votes else []
    by_name = {r.name: r for r in answered}
    if len(top) == 1:
        chosen = by_name[top[0]["members"][0]]
        breakdown.concluding.skipped("vote", "not asked: the vote decided")
        decided = f"Majority: {top[0]['answer']!r}, {chosen.name}'s answer\n---\n"
    else:  # a tie (or no vote read): the concluding LLM judges the tied answers
        tied = [by_name[name] for v in top for name in v["members"]] or answered
        tied.sort(key=answered.index)
        chosen, decided = await judged(calls, plan, breakdown, trace, tied)
        decided = f"No majority: {decided}"
    yield StageDone("vote", _summary(votes) + decided)
    yield PanelDone(breakdown.members, selected=chosen.name)
    async for event in returned(chosen, breakdown, concluded):
        yield event
