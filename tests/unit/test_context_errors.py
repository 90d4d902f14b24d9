"""How servers say a conversation is longer than a model's context window, mapped to one clear, final error."""

from __future__ import annotations

import litellm
import openai
import pytest

from mom_service.providers.errors import LLMCallError, is_transient, map_error

LLAMA_CPP = (
    "This model's maximum context length is 256 tokens. However, you requested 641 tokens (631 in the messages, "
    "10 in the completion). Please reduce the length of the messages or completion."
)


class StatusError(Exception):
    """An HTTP error as the lean path raises it: a status, the body's message and code."""

    def __init__(self, status: int, message: str, code: str | None = None) -> None:
        super().__init__(f"upstream HTTP {status}: {message}")
        self.status_code, self.message, self.code = status, message, code


def mapped(exc: BaseException) -> LLMCallError:
    return map_error(exc, timeout_s=10, redact=lambda text: text, name="local-llm")


@pytest.mark.parametrize(
    "exc",
    [
        StatusError(400, LLAMA_CPP, "context_length_exceeded"),  # llama.cpp's server (llama-cpp-python 0.3.x)
        StatusError(400, "This model's maximum context length is 2048 tokens. However, you requested 4000 tokens."),
        StatusError(400, "Input too long.", "context_length_exceeded"),  # OpenAI's code, whatever the words
        StatusError(400, "the input length exceeds the context length"),  # Ollama
        StatusError(500, "input exceeds context length"),  # Ollama's older runner
        StatusError(400, "Error: Input length 6491 exceeds context length 1500"),  # LM Studio
        litellm.ContextWindowExceededError(message=LLAMA_CPP, model="smollm2", llm_provider="openai"),
    ],
    ids=["llama.cpp", "vllm", "openai-code", "ollama", "ollama-500", "lm-studio", "litellm"],
)
def test_a_conversation_past_the_context_window_is_one_clear_final_error(exc: BaseException) -> None:
    error = mapped(exc)
    assert error.kind == "context_length_exceeded"
    assert error.message == "the conversation is longer than the context window of the LLM 'local-llm'"
    assert error.status == 400 or error.status == 500
    assert not is_transient(error) and not error.reached


@pytest.mark.parametrize(
    ("exc", "kind"),
    [
        (StatusError(400, "temperature must be at most 2"), "http_error"),
        (StatusError(503, "the model's context is loading"), "http_error"),
        (StatusError(429, "maximum context length is fine, slow down"), "rate_limited"),
        (openai.APIError("context window", request=None, body=None), "error"),  # type: ignore[arg-type]
    ],
)
def test_other_errors_are_not_taken_for_it(exc: BaseException, kind: str) -> None:
    assert mapped(exc).kind == kind
