"""Datasets: JSONL, one item a line (`messages` or `question`, optional `answer`, optional `id`); a built-in one by
name (`basic`) or any file by path."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from mom_service.evaluation.errors import EvalError

BUILT_IN = Path(__file__).parent / "datasets"
ROLES = {"system", "user", "assistant"}


@dataclass(frozen=True, slots=True)
class Item:
    """One question: the conversation asked, and the exact answer expected (None: judged against the baseline)."""

    id: str
    messages: list[dict[str, Any]]
    answer: str | None = None


def built_in_names() -> list[str]:
    return sorted(p.stem for p in BUILT_IN.glob("*.jsonl"))


def resolve(name: str) -> Path:
    """A dataset file: the path given, else a built-in dataset of that name."""
    path = Path(name)
    if path.is_file():
        return path
    own = BUILT_IN / f"{name}.jsonl"
    if own.is_file():
        return own
    raise EvalError(f"No dataset {name!r}: neither a file nor a built-in dataset ({', '.join(built_in_names())}).")


def _messages(raw: dict[str, Any], where: str) -> list[dict[str, Any]]:
    if "messages" in raw:
        messages = raw["messages"]
        ok = isinstance(messages, list) and bool(messages)
        ok = ok and all(
            isinstance(m, dict) and m.get("role") in ROLES and isinstance(m.get("content"), str) for m in messages
        )
        if not ok:
            raise EvalError(f"{where}: `messages` must be a non-empty list of {{role, content}} (text) messages")
        return [{"role": m["role"], "content": m["content"]} for m in messages]
    question = raw.get("question")
    if not isinstance(question, str) or not question.strip():
        raise EvalError(f"{where}: an item needs `messages` or a non-empty `question`")
    return [{"role": "user", "content": question}]


def _answer(raw: dict[str, Any], where: str) -> str | None:
    answer = raw.get("answer")
    if answer is None:
        return None
    if isinstance(answer, bool) or not isinstance(answer, str | int | float):
        raise EvalError(f"{where}: `answer` must be a string or a number")
    return str(answer)


def parse_item(line: str, number: int, source: str) -> Item:
    where = f"{source}:{number}"
    try:
        raw = json.loads(line)
    except json.JSONDecodeError as exc:
        raise EvalError(f"{where}: not JSON ({exc.msg})") from None
    if not isinstance(raw, dict):
        raise EvalError(f"{where}: an item is a JSON object")
    item_id = raw.get("id", number)
    if isinstance(item_id, bool) or not isinstance(item_id, str | int):
        raise EvalError(f"{where}: `id` must be a string or an integer")
    return Item(id=str(item_id), messages=_messages(raw, where), answer=_answer(raw, where))


def load(path: Path, limit: int | None = None) -> list[Item]:
    """The items of a JSONL file (blank lines skipped; an item's id is its `id`, else its line number)."""
    items: list[Item] = []
    seen: set[str] = set()
    for number, line in enumerate(path.read_text(encoding="utf-8").splitlines(), start=1):
        if not line.strip():
            continue
        item = parse_item(line, number, str(path))
        if item.id in seen:
            raise EvalError(f"{path}:{number}: the id {item.id!r} is used twice")
        seen.add(item.id)
        items.append(item)
        if limit is not None and len(items) >= limit:
            break
    if not items:
        raise EvalError(f"{path}: no items")
    return items
