"""Pairwise judging: the judge LLM compares a target's answer with the baseline's, twice, in both orders (the
target as A, then as B); the target wins or loses only when both orders agree, else it is a tie."""

from __future__ import annotations

import re
from typing import Any, Literal

Verdict = Literal["A", "B", "tie"]
Outcome = Literal["win", "loss", "tie"]
Order = Literal["AB", "BA"]  # AB: the target's answer is A; BA: it is B
ORDERS: tuple[Order, Order] = ("AB", "BA")

JUDGE_SYSTEM = (
    "You are an impartial judge. You compare two AI assistants' answers to the conversation shown, and decide "
    "which one answers the user's last message better: correctness first, then helpfulness, relevance, depth and "
    "clarity. The order of the answers must not influence you, nor their length, nor the assistants' names. "
    "Explain your reasoning briefly, then give your verdict on the last line, exactly one of: [[A]] if answer A is "
    "better, [[B]] if answer B is better, [[tie]] if they are equally good."
)
_VERDICT = re.compile(r"\[\[\s*(A|B|tie)\s*\]\]", re.IGNORECASE)


def _transcript(messages: list[dict[str, Any]]) -> str:
    return "\n\n".join(f"[{m['role']}]\n{m['content']}" for m in messages)


def judge_messages(conversation: list[dict[str, Any]], answer_a: str, answer_b: str) -> list[dict[str, Any]]:
    """What the judge is asked: the conversation, answer A, answer B, and the verdict's format."""
    user = (
        f"<conversation>\n{_transcript(conversation)}\n</conversation>\n\n"
        f"<answer_a>\n{answer_a}\n</answer_a>\n\n"
        f"<answer_b>\n{answer_b}\n</answer_b>\n\n"
        "Which answer is better? End with your verdict on the last line: [[A]], [[B]] or [[tie]]."
    )
    return [{"role": "system", "content": JUDGE_SYSTEM}, {"role": "user", "content": user}]


def in_order(order: Order, target: str, baseline: str) -> tuple[str, str]:
    """(answer A, answer B) of one order."""
    return (target, baseline) if order == "AB" else (baseline, target)


def parse_verdict(reply: str) -> Verdict | None:
    """The judge's verdict: its last [[A]], [[B]] or [[tie]]; None when it gave none."""
    found = _VERDICT.findall(reply)
    if not found:
        return None
    last = found[-1]
    return "tie" if last.lower() == "tie" else "A" if last.upper() == "A" else "B"


def for_target(order: Order, verdict: Verdict | None) -> Outcome:
    """One order's verdict as the target's outcome (no verdict is a tie)."""
    if verdict is None or verdict == "tie":
        return "tie"
    target_label = "A" if order == "AB" else "B"
    return "win" if verdict == target_label else "loss"


def combine(ab: Verdict | None, ba: Verdict | None) -> Outcome:
    """Both orders' verdicts as one outcome: a win or a loss when they agree, a tie when they disagree."""
    first, second = for_target("AB", ab), for_target("BA", ba)
    return first if first == second else "tie"
