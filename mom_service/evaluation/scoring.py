"""Exact-match scoring: the final answer extracted from a reply (a pattern, else a last "Answer: X", else the last
line) and both sides normalized (case, whitespace, surrounding punctuation, numbers such as "1,000" and "1000.0")."""

from __future__ import annotations

import re
from decimal import Decimal, InvalidOperation

from mom_service.evaluation.errors import EvalError

# "Answer: X" (also "Final answer: X", "**Answer:** X"), the last one in the reply wins
ANSWER_LINE = re.compile(r"^[\s*_#>-]*(?:final\s+)?answer\s*[*_]*\s*[:=]\s*[*_]*\s*(.+?)\s*$", re.IGNORECASE | re.M)
_GROUPED = re.compile(r"^[-+]?\d{1,3}(?:,\d{3})+(?:\.\d+)?$")
_EDGES = " \t\n\"'`*_.,;:!?()[]"


def compile_pattern(pattern: str | None) -> re.Pattern[str] | None:
    """`--answer-pattern`: its first group is the answer (the whole match when it has none)."""
    if pattern is None:
        return None
    try:
        return re.compile(pattern, re.IGNORECASE | re.MULTILINE)
    except re.error as exc:
        raise EvalError(f"--answer-pattern is not a valid regular expression: {exc}") from None


def extract(reply: str, pattern: re.Pattern[str] | None = None) -> str:
    """The final answer in a reply: the last match of `pattern` (its first group, else the whole match; "" when it
    does not match), else the last "Answer: X" line, else the last non-empty line."""
    if pattern is not None:
        matches = list(pattern.finditer(reply))
        if not matches:
            return ""
        last = matches[-1]
        return last.group(1) if pattern.groups else last.group(0)
    found = ANSWER_LINE.findall(reply)
    if found:
        return str(found[-1])
    lines = [line for line in reply.splitlines() if line.strip()]
    return lines[-1] if lines else ""


def normalize(answer: str) -> str:
    """Compared as: case folded, whitespace collapsed, surrounding punctuation and markup stripped, a number in one
    spelling ("1,000", "1000.0" and "1e3" are "1000")."""
    text = " ".join(answer.split()).strip(_EDGES).casefold()
    number = text.replace(",", "") if _GROUPED.match(text) else text
    try:
        value = Decimal(number)
    except InvalidOperation:
        return text
    if not value.is_finite():
        return text
    value = value.normalize()
    return f"{value:f}" if value != 0 else "0"


def exact_match(reply: str, expected: str, pattern: re.Pattern[str] | None = None) -> bool:
    return normalize(extract(reply, pattern)) == normalize(expected)
