"""Secrets stay out of messages and log lines."""

from __future__ import annotations

import io
import logging
from collections.abc import Iterator

import pytest

from mom_service.observability.redaction import MASK, RedactingFilter, Redactor

SECRET = "my-provider-secret-0001"
KEY = "sk-live-abcdefghijklmnop1234"


def test_known_secret_masked() -> None:
    redact = Redactor([SECRET])
    assert redact(f"upstream said: invalid key {SECRET}!") == f"upstream said: invalid key {MASK}!"


def test_longer_secret_masked_whole_when_one_contains_another() -> None:
    redact = Redactor(["abcd1234", "abcd1234efgh"])
    assert redact("a=abcd1234efgh b=abcd1234") == f"a={MASK} b={MASK}"


def test_very_short_values_are_not_treated_as_secrets() -> None:
    assert Redactor(["abc", ""])("abc is fine") == "abc is fine"


@pytest.mark.parametrize(
    "text",
    [
        f"Incorrect API key provided: {KEY}.",
        "Authorization: Bearer eyJhbGciOi.payload.sig",
        "authorization: bearer abcdefgh12345678",
        "key=AIzaSyA1234567890abcdefghijklmnop",
        "x-api-key: sk-ant-api03-abcdefghijklmnop",
    ],
)
def test_credential_shapes_masked_without_knowing_them(text: str) -> None:
    redacted = Redactor()(text)
    assert MASK in redacted
    for shape in (KEY, "eyJhbGciOi", "abcdefgh12345678", "AIzaSy", "sk-ant"):
        assert shape not in redacted


@pytest.mark.parametrize(
    "text",
    [
        "The capital of France is Paris.",
        "openai/gpt-4o-mini and anthropic/claude-3-5-sonnet-20241022 answered in 1.2 s",
        "HTTP 429: rate limited, retry after 20 s (sk-short is too short to be a key)",
        "Bearer",
    ],
)
def test_normal_text_unchanged(text: str) -> None:
    assert Redactor([SECRET])(text) == text


@pytest.mark.parametrize("text", ["network-timeout-error", "task-management", "disk-cache-enabled"])
def test_hyphenated_words_unchanged(text: str) -> None:
    assert Redactor()(text) == text


# ------------------------------------------------------------------------------------------------- logging


@pytest.fixture
def logged(request: pytest.FixtureRequest) -> Iterator[tuple[logging.Logger, io.StringIO]]:
    """A logger whose handler redacts (the filter sits on the handler, as in production) into a buffer."""
    buffer = io.StringIO()
    handler = logging.StreamHandler(buffer)
    handler.setFormatter(logging.Formatter("%(levelname)s %(message)s"))
    handler.addFilter(RedactingFilter(Redactor([SECRET])))
    logger = logging.getLogger(f"tests.redaction.{request.node.name}")
    logger.handlers = [handler]
    logger.propagate = False
    logger.setLevel(logging.DEBUG)
    yield logger, buffer
    logger.handlers = []


def test_secret_in_args_redacted(logged: tuple[logging.Logger, io.StringIO]) -> None:
    logger, buffer = logged
    logger.warning("member %s failed with key %s (%d tries)", "alpha", SECRET, 2)
    assert buffer.getvalue() == f"WARNING member alpha failed with key {MASK} (2 tries)\n"


def test_secret_in_message_and_dict_args_redacted(logged: tuple[logging.Logger, io.StringIO]) -> None:
    logger, buffer = logged
    logger.info(f"calling with {KEY}")
    logger.info("header %(auth)s", {"auth": f"Bearer {SECRET}"})
    assert buffer.getvalue() == f"INFO calling with {MASK}\nINFO header Bearer {MASK}\n"


def test_exc_info_dropped_but_type_and_message_kept(logged: tuple[logging.Logger, io.StringIO]) -> None:
    logger, buffer = logged
    try:
        raise ValueError(f"provider rejected {KEY}")
    except ValueError:
        logger.exception("member %s failed", "alpha")
    output = buffer.getvalue()
    assert output == f"ERROR member alpha failed (ValueError: provider rejected {MASK})\n"
    assert "Traceback" not in output


def test_stack_info_dropped(logged: tuple[logging.Logger, io.StringIO]) -> None:
    logger, buffer = logged
    logger.info("here", stack_info=True)
    assert buffer.getvalue() == "INFO here\n"


def test_uvicorn_access_record_still_formats() -> None:
    record = logging.LogRecord(
        "uvicorn.access",
        logging.INFO,
        __file__,
        1,
        '%s - "%s %s HTTP/%s" %d',
        ("127.0.0.1:52000", "GET", f"/v1/models?key={KEY}", "1.1", 200),
        None,
    )
    assert RedactingFilter(Redactor()).filter(record) is True
    assert isinstance(record.args, tuple)
    assert len(record.args) == 5  # uvicorn's AccessFormatter unpacks exactly five
    assert record.args[4] == 200
    assert (
        logging.Formatter("%(message)s").format(record) == f'127.0.0.1:52000 - "GET /v1/models?key={MASK} HTTP/1.1" 200'
    )


def test_secret_in_exception_argument_redacted(logged: tuple[logging.Logger, io.StringIO]) -> None:
    logger, buffer = logged
    logger.error("member failed: %s", RuntimeError(f"401 for key {KEY}"))
    assert KEY not in buffer.getvalue()


def test_secret_in_non_string_message_redacted(logged: tuple[logging.Logger, io.StringIO]) -> None:
    logger, buffer = logged
    logger.error(RuntimeError(f"401 for key {KEY}"))
    assert KEY not in buffer.getvalue()


def test_percent_in_exception_message_with_args(
    logged: tuple[logging.Logger, io.StringIO], capsys: pytest.CaptureFixture[str]
) -> None:
    logger, buffer = logged
    try:
        raise ValueError("quota 100% done")
    except ValueError:
        logger.exception("member %s failed", "alpha")
    assert buffer.getvalue() == "ERROR member alpha failed (ValueError: quota 100% done)\n"
    assert "Logging error" not in capsys.readouterr().err
