"""best_of: the concluding LLM judges the panel's answers, anonymized under shuffled labels, and names the best;
that member's answer is returned verbatim (streamed as it is, not rewritten). `vote` uses it to break a tie."""

from __future__ import annotations

import random
import re
from collections.abc import AsyncGenerator, Sequence

from mom_service.engine.calls import Calls
from mom_service.engine.concluding import Concluded
from mom_service.engine.events import Breakdown, CallReport, ContentDelta, Event, PanelDone, StageDone, StageStarted
from mom_service.engine.plan import Plan
from mom_service.engine.strategies.ballots import anonymize, parse_pick
from mom_service.engine.strategies.prompts import judge_messages
from mom_service.engine.strategies.stage import ask, reserve, stage_report
from mom_service.engine.tracing import Trace
from mom_service.providers.pricing import ZERO

_PIECE = re.compile(r"\S+\s*|\s+")


async def judged(
    calls: Calls, plan: Plan, breakdown: Breakdown, trace: Trace, candidates: Sequence[CallReport]
) -> tuple[CallReport, str]:
    """The best of `candidates` as the concluding LLM (or its fallbacks, in order) judges it, and the thinking
    context's summary. One candidate needs no judge; when no judge names one, the first (in the panel's order)."""
    if len(candidates) == 1:
        breakdown.concluding.skipped("not_needed", "not asked: a single answer to choose from")
        return candidates[0], f"Selected: {candidates[0].name} (the only answer)\n---\n"
    ballot = anonymize(candidates, random.Random())
    for number, who in enumerate(plan.concluders):
        if number:
            breakdown.concluding_failed.append(breakdown.concluding)
        report = breakdown.concluding = stage_report(who, "concluding", "judge")
        messages = judge_messages(who.conversation, ballot)
        params, _ = reserve(calls, plan, who, report, messages, breakdown.cost or ZERO)
        if params is None:
            break
        await ask(calls, who, report, messages, params, trace)
        if report.status != "ok":
            continue
        pick = parse_pick(report.text, list(ballot.names))
        if pick is not None:
            chosen = next(r for letter, r in ballot.order if letter == pick)
            shown = ", ".join(f"Response {letter}: {r.name}" for letter, r in ballot.order)
            return chosen, f"Judge {who.llm.name} ({shown}) picked Response {pick}: {chosen.name}\n---\n"
        break
    first = candidates[0]
    breakdown.notices.append(f"strategy: the judge named no answer; {first.name}'s, the first, is returned.")
    return first, f"Selected: {first.name} (the judge named none)\n---\n"


async def returned(report: CallReport, breakdown: Breakdown, concluded: Concluded) -> AsyncGenerator[Event]:
    """A member's answer as the answer, verbatim, streamed in pieces as it is."""
    breakdown.selected = report.name
    for piece in _PIECE.findall(report.text):
        concluded.pieces.append(piece)
        yield ContentDelta(piece)
    concluded.finish_reason = "stop"


async def best_of(
    calls: Calls, plan: Plan, breakdown: Breakdown, trace: Trace, concluded: Concluded
) -> AsyncGenerator[Event]:
    answered = [r for r in breakdown.members if r.status == "ok"]
    yield StageStarted("judge")
    chosen, summary = await judged(calls, plan, breakdown, trace, answered)
    yield StageDone("judge", summary)
    yield PanelDone(breakdown.members, selected=chosen.name)
    async for event in returned(chosen, breakdown, concluded):
        yield event
