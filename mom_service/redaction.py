"""Keep secrets out of everything we say: error messages, log lines, breakdowns."""

from __future__ import annotations

import logging
import re
from collections.abc import Iterable

# Shapes of credentials that may appear in a provider's error text even when we do not know the value.
_KEY_SHAPES = re.compile(
    r"(?:sk|pk|rk|ak)-[A-Za-z0-9_\-]{8,}|(?i:bearer)\s+[A-Za-z0-9._~+/=\-]{8,}|AIza[0-9A-Za-z_\-]{20,}"
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

    def filter(self, record: logging.LogRecord) -> bool:
        if record.exc_info:
            exc = record.exc_info[1]
            if exc is not None:
                record.msg = f"{record.msg} ({type(exc).__name__}: {exc})"
            record.exc_info = None
            record.exc_text = None
        record.stack_info = None
        if isinstance(record.msg, str):
            record.msg = self.redactor(record.msg)
        if isinstance(record.args, tuple):
            # formatters such as uvicorn's access log read the arguments themselves: redact them in place
            record.args = tuple(self.redactor(a) if isinstance(a, str) else a for a in record.args)
        elif isinstance(record.args, dict):
            record.args = {k: self.redactor(v) if isinstance(v, str) else v for k, v in record.args.items()}
        return True
