"""Our own token counts (for calls whose provider reported none): close to the tokenizer's, and bounded in CPU
whatever the size of the conversation (the tokenizer never sees more than a sample)."""

from __future__ import annotations

from typing import Any

import pytest

from mom_service.providers.litellm_api import litellm
from mom_service.providers.tokens import COUNT_SAMPLE_CHARS, COUNT_SAMPLE_MESSAGES, count_prompt, count_text
from tests.conftest import cl100k

MODEL = "openai/unknown-to-litellm"  # counted with cl100k_base


def independent_prompt_count(messages: list[dict[str, Any]]) -> int:
    """OpenAI's documented way to count a chat's tokens: 3 per message, its role and text, then 3 for the reply."""
    encoding = cl100k()
    return sum(3 + len(encoding.encode(m["role"])) + len(encoding.encode(m["content"])) for m in messages) + 3


def test_a_short_conversation_is_counted_exactly() -> None:
    messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "What is a token, exactly?"}]
    assert count_prompt(MODEL, messages) == independent_prompt_count(messages)
    assert count_text(MODEL, "A piece of a word.") == len(cl100k().encode("A piece of a word."))


@pytest.mark.parametrize(
    "messages",
    [
        [{"role": "user", "content": "The quick brown fox jumps over the lazy dog. " * 20_000}],
        [{"role": "user", "content": f"Message number {i} says something short."} for i in range(2000)],
    ],
    ids=["one-long-message", "many-short-messages"],
)
def test_a_large_conversation_is_estimated_from_a_bounded_sample(
    messages: list[dict[str, Any]], monkeypatch: pytest.MonkeyPatch
) -> None:
    seen: list[int] = []
    real = litellm().token_counter

    def counting(**kwargs: Any) -> int:
        texts = [m["content"] for m in kwargs.get("messages") or []] + [kwargs.get("text") or ""]
        seen.append(sum(map(len, texts)))
        assert len(kwargs.get("messages") or []) <= COUNT_SAMPLE_MESSAGES
        return int(real(**kwargs))

    monkeypatch.setattr(litellm(), "token_counter", counting)
    estimate = count_prompt(MODEL, messages)
    assert seen and max(seen) <= COUNT_SAMPLE_CHARS  # the tokenizer saw a sample, never the whole
    exact = independent_prompt_count(messages)
    assert abs(estimate - exact) / exact < 0.02  # and the estimate is within 2% of the exact count
