"""The retry policy as pure functions: which errors are transient, how long to wait, Retry-After parsing."""

from __future__ import annotations

import email.utils
import time
from types import SimpleNamespace

import pytest

from mom_service.providers.errors import BACKOFF_BASE_S, LLMCallError, is_transient, retry_after, retry_delay


@pytest.mark.parametrize(
    ("error", "transient"),
    [
        (LLMCallError("rate_limited", "slow down", 429), True),
        (LLMCallError("connection", "reset"), True),
        (LLMCallError("timeout", "timed out"), True),
        (LLMCallError("http_error", "boom", 500), True),
        (LLMCallError("http_error", "bad gateway", 502), True),
        (LLMCallError("http_error", "request timeout", 408), True),
        (LLMCallError("http_error", "bad request", 400), False),
        (LLMCallError("http_error", "unauthorized", 401), False),
        (LLMCallError("http_error", "forbidden", 403), False),
        (LLMCallError("http_error", "not found", 404), False),
        (LLMCallError("http_error", "unprocessable", 422), False),
        (LLMCallError("missing_key", "no key"), False),
        (LLMCallError("error", "ContentPolicyViolationError: refused"), False),
    ],
)
def test_transient(error: LLMCallError, transient: bool) -> None:
    assert is_transient(error) is transient


def test_delay_is_jittered_exponential_backoff_within_the_deadline() -> None:
    error = LLMCallError("http_error", "boom", 503)
    for attempt in range(3):
        for _ in range(50):
            delay = retry_delay(error, None, attempt, retries=5, remaining=100)
            assert delay is not None and 0 <= delay <= BACKOFF_BASE_S * 2**attempt
    assert retry_delay(error, None, 2, retries=2, remaining=100) is None  # retries used up
    assert retry_delay(LLMCallError("http_error", "no", 400), None, 0, retries=5, remaining=100) is None
    assert retry_delay(error, 2.0, 0, retries=1, remaining=100) == 2.0  # Retry-After wins
    assert retry_delay(error, 5.0, 0, retries=1, remaining=3) is None  # it does not fit before the deadline


def test_retry_after_header_in_seconds_or_as_a_date() -> None:
    def exc(value: str | None) -> Exception:
        error = Exception("x")
        error.response = SimpleNamespace(headers={"retry-after": value} if value is not None else {})  # type: ignore[attr-defined]
        return error

    assert retry_after(exc("3")) == 3.0
    assert retry_after(exc("0.5")) == 0.5
    assert retry_after(exc(None)) is None
    assert retry_after(Exception("no response")) is None
    soon = email.utils.formatdate(time.time() + 10, usegmt=True)
    assert 8 <= (retry_after(exc(soon)) or 0) <= 10.5
    assert retry_after(exc("not a time")) is None
