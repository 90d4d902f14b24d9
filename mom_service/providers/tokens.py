"""Token counts: as a provider reports them (`Usage`), and our own count for a call whose provider reported none,
bounded in CPU whatever the size of the conversation."""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import orjson

from mom_service.providers.litellm_api import litellm

# Token counting costs CPU in proportion to the text: past this many characters, a call's tokens are estimated
# from a sample of this size, scaled to the whole (the count is an estimate either way, and marked as one).
COUNT_SAMPLE_CHARS = 16_384
COUNT_SAMPLE_MESSAGES = 64


@dataclass(slots=True)
class Usage:
    prompt_tokens: int = 0
    completion_tokens: int = 0  # includes reasoning tokens, as OpenAI reports them
    reasoning_tokens: int = 0
    cached_tokens: int = 0

    @property
    def total_tokens(self) -> int:
        return self.prompt_tokens + self.completion_tokens

    def add(self, other: Usage) -> None:
        self.prompt_tokens += other.prompt_tokens
        self.completion_tokens += other.completion_tokens
        self.reasoning_tokens += other.reasoning_tokens
        self.cached_tokens += other.cached_tokens


def _tokens(model: str, texts: list[str]) -> int:
    """Tokens of some texts; past COUNT_SAMPLE_CHARS in all, of a sample of that size scaled to the whole."""
    total = sum(map(len, texts))
    sample: list[str] = []
    taken = 0
    for text in texts:
        sample.append(text[: COUNT_SAMPLE_CHARS - taken])
        taken += len(sample[-1])
        if taken >= COUNT_SAMPLE_CHARS:
            break
    counted = int(litellm().token_counter(model=model, text="\n".join(sample), count_response_tokens=True))
    return counted if taken >= total else math.ceil(counted * total / max(taken, 1))


def count_text(model: str, text: str) -> int:
    """Our count of an answer's tokens (4 characters a token when the tokenizer fails)."""
    if not text:
        return 0
    try:
        return _tokens(model, [text])
    except Exception:
        return len(text) // 4


# LiteLLM's count of a conversation adds per message (its role and separators) and once for the reply's start.
PER_MESSAGE_TOKENS = 3
REPLY_PRIMING_TOKENS = 3


def count_prompt(model: str, messages: list[dict[str, Any]]) -> int:
    """Our count of a conversation's tokens, its text only (LiteLLM's counter would download an image URL to size
    it): LiteLLM's own count of its start (COUNT_SAMPLE_CHARS of text, COUNT_SAMPLE_MESSAGES messages at most),
    whose text tokens are scaled to the whole text."""
    if not messages:
        return 0
    texts = [_text_of(m.get("content")) for m in messages]
    total = sum(map(len, texts))
    try:
        sample: list[dict[str, Any]] = []
        taken = 0
        for message, text in zip(messages, texts, strict=True):
            piece = text[: COUNT_SAMPLE_CHARS - taken]
            sample.append({**message, "content": piece})
            taken += len(piece)
            if taken >= COUNT_SAMPLE_CHARS or len(sample) >= COUNT_SAMPLE_MESSAGES:
                break
        counted = int(litellm().token_counter(model=model, messages=sample))
        if taken >= total and len(sample) == len(messages):
            return counted
        overhead = PER_MESSAGE_TOKENS * len(sample) + REPLY_PRIMING_TOKENS
        text_tokens = math.ceil((counted - overhead) * total / max(taken, 1))
        return text_tokens + PER_MESSAGE_TOKENS * len(messages) + REPLY_PRIMING_TOKENS
    except Exception:  # a tokenizer problem must not hide the call: count roughly, 4 characters a token
        return total // 4


def count_request(model: str, messages: list[dict[str, Any]], tools: list[dict[str, Any]] | None = None) -> int:
    """Our count of what a call reads: its conversation, and its tools (as their JSON)."""
    if tools:
        messages = [*messages, {"role": "system", "content": orjson.dumps(tools).decode()}]
    return count_prompt(model, messages)


def _text_of(content: Any) -> str:
    if isinstance(content, str):
        return content
    if isinstance(content, list):
        return "\n".join(p["text"] for p in content if isinstance(p, dict) and isinstance(p.get("text"), str))
    return ""
