"""What a strategy's stages read: the rankers' and the judge's prompts over the anonymized answers, and the
references a Mixture-of-Agents round adds. Pure: the stages call them, and the cost cap counts them."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from mom_service.engine.events import CallReport
from mom_service.engine.strategies.ballots import PICK_MARK, RANKING_MARK, Ballot
from mom_service.engine.synthesis import UNTRUSTED_NOTICE

RANK_PROMPT = (
    "You are a reviewer on a panel of AI assistants. Several answers to the user's last message follow, each under "
    "an anonymous label. Rank them from best to worst: correct, complete, clear and helpful."
)


def rank_instruction(labels: Sequence[str]) -> str:
    listed = ", ".join(f"Response {letter}" for letter in labels)
    return (
        "Give a few sentences of reasons, then, on the last line, every label once, best first, exactly as: "
        f"{RANKING_MARK} {listed}"
    )


def rank_messages(conversation: Sequence[dict[str, Any]], ballot: Ballot) -> list[dict[str, Any]]:
    """What a ranker reads: its prompt, the conversation, the labelled answers and the format of its ranking."""
    labels = list(ballot.names)
    notice = UNTRUSTED_NOTICE.replace("panel_answer", "response")
    block = "\n\n".join([notice, ballot.block(), rank_instruction(labels)])
    return [{"role": "system", "content": RANK_PROMPT}, *conversation, {"role": "user", "content": block}]


JUDGE_PROMPT = (
    "You are the judge of a panel of AI assistants. Several answers to the user's last message follow, each under "
    "an anonymous label. Decide which one answers it best: correct, complete, clear and helpful. Do not rewrite "
    "any answer."
)
JUDGE_INSTRUCTION = (
    f"Give one or two sentences of reasons, then, on the last line, the label of the best answer exactly as: "
    f"{PICK_MARK} Response X"
)


def judge_messages(conversation: Sequence[dict[str, Any]], ballot: Ballot) -> list[dict[str, Any]]:
    """What the judge reads: its prompt, the conversation, the labelled answers and the format of its verdict."""
    block = "\n\n".join([UNTRUSTED_NOTICE.replace("panel_answer", "response"), ballot.block(), JUDGE_INSTRUCTION])
    return [{"role": "system", "content": JUDGE_PROMPT}, *conversation, {"role": "user", "content": block}]


REFERENCES_HEAD = (
    "Other assistants answered the user's last message too; their answers follow as references. Use them to write "
    "a better answer of your own: keep what is right, correct what is wrong, add what is missing. Answer the user "
    "directly; do not mention the references."
)


def references(reports: Sequence[CallReport]) -> dict[str, Any]:
    """The previous round's answers, as the system message a member reads last."""
    notice = UNTRUSTED_NOTICE.replace("panel_answer", "reference")
    blocks = [
        f'<reference index="{number}">\n{report.text.replace("<reference", "&lt;reference")}\n</reference>'
        for number, report in enumerate((r for r in reports if r.status == "ok"), start=1)
    ]
    return {"role": "system", "content": "\n\n".join([REFERENCES_HEAD, notice, *blocks])}
