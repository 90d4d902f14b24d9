"""The report of a run, per target, from the results file: exact-match score or win rate against the baseline,
each with its 95% Wilson interval; mean and total cost; latency p50/p95; errors. As a dict (the JSON output)."""

from __future__ import annotations

import re
from dataclasses import asdict, dataclass, field
from typing import Any

from mom_service.evaluation.dataset import Item
from mom_service.evaluation.judging import Outcome, combine
from mom_service.evaluation.results import AnswerRecord, ResultsFile
from mom_service.evaluation.scoring import exact_match
from mom_service.evaluation.stats import percentile, wilson
from mom_service.evaluation.targets import Target


@dataclass(slots=True)
class Rate:
    """A proportion with its 95% interval: correct answers of those scored, or a win rate (a tie counts half)."""

    value: float
    low: float
    high: float
    n: int


@dataclass(slots=True)
class TargetReport:
    target: str
    kind: str
    answered: int  # items with a finished answer
    errors: int  # items whose last attempt failed
    missing: int  # items not asked yet (a run stopped, or interrupted)
    score: Rate | None = None  # exact match over the items with an answer
    correct: int = 0
    win_rate: Rate | None = None  # against the baseline, over the judged items without an answer
    wins: int = 0
    losses: int = 0
    ties: int = 0
    cost_total_usd: float | None = None  # None when some answer's cost is unknown
    cost_mean_usd: float | None = None  # per answered item
    latency_p50_ms: float | None = None
    latency_p95_ms: float | None = None
    unpriced: int = 0  # answers whose cost is unknown

    @property
    def quality(self) -> Rate | None:
        """What the plot shows: the score when there is one, else the win rate."""
        return self.score or self.win_rate


@dataclass(slots=True)
class Report:
    dataset: str
    results_file: str
    items: int
    baseline: str | None
    judge: str | None
    stopped: bool  # the spending limit stopped the run before everything was done
    spent_usd: float  # by this run
    max_cost_usd: float | None
    judge_cost_usd: float | None  # every judging's, in the results file
    targets: list[TargetReport] = field(default_factory=list)

    def as_json(self) -> dict[str, Any]:
        out = asdict(self)
        for entry, target in zip(out["targets"], self.targets, strict=True):
            quality = target.quality
            entry["quality"] = quality.value if quality is not None else None
        return out


def _rate(successes: float, n: int) -> Rate | None:
    if n == 0:
        return None
    low, high = wilson(successes, n)
    return Rate(round(successes / n, 6), round(low, 6), round(high, 6), n)


def _outcomes(results: ResultsFile, items: list[Item], target: str, baseline: str) -> list[Outcome]:
    outcomes: list[Outcome] = []
    for item in items:
        if item.answer is not None:
            continue
        ab = results.judgments.get((item.id, target, baseline, "AB"))
        ba = results.judgments.get((item.id, target, baseline, "BA"))
        if ab is None or ba is None or ab.error is not None or ba.error is not None:
            continue
        outcomes.append(combine(ab.verdict, ba.verdict))
    return outcomes


def target_report(
    results: ResultsFile, items: list[Item], target: Target, baseline: Target | None, pattern: re.Pattern[str] | None
) -> TargetReport:
    records = [results.answers.get((item.id, target.name)) for item in items]
    done: list[tuple[Item, AnswerRecord]] = [
        (item, r) for item, r in zip(items, records, strict=True) if r is not None and r.error is None
    ]
    report = TargetReport(
        target=target.name,
        kind=target.kind,
        answered=len(done),
        errors=sum(1 for r in records if r is not None and r.error is not None),
        missing=sum(1 for r in records if r is None),
    )
    scored = [exact_match(r.text, item.answer, pattern) for item, r in done if item.answer is not None]
    report.correct = sum(scored)
    report.score = _rate(report.correct, len(scored))
    if baseline is not None and baseline != target:
        outcomes = _outcomes(results, items, target.name, baseline.name)
        report.wins, report.losses, report.ties = (outcomes.count(o) for o in ("win", "loss", "tie"))
        report.win_rate = _rate(report.wins + report.ties / 2, len(outcomes))
    costs = [r.cost_usd for r in records if r is not None]
    known = [c for c in costs if c is not None]
    report.unpriced = len(costs) - len(known)
    if costs and not report.unpriced:
        report.cost_total_usd = round(sum(known), 9)
        report.cost_mean_usd = round(sum(known) / len(done), 9) if done else None
    latencies = [r.latency_ms for _, r in done]
    report.latency_p50_ms, report.latency_p95_ms = percentile(latencies, 50), percentile(latencies, 95)
    return report


def judge_cost(results: ResultsFile) -> float | None:
    costs = [j.cost_usd for j in results.judgments.values()]
    if any(c is None for c in costs):
        return None
    return round(sum(c for c in costs if c is not None), 9)
