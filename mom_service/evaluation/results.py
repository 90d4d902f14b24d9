"""The results file (JSONL): one line per answer (item, target) and per judging (item, target, baseline, order),
appended as each finishes, so that a run stopped (a spending limit, Ctrl-C, a crash) resumes where it stopped: a
rerun with the same file skips what is finished. A failed answer is kept, and asked again by a rerun; the last line
of a key wins."""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Literal, TextIO

from mom_service.evaluation.errors import EvalError
from mom_service.evaluation.judging import Order, Verdict


@dataclass(slots=True)
class AnswerRecord:
    item: str
    target: str
    text: str
    cost_usd: float | None  # None: an LLM of the target has no known price
    latency_ms: float
    error: str | None = None
    correct: bool | None = None  # exact match, for an item with an answer (recomputed by the report)
    kind: Literal["answer"] = "answer"

    @property
    def key(self) -> tuple[str, ...]:
        return (self.item, self.target)


@dataclass(slots=True)
class JudgmentRecord:
    item: str
    target: str
    baseline: str
    order: Order
    verdict: Verdict | None  # None: the judge gave none (a tie), or failed (`error`)
    text: str
    cost_usd: float | None
    latency_ms: float
    error: str | None = None
    kind: Literal["judgment"] = "judgment"

    @property
    def key(self) -> tuple[str, ...]:
        return (self.item, self.target, self.baseline, self.order)


def _record(raw: dict[str, Any]) -> AnswerRecord | JudgmentRecord:
    kind = raw.get("kind")
    if kind == "answer":
        return AnswerRecord(**raw)
    if kind == "judgment":
        return JudgmentRecord(**raw)
    raise ValueError(f"unknown kind {kind!r}")


class ResultsFile:
    """What is finished, read from the file at the start; each new record appended (and flushed) at once."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.answers: dict[tuple[str, ...], AnswerRecord] = {}
        self.judgments: dict[tuple[str, ...], JudgmentRecord] = {}
        self._out: TextIO | None = None
        if path.exists():
            self._read()

    def _read(self) -> None:
        lines = self.path.read_text(encoding="utf-8").splitlines()
        for number, line in enumerate(lines, start=1):
            if not line.strip():
                continue
            try:
                record = _record(json.loads(line))
            except (ValueError, TypeError) as exc:
                if number == len(lines):
                    continue  # a line cut short by a crash: that piece of work is done again
                raise EvalError(f"{self.path}:{number}: not a results line ({exc})") from None
            self._keep(record)

    def _keep(self, record: AnswerRecord | JudgmentRecord) -> None:
        if isinstance(record, AnswerRecord):
            self.answers[record.key] = record
        else:
            self.judgments[record.key] = record

    def answered(self, item: str, target: str) -> AnswerRecord | None:
        """The item's finished answer by the target (None when it has none, or its last attempt failed)."""
        found = self.answers.get((item, target))
        return found if found is not None and found.error is None else None

    def judged(self, item: str, target: str, baseline: str, order: Order) -> bool:
        found = self.judgments.get((item, target, baseline, order))
        return found is not None and found.error is None

    def add(self, record: AnswerRecord | JudgmentRecord) -> None:
        if self._out is None:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            self._drop_cut_line()
            self._out = self.path.open("a", encoding="utf-8")
        self._out.write(json.dumps(asdict(record), ensure_ascii=False) + "\n")
        self._out.flush()
        self._keep(record)

    def _drop_cut_line(self) -> None:
        """A last line cut short by a crash (no newline: it was never whole) is removed before anything is added."""
        if not self.path.exists():
            return
        content = self.path.read_bytes()
        if content and not content.endswith(b"\n"):
            with self.path.open("r+b") as out:
                out.truncate(content.rfind(b"\n") + 1)

    def close(self) -> None:
        if self._out is not None:
            self._out.close()
            self._out = None
