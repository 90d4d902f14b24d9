"""`mom-service serve`, with one named stand-in installed first, for the few behaviours that only an injected
fault can show through the live interface (a bug inside the engine, a DNS answer that changes between lookups).

    python -m tests.patched_service PATCH serve [--host ...] [--port ...]

Everything else is the service as shipped: the same CLI, app, config loading and process. Tests start it with
`start_service(config, env, patch="...")` (tests/conftest.py).
"""

from __future__ import annotations

import sys
from collections.abc import Callable
from typing import Any

from mom_service import cli


def _engine_bug() -> None:
    """Building the concluding LLM's messages raises: an exception no code path expects, inside the engine."""
    from mom_service.engine import concluding

    def broken(*args: Any, **kwargs: Any) -> Any:
        raise RuntimeError("injected engine bug (tests/patched_service.py)")

    concluding.concluding_messages = broken  # type: ignore[assignment]


REBOUND_TO = "127.0.0.1"
CHECKED_FIRST = "93.184.216.34"  # a global address: the URL guard lets it through


def _rebinding_dns() -> None:
    """DNS rebinding: a name under `.test` resolves to a global address the first time it is looked up, and to
    127.0.0.1 every time after; every other name is looked up as usual.

    It replaces `socket.getaddrinfo`, the lookup behind the URL guard's (asyncio's `loop.getaddrinfo`) and behind
    any other lookup in the process (aiohttp's threaded resolver, anyio, httpx), so a second lookup anywhere would
    get 127.0.0.1. uvloop is kept out: its loop resolves names without `socket.getaddrinfo`.
    """
    import socket
    import threading

    real = socket.getaddrinfo
    seen: set[str] = set()
    lock = threading.Lock()

    def getaddrinfo(host: Any, port: Any, family: int = 0, type: int = 0, proto: int = 0, flags: int = 0) -> Any:
        name = host.decode() if isinstance(host, bytes) else host
        if not isinstance(name, str) or not name.rstrip(".").lower().endswith(".test"):
            return real(host, port, family, type, proto, flags)
        with lock:
            address = REBOUND_TO if name in seen else CHECKED_FIRST
            seen.add(name)
        return real(address, port, socket.AF_INET, type, proto, flags | socket.AI_NUMERICHOST)

    socket.getaddrinfo = getaddrinfo
    sys.modules["uvloop"] = None  # type: ignore[assignment]  # uvicorn's "auto" loop falls back to asyncio's


PATCHES: dict[str, Callable[[], None]] = {
    "engine_bug": _engine_bug,
    "rebinding_dns": _rebinding_dns,
}


def main(argv: list[str]) -> int:
    if not argv or argv[0] not in PATCHES:
        print(f"usage: python -m tests.patched_service {{{','.join(PATCHES)}}} serve ...", file=sys.stderr)
        return 2
    PATCHES[argv[0]]()
    return cli.main(argv[1:])


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
