"""Keep secrets out of everything we say: error messages, log lines, breakdowns."""

from __future__ import annotations

import ipaddress
import logging
import re
import traceback
from collections.abc import Callable, Iterable

from mom_service.errors import KEEP_TRACEBACK

# Shapes of credentials that may appear in a provider's error text even when we do not know the value.
_KEY_SHAPES = re.compile(
    r"\b(?:sk|pk|rk|ak)-[A-Za-z0-9_\-]{8,}"
    r"|\b(?i:bearer)\s+(?:(?=\S*\d)[A-Za-z0-9._~+/=\-]{8,}|[A-Za-z0-9._~+/=\-]{16,})"
    r"|\bAIza[0-9A-Za-z_\-]{20,}"
)
MASK = "***"

# What an error text may not show a client (nor the concluding LLM, nor the usage records): where things are.
_IPV6_CANDIDATE = re.compile(r"\[?([0-9A-Fa-f]{0,4}(?::[0-9A-Fa-f]{0,4}){2,7}(?:%\w+)?)\]?(?::\d{1,5})?")
_SCRUBS = (
    (re.compile(r"\b[A-Za-z][A-Za-z0-9+.\-]*://\S+"), "<url>"),
    (re.compile(r"\b\d{1,3}(?:\.\d{1,3}){3}(?::\d{1,5})?\b"), "<address>"),
    (re.compile(r"(?<![\w.~])(?:~|\.{1,2})?(?:/[\w.\-]+)+/?"), "<path>"),
    (re.compile(r"\b(?:[A-Za-z0-9](?:[A-Za-z0-9-]{0,61}[A-Za-z0-9])?\.)+[A-Za-z]{2,63}(?::\d{1,5})?\b"), "<host>"),
    (re.compile(r"\b[A-Za-z][A-Za-z0-9-]*:\d{2,5}\b"), "<host>"),
    (re.compile(r"\b[A-Z][A-Z0-9]*(?:_[A-Z0-9]+)+\b"), "<name>"),
)


def _ipv6(match: re.Match[str]) -> str:
    try:
        ipaddress.ip_address(match.group(1))
    except ValueError:
        return match.group(0)
    return "<address>"


MAX_SCRUBBED_CHARS = 300


class Redactor:
    """Replaces known secret values and credential-shaped strings with ***."""

    def __init__(self, secrets: Iterable[str] = ()) -> None:
        self._values: frozenset[str] = frozenset()
        self._known: re.Pattern[str] | None = None
        self.add(secrets)

    def add(self, secrets: Iterable[str]) -> None:
        """More values to redact from now on (the keys of a reloaded config's new LLMs)."""
        values = self._values | {s for s in secrets if len(s) >= 4}
        if values != self._values:
            ordered = sorted(values, key=len, reverse=True)
            self._values, self._known = values, re.compile("|".join(re.escape(v) for v in ordered))

    def __call__(self, text: str) -> str:
        if self._known is not None:
            text = self._known.sub(MASK, text)
        return _KEY_SHAPES.sub(MASK, text)


def scrub(text: str, redact: Callable[[str], str] | None = None) -> str:
    """An error text as a client may see it: redacted, one line, and without URLs, addresses, host names, paths
    or environment-variable names (the full text goes to the log only)."""
    text = " ".join(text.split())
    if redact is not None:
        text = redact(text)
    text = _IPV6_CANDIDATE.sub(_ipv6, text)
    for pattern, placeholder in _SCRUBS:
        text = pattern.sub(placeholder, text)
    return text[:MAX_SCRUBBED_CHARS]


class RedactingFilter(logging.Filter):
    """A logging filter that redacts every record's final message, and drops tracebacks (but for the records
    marked `KEEP_TRACEBACK`, whose traceback is kept, redacted)."""

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
            if exc is not None and getattr(record, KEEP_TRACEBACK, False):
                detail = "\n" + "".join(traceback.format_exception(exc)).rstrip()
                message += detail.replace("%", "%%") if record.args else detail
            elif exc is not None:
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
