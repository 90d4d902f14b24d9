"""The evaluation's runner with a scripted asker: the spending limit (what was spent plus the worst case in flight),
the resume from the results file, the judging in both orders, and the report made of it."""

from __future__ import annotations

import asyncio
from decimal import Decimal
from pathlib import Path
from typing import Any

from mom_service.evaluation.budget import Budget
from mom_service.evaluation.dataset import Item
from mom_service.evaluation.report import target_report
from mom_service.evaluation.results import ResultsFile
from mom_service.evaluation.runner import Plan, Runner
from mom_service.evaluation.targets import Answer, Target

MOM, SOLO = Target("mom", "mom"), Target("solo", "llm")


class Scripted:
    """Answers "<target> says / Answer: <question>" at `cost` (worst case `worst`); the judge gives its verdicts in
    turn."""

    def __init__(self, cost: str = "1", worst: str = "5", verdicts: list[str] | None = None) -> None:
        self.cost, self.worst = Decimal(cost), Decimal(worst)
        self.verdicts = list(verdicts or [])
        self.asked: list[tuple[str, str]] = []
        self.judged: list[str] = []
        self.in_flight = 0
        self.most_in_flight = 0

    async def ask(self, target: Target, messages: list[dict[str, Any]]) -> Answer:
        self.asked.append((target.name, messages[-1]["content"]))
        self.in_flight += 1
        self.most_in_flight = max(self.most_in_flight, self.in_flight)
        await asyncio.sleep(0)
        self.in_flight -= 1
        return Answer(f"{target.name} says\nAnswer: {messages[-1]['content']}", self.cost, 10.0)

    async def worst_case(self, target: Target, messages: list[dict[str, Any]]) -> Decimal | None:
        return self.worst

    async def call(self, name: str, messages: list[dict[str, Any]]) -> Answer:
        self.judged.append(messages[-1]["content"])
        return Answer(f"[[{self.verdicts.pop(0)}]]", self.cost, 10.0)

    def call_worst_case(self, name: str, messages: list[dict[str, Any]]) -> Decimal | None:
        return self.worst


class Quiet:
    def __init__(self) -> None:
        self.stages: list[tuple[str, int]] = []
        self.advanced = 0

    def stage(self, description: str, total: int) -> None:
        self.stages.append((description, total))

    def advance(self) -> None:
        self.advanced += 1


def _items(count: int, answered: bool = True) -> list[Item]:
    return [
        Item(str(n), [{"role": "user", "content": str(n)}], str(n) if answered else None) for n in range(1, count + 1)
    ]


async def test_the_cost_stop(tmp_path: Path) -> None:
    # each answer costs 1 and may cost 5: with a limit of 7 and one at a time, the third starts (2 + 5 <= 7), the
    # fourth does not (3 + 5 > 7)
    asker, budget = Scripted(cost="1", worst="5"), Budget(Decimal(7))
    results = ResultsFile(tmp_path / "r.jsonl")
    await Runner(asker, results, budget, 1).run(Plan(_items(6), [SOLO]), Quiet())
    results.close()
    assert [q for _, q in asker.asked] == ["1", "2", "3"]
    assert budget.stopped and budget.spent == 3 and budget.reserved == 0
    assert sorted(results.answers) == [("1", "solo"), ("2", "solo"), ("3", "solo")]


async def test_the_cost_stop_counts_the_work_in_flight(tmp_path: Path) -> None:
    # three at once, each reserving its worst case of 5 before anything is spent: only two fit under 12
    asker, budget = Scripted(cost="1", worst="5"), Budget(Decimal(12))
    results = ResultsFile(tmp_path / "r.jsonl")
    await Runner(asker, results, budget, 3).run(Plan(_items(6), [SOLO]), Quiet())
    results.close()
    assert len(asker.asked) == 2 and budget.stopped


async def test_an_unknown_worst_case_stops_a_limited_run(tmp_path: Path) -> None:
    asker, budget = Scripted(), Budget(Decimal(100))
    asker.worst = None  # type: ignore[assignment]
    results = ResultsFile(tmp_path / "r.jsonl")
    await Runner(asker, results, budget, 1).run(Plan(_items(2), [SOLO]), Quiet())
    results.close()
    assert asker.asked == [] and budget.stopped


async def test_without_a_limit_everything_runs_within_the_concurrency(tmp_path: Path) -> None:
    asker, budget = Scripted(), Budget(None)
    progress = Quiet()
    results = ResultsFile(tmp_path / "r.jsonl")
    await Runner(asker, results, budget, 2).run(Plan(_items(5), [MOM, SOLO]), progress)
    results.close()
    assert len(asker.asked) == 10 and not budget.stopped
    assert asker.most_in_flight == 2
    assert progress.stages == [("answers", 10)] and progress.advanced == 10


async def test_the_resume_asks_only_what_is_missing(tmp_path: Path) -> None:
    path = tmp_path / "r.jsonl"
    first = ResultsFile(path)
    await Runner(Scripted(), first, Budget(Decimal(7)), 1).run(Plan(_items(5), [MOM]), Quiet())
    first.close()
    asker = Scripted()
    again = ResultsFile(path)
    await Runner(asker, again, Budget(None), 1).run(Plan(_items(5), [MOM, SOLO]), Quiet())
    again.close()
    assert sorted(asker.asked) == sorted([("mom", "4"), ("mom", "5")] + [("solo", str(n)) for n in range(1, 6)])
    report = target_report(again, _items(5), MOM, None, None)
    assert (report.answered, report.correct, report.missing) == (5, 5, 0)


async def test_judging_in_both_orders(tmp_path: Path) -> None:
    # item 1: the target chosen in both orders (A, then B): a win; item 2: A both times: a tie; item 3: a loss
    asker = Scripted(verdicts=["A", "B", "A", "A", "B", "A"])
    results = ResultsFile(tmp_path / "r.jsonl")
    plan = Plan(_items(3, answered=False), [MOM, SOLO], baseline=SOLO, judge="referee")
    progress = Quiet()
    await Runner(asker, results, Budget(None), 1).run(plan, progress)
    assert progress.stages == [("answers", 6), ("judging", 6)]
    results.close()
    target_first, baseline_first = asker.judged[0], asker.judged[1]
    assert "<answer_a>\nmom says\nAnswer: 1\n</answer_a>" in target_first
    assert "<answer_b>\nsolo says\nAnswer: 1\n</answer_b>" in target_first
    assert "<answer_a>\nsolo says\nAnswer: 1\n</answer_a>" in baseline_first
    assert "<answer_b>\nmom says\nAnswer: 1\n</answer_b>" in baseline_first
    assert len(asker.judged) == 6
    assert [(j.item, j.order, j.verdict) for j in results.judgments.values()] == [
        ("1", "AB", "A"),
        ("1", "BA", "B"),
        ("2", "AB", "A"),
        ("2", "BA", "A"),
        ("3", "AB", "B"),
        ("3", "BA", "A"),
    ]
    report = target_report(results, plan.items, MOM, SOLO, None)
    assert (report.wins, report.ties, report.losses) == (1, 1, 1)
    assert report.win_rate is not None and report.win_rate.value == 0.5 and report.win_rate.n == 3
    assert report.score is None
    # a rerun asks nothing again
    rerun, reread = Scripted(), ResultsFile(tmp_path / "r.jsonl")
    await Runner(rerun, reread, Budget(None), 1).run(plan, Quiet())
    reread.close()
    assert rerun.asked == [] and rerun.judged == []
