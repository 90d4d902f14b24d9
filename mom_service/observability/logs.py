"""Logging: our own readable lines, and a redacting filter on every handler that could print a secret."""

from __future__ import annotations

import logging
from datetime import UTC, datetime
from typing import Any

import orjson

from mom_service.observability.redaction import RedactingFilter, Redactor

LOGGER_NAME = "mom_service"
_FORMAT = "%(asctime)s %(levelname)s %(name)s: %(message)s"
_GUARDED_LOGGERS = ("", "uvicorn", "uvicorn.error", "uvicorn.access", "LiteLLM", "LiteLLM Router", "LiteLLM Proxy")


class JsonFormatter(logging.Formatter):
    """One JSON object per line: time, level, logger and message; a structured record's fields replace the message.

    A structured record (attribute `structured`, e.g. a request line) carries its fields as one JSON object in its
    message, so the redacting filter sees and redacts them as it does any message.
    """

    def format(self, record: logging.LogRecord) -> str:
        line: dict[str, Any] = {
            "time": datetime.fromtimestamp(record.created, UTC)
            .isoformat(timespec="milliseconds")
            .replace("+00:00", "Z"),
            "level": record.levelname,
            "logger": record.name,
        }
        message = record.getMessage()
        fields: Any = None
        if getattr(record, "structured", False):
            try:
                fields = orjson.loads(message)
            except orjson.JSONDecodeError:
                fields = None
        if isinstance(fields, dict):
            line |= fields
        else:
            line["message"] = message
        return orjson.dumps(line).decode()


def setup_logging(redactor: Redactor, level: int = logging.INFO, log_format: str | None = None) -> None:
    """Give our logger a handler (uvicorn configures only its own), and guard every known handler.

    `log_format` ("text" or "json") sets our handler's format; None keeps it (text when first created).
    """
    ours = logging.getLogger(LOGGER_NAME)
    ours.setLevel(level)
    if not ours.handlers:
        stream = logging.StreamHandler()
        stream.setFormatter(logging.Formatter(_FORMAT))
        stream.set_name(LOGGER_NAME)
        ours.addHandler(stream)
        ours.propagate = False
    if log_format is not None:
        for handler in ours.handlers:
            if handler.get_name() == LOGGER_NAME:
                handler.setFormatter(JsonFormatter() if log_format == "json" else logging.Formatter(_FORMAT))
    guard = RedactingFilter(redactor)
    for name in (LOGGER_NAME, *_GUARDED_LOGGERS):
        for handler in logging.getLogger(name).handlers:
            for existing in list(handler.filters):
                if isinstance(existing, RedactingFilter):
                    handler.removeFilter(existing)
            handler.addFilter(guard)
