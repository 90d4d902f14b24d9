"""Keep secrets out of everything we say: error messages, log lines, breakdowns."""

from __future__ import annotations

import logging
import re
from collections.abc import Iterable

# Shapes of credentials that may appear in a provider's error text even when we do not know the value.
_KEY_SHAPES = re.compile(
    r"\b(?:sk|pk|rk|ak)-[A-Za-z0-9_\-]{8,}"
    r"|\b(?i:bearer)\s+(?:(?=\S*\d)[A-Za-z0-9._~+/=\-]{8,}|[A-Za-z0-9._~+/=\-]{16,})"
    r"|\bAIza[0-9A-Za-z_\-]{20,}"
)
MASK = "***"


class Redactor:
    """Replaces known secret values and credential-shaped strings with ***."""

    def __init__(self, secrets: Iterable[str] = ()) -> None:
        values = sorted({s for s in secrets if len(s) >= 4}, key=len, reverse=True)
        self._known = re.compile("|".join(re.escape(v) for v in values)) if values else None

    def __call__(self, text: str) -> str:
        if self._known is not None:
            text = self._known.sub(MASK, text)
        return _KEY_SHAPES.sub(MASK, text)


class RedactingFilter(logging.Filter):
    """A logging filter that redacts every record's final message, and drops tracebacks."""

    def __init__(self, redactor: Redactor) -> None:
        super().__init__()
        self.redactor = redactor

    def _arg(self, value: object) -> object:
        if isinstance(value, int | float) or value is None:
            return value  # numbers keep their type for %d and friends
        return self.redactor(value if isinstance(value, str) else str(value))

    def filter(self, record: logging.LogRecord) -> bool:
        message = record.msg if isinstance(record.msg, str) else str(record.msg)
        if record.exc_info:
            exc = record.exc_info[1]
            if exc is not None:
                detail = f" ({type(exc).__name__}: {exc})"
                message += detail.replace("%", "%%") if record.args else detail
            record.exc_info = None
            record.exc_text = None
        record.stack_info = None
        record.msg = self.redactor(message)
        if isinstance(record.args, tuple):
            # formatters such as uvicorn's access log read the arguments themselves: redact them in place
            record.args = tuple(self._arg(a) for a in record.args)
        elif isinstance(record.args, dict):
            record.args = {k: self._arg(v) for k, v in record.args.items()}
        return True
