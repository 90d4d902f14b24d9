"""The strategies' pure logic: answers anonymized under shuffled labels, rankings and picks read from an LLM's text
(robust to extra text, missing and repeated labels), the Borda count with self-votes excluded, and a final answer
extracted and normalized for a vote."""

from __future__ import annotations

import random
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from decimal import Decimal, InvalidOperation
from typing import Any

from mom_service.engine.events import CallReport

RANKING_MARK = "RANKING:"
PICK_MARK = "BEST:"

_LABEL = re.compile(r"\bResponse\s+([A-Z]{1,2})\b")
_BARE = re.compile(r"\b([A-Z]{1,2})\b")


def label(index: int) -> str:
    """The index-th label: A ... Z, then AA, AB, ..."""
    if index < 26:
        return chr(ord("A") + index)
    return chr(ord("A") + index // 26 - 1) + chr(ord("A") + index % 26)


@dataclass(frozen=True, slots=True)
class Ballot:
    """The answers under anonymous labels, in a shuffled order: `order` lists (label, report) as shown."""

    order: tuple[tuple[str, CallReport], ...]

    @property
    def names(self) -> dict[str, str]:
        """Each label's member."""
        return {letter: report.name for letter, report in self.order}

    def block(self) -> str:
        """The answers as the rankers and the judge read them: labelled, without their members' names."""
        parts = []
        for letter, report in self.order:
            parts.append(f'<response label="Response {letter}">\n{_neutralise(report.text)}\n</response>')
        return "\n\n".join(parts)


def _neutralise(text: str) -> str:
    return re.sub(r"<\s*(/?)\s*response", lambda m: f"&lt;{m.group(1)}response", text, flags=re.IGNORECASE)


def anonymize(reports: Sequence[CallReport], rng: random.Random | None = None) -> Ballot:
    """The answers shuffled, labelled A, B, ... in their new order."""
    shuffled = list(reports)
    (rng or random.Random()).shuffle(shuffled)
    return Ballot(tuple((label(i), report) for i, report in enumerate(shuffled)))


def _marked_line(text: str, mark: str) -> str | None:
    """What follows the last occurrence of `mark` (case-insensitive), up to the end of its line."""
    at = text.upper().rfind(mark)
    if at < 0:
        return None
    return text[at + len(mark) :].split("\n", 1)[0]


def parse_ranking(text: str, labels: Sequence[str]) -> list[str]:
    """A ranking, best first, as labels: from the last `RANKING:` line (`Response B, Response A` or `B, A`), else
    every `Response X` in the text in order. Unknown labels are dropped, a repeated one counts where it is first."""
    known = set(labels)
    line = _marked_line(text, RANKING_MARK)
    found: list[str] = []
    if line is not None:
        found = _LABEL.findall(line) or _BARE.findall(line)
    if not [f for f in found if f in known]:
        found = _LABEL.findall(text)
    return list(dict.fromkeys(f for f in found if f in known))


def parse_pick(text: str, labels: Sequence[str]) -> str | None:
    """The label a judge names as best: the first in its last `BEST:` line, else its last `Response X`; None when
    it names none of `labels`."""
    known = set(labels)
    line = _marked_line(text, PICK_MARK)
    if line is not None:
        found: list[str] = [f for f in (_LABEL.findall(line) or _BARE.findall(line)) if f in known]
        if found:
            return found[0]
    mentioned: list[str] = [f for f in _LABEL.findall(text) if f in known]
    return mentioned[-1] if mentioned else None


def same_llm(ranker: str, member: str) -> bool:
    """Whether a member's answer is the ranker's own (a sample `NAME#2` is its LLM's, `NAME`)."""
    return member == ranker or member.split("#", 1)[0] == ranker.split("#", 1)[0]


def borda(rankings: Mapping[str, Sequence[str]], names: Mapping[str, str]) -> dict[str, int]:
    """Each member's Borda score. A ranker's candidates are every label but its own answer's (self-votes
    excluded); of n candidates, its first gets n-1 points, its last ranked one point fewer per place, and the
    candidates it leaves out none."""
    scores = dict.fromkeys(names.values(), 0)
    for ranker, ranking in rankings.items():
        candidates = [letter for letter, member in names.items() if not same_llm(ranker, member)]
        ranked = [letter for letter in ranking if letter in candidates]
        for place, letter in enumerate(ranked):
            scores[names[letter]] += len(candidates) - 1 - place
    return scores


def standings(scores: Mapping[str, int], order: Sequence[str]) -> list[dict[str, Any]]:
    """The members best first (ties in `order`, the panel's), each with its score and rank (ties share one)."""
    ranked = sorted(order, key=lambda name: (-scores.get(name, 0), order.index(name)))
    out: list[dict[str, Any]] = []
    for place, name in enumerate(ranked, start=1):
        tied = out and out[-1]["score"] == scores.get(name, 0)
        out.append({"name": name, "score": scores.get(name, 0), "rank": out[-1]["rank"] if tied else place})
    return out


# ------------------------------------------------------------------------------------------------------ the vote

_PREFIX = re.compile(r"^(?:the\s+)?(?:final\s+)?answer(?:\s+is)?\s*[:=-]?\s*", re.IGNORECASE)
_EDGES = " \t.,;:!?*_`'\"()[]{}"
_NUMBER = re.compile(r"(?<![\w.,])[-+]?(?:\d{1,3}(?:,\d{3})+|\d+)(?:\.\d+)?(?![\w.,]*\d)")


def final_answer(text: str, pattern: str | None = None) -> str | None:
    """An answer's final answer: the last match of `pattern` (its first group, or the whole match), else its last
    non-empty line; None when the pattern does not match or there is no text."""
    if pattern is not None:
        matches = list(re.finditer(pattern, text))
        if not matches:
            return None
        last = matches[-1]
        found: str | None = last.group(1) if last.re.groups else last.group(0)
        return found
    lines = [line for line in text.splitlines() if line.strip()]
    return lines[-1] if lines else None


def normalize(answer: str) -> str:
    """A final answer as votes compare it: lower case, whitespace collapsed, an `Answer:` prefix and surrounding
    punctuation dropped, each number in one spelling (1,000.50 and 1000.5 alike, 42.0 and 42)."""
    text = " ".join(answer.split()).strip(_EDGES)
    text = _PREFIX.sub("", text).strip(_EDGES).lower()
    return _NUMBER.sub(_number, text)


def _number(match: re.Match[str]) -> str:
    try:
        spelled = format(Decimal(match.group(0).replace(",", "")).normalize(), "f")
    except InvalidOperation:
        return match.group(0)
    return "0" if spelled in ("-0", "+0") else spelled.lstrip("+")
