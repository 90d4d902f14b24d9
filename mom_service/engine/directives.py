"""In-message directives: a `<<SYSTEM>> ... <</SYSTEM>>` block in the last user message steers the request, for
clients that cannot add a body field (chat UIs, coding agents). Its leading `key: value` lines take the keys of the
`mom` field; the rest of the block is an instruction for the concluding LLM only. Every block is removed from what
the LLMs see (a block in an earlier user message is stale: removed, not applied)."""

from __future__ import annotations

import difflib
import re
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any

BLOCK = re.compile(r"<<\s*SYSTEM\s*>>(.*?)<<\s*/\s*SYSTEM\s*>>", re.IGNORECASE | re.DOTALL)
_KEY_LINE = re.compile(r"^\s*([A-Za-z][A-Za-z0-9_-]*)\s*:\s*(.*?)\s*$")
_TEXT_PARTS = ("text", "input_text")


@dataclass(slots=True)
class Directive:
    """What the blocks of the last user message say: their keys (as written, values as text), their instruction."""

    keys: dict[str, str] = field(default_factory=dict)
    instruction: str = ""
    found: bool = False  # a block was there (even an empty one)


def _key(name: str, known: Iterable[str]) -> str | None:
    """A line's key, normalized, when it is a key of the `mom` field or close to one (a misspelt key is still a key,
    reported as unknown with its suggestion); None for the first line of an instruction ("Note: be brief")."""
    key = name.lower().replace("-", "_")
    known = list(known)
    return key if key in known or difflib.get_close_matches(key, known, n=1, cutoff=0.75) else None


def _read(block: str, known: Sequence[str], into: Directive) -> None:
    lines = block.strip("\n").splitlines()
    index = 0
    while index < len(lines) and not lines[index].strip():
        index += 1
    while index < len(lines):
        found = _KEY_LINE.match(lines[index])
        key = _key(found[1], known) if found else None
        if found is None or key is None:
            break
        into.keys[key] = found[2]
        index += 1
    instruction = "\n".join(lines[index:]).strip()
    if instruction:
        into.instruction = f"{into.instruction}\n{instruction}".strip()


def _strip(text: str, known: Sequence[str], into: Directive | None) -> str:
    def taken(match: re.Match[str]) -> str:
        if into is not None:
            into.found = True
            _read(match[1], known, into)
        return ""

    return BLOCK.sub(taken, text).strip()


def _has_block(message: dict[str, Any]) -> bool:
    content = message.get("content")
    if isinstance(content, str):
        return "<<" in content and BLOCK.search(content) is not None
    if isinstance(content, list):
        return any(isinstance(p, dict) and BLOCK.search(str(p.get("text") or "")) for p in content)
    return False


def _without_blocks(message: dict[str, Any], known: Sequence[str], into: Directive | None) -> dict[str, Any]:
    content = message.get("content")
    if isinstance(content, str):
        return {**message, "content": _strip(content, known, into)}
    parts = []
    for part in content or []:
        if isinstance(part, dict) and part.get("type") in _TEXT_PARTS and isinstance(part.get("text"), str):
            text = _strip(part["text"], known, into)
            if not text:
                continue  # a part that was only a block
            part = {**part, "text": text}
        parts.append(part)
    return {**message, "content": parts}


def extract(messages: list[dict[str, Any]], known: Sequence[str]) -> tuple[list[dict[str, Any]], Directive]:
    """The conversation without its blocks, and the directive of the last user message's blocks. The messages are
    copied only where a block is removed; a conversation without any block is returned as it is."""
    directive = Directive()
    last_user = max((i for i, m in enumerate(messages) if m.get("role") == "user"), default=-1)
    if not any(m.get("role") == "user" and _has_block(m) for m in messages):
        return messages, directive
    out = []
    for index, message in enumerate(messages):
        if message.get("role") == "user" and _has_block(message):
            message = _without_blocks(message, known, directive if index == last_user else None)
            if not message["content"] and index != last_user:
                continue  # an earlier message that was only a block: nothing left to read
        out.append(message)
    return out, directive
