"""Logging: our own readable lines, and a redacting filter on every handler that could print a secret."""

from __future__ import annotations

import logging

from mom_service.redaction import RedactingFilter, Redactor

LOGGER_NAME = "mom_service"
_FORMAT = "%(asctime)s %(levelname)s %(name)s: %(message)s"
_GUARDED_LOGGERS = ("", "uvicorn", "uvicorn.error", "uvicorn.access", "LiteLLM", "LiteLLM Router", "LiteLLM Proxy")


def setup_logging(redactor: Redactor, level: int = logging.INFO) -> None:
    """Give our logger a handler (uvicorn configures only its own), and guard every known handler."""
    ours = logging.getLogger(LOGGER_NAME)
    ours.setLevel(level)
    if not ours.handlers:
        stream = logging.StreamHandler()
        stream.setFormatter(logging.Formatter(_FORMAT))
        ours.addHandler(stream)
        ours.propagate = False
    guard = RedactingFilter(redactor)
    for name in (LOGGER_NAME, *_GUARDED_LOGGERS):
        for handler in logging.getLogger(name).handlers:
            for existing in list(handler.filters):
                if isinstance(existing, RedactingFilter):
                    handler.removeFilter(existing)
            handler.addFilter(guard)
