"""A run: every (item, target) answer not yet finished, then every judging (both orders) of the items without an
exact answer, with bounded concurrency and the spending limit; each result appended to the results file as it
ends."""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable, Iterator
from dataclasses import dataclass
from decimal import Decimal
from typing import Any, Protocol

from mom_service.evaluation.budget import Budget
from mom_service.evaluation.dataset import Item
from mom_service.evaluation.judging import ORDERS, Order, in_order, judge_messages, parse_verdict
from mom_service.evaluation.results import AnswerRecord, JudgmentRecord, ResultsFile
from mom_service.evaluation.scoring import exact_match
from mom_service.evaluation.targets import Answer, Target

Record = AnswerRecord | JudgmentRecord


class Asking(Protocol):
    """How the runner asks (targets.Asker in a real run)."""

    async def ask(self, target: Target, messages: list[dict[str, Any]]) -> Answer: ...
    async def worst_case(self, target: Target, messages: list[dict[str, Any]]) -> Decimal | None: ...
    async def call(self, name: str, messages: list[dict[str, Any]]) -> Answer: ...
    def call_worst_case(self, name: str, messages: list[dict[str, Any]]) -> Decimal | None: ...


class Progress(Protocol):
    def stage(self, description: str, total: int) -> None: ...
    def advance(self) -> None: ...


@dataclass(frozen=True, slots=True)
class Plan:
    """What a run asks: the items, the targets (the baseline among them), the judge, the answer pattern."""

    items: list[Item]
    targets: list[Target]
    baseline: Target | None = None
    judge: str | None = None
    pattern: Any = None  # a compiled --answer-pattern, or None


@dataclass(frozen=True, slots=True)
class Work:
    """One piece of work: its worst case (asked before it starts) and the work itself, which yields its record."""

    worst: Callable[[], Awaitable[Decimal | None]]
    run: Callable[[], Awaitable[tuple[Record, Decimal | None]]]


def _cost(value: Decimal | None) -> float | None:
    return float(value) if value is not None else None


class Runner:
    def __init__(self, asker: Asking, results: ResultsFile, budget: Budget, concurrency: int) -> None:
        self.asker = asker
        self.results = results
        self.budget = budget
        self.concurrency = max(1, concurrency)

    async def run(self, plan: Plan, progress: Progress) -> None:
        """The answers, then (unless the limit stopped the run) the judgings."""
        answers = list(self._answers(plan))
        progress.stage("answers", len(answers))
        await self._run(answers, progress)
        if self.budget.stopped or plan.judge is None or plan.baseline is None:
            return
        judgings = list(self._judgings(plan, plan.judge, plan.baseline))
        progress.stage("judging", len(judgings))
        await self._run(judgings, progress)

    async def _run(self, work: list[Work], progress: Progress) -> None:
        """At most `concurrency` at once, started in order, each only when the budget admits it."""
        slots = asyncio.Semaphore(self.concurrency)
        running: set[asyncio.Task[None]] = set()
        try:
            for piece in work:
                await slots.acquire()
                worst = await piece.worst()
                if not self.budget.admit(worst):
                    slots.release()
                    break
                task = asyncio.create_task(self._one(piece, worst, slots, progress))
                running.add(task)
                task.add_done_callback(running.discard)
            if running:
                await asyncio.gather(*running)
        finally:
            for task in running:
                task.cancel()

    async def _one(self, piece: Work, worst: Decimal | None, slots: asyncio.Semaphore, progress: Progress) -> None:
        try:
            record, cost = await piece.run()
            self.budget.settle(worst, cost)
            self.results.add(record)
            progress.advance()
        finally:
            slots.release()

    def _answers(self, plan: Plan) -> Iterator[Work]:
        for item in plan.items:
            for target in plan.targets:
                if self.results.answered(item.id, target.name) is None:
                    yield self._answer_work(item, target, plan)

    def _answer_work(self, item: Item, target: Target, plan: Plan) -> Work:
        async def worst() -> Decimal | None:
            return await self.asker.worst_case(target, item.messages)

        async def run() -> tuple[Record, Decimal | None]:
            answer = await self.asker.ask(target, item.messages)
            correct = None
            if item.answer is not None and answer.error is None:
                correct = exact_match(answer.text, item.answer, plan.pattern)
            record = AnswerRecord(
                item.id, target.name, answer.text, _cost(answer.cost), answer.latency_ms, answer.error, correct
            )
            return record, answer.cost

        return Work(worst, run)

    def _judgings(self, plan: Plan, judge: str, baseline: Target) -> Iterator[Work]:
        for item in plan.items:
            if item.answer is not None:
                continue
            base = self.results.answered(item.id, baseline.name)
            for target in plan.targets:
                own = self.results.answered(item.id, target.name)
                if target == baseline or own is None or base is None:
                    continue
                for order in ORDERS:
                    if not self.results.judged(item.id, target.name, baseline.name, order):
                        yield self._judging_work(item, judge, order, own, base)

    def _judging_work(self, item: Item, judge: str, order: Order, own: AnswerRecord, base: AnswerRecord) -> Work:
        messages = judge_messages(item.messages, *in_order(order, own.text, base.text))

        async def worst() -> Decimal | None:
            return self.asker.call_worst_case(judge, messages)

        async def run() -> tuple[Record, Decimal | None]:
            answer = await self.asker.call(judge, messages)
            verdict = parse_verdict(answer.text) if answer.error is None else None
            record = JudgmentRecord(
                item=item.id,
                target=own.target,
                baseline=base.target,
                order=order,
                verdict=verdict,
                text=answer.text,
                cost_usd=_cost(answer.cost),
                latency_ms=answer.latency_ms,
                error=answer.error,
            )
            return record, answer.cost

        return Work(worst, run)
