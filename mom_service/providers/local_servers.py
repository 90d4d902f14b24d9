"""Whether the servers of the local LLMs answer yet: `/health/ready` waits for them (a llama.cpp, Ollama or vLLM
server may take a while to load its model after the service started).

Each distinct `api_base` of a local LLM is probed with `GET {api_base}/models`, bounded by a short timeout; any
answer but a server error counts (a 401 is a server that is up; llama.cpp's own server says 503 while it loads).
The results are kept for a moment, so readiness stays cheap however often it is asked. Remote LLMs are never
probed, nor local ones without an `api_base` (there is no server of theirs to ask).
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable, Mapping, Sequence

import aiohttp

from mom_service.config import LLMDefinition

PROBE_TIMEOUT_S = 2.0
RESULTS_TTL_S = 2.0


class LocalServers:
    """The local LLMs' servers, as readiness sees them. `keys`: the API key sent to each LLM's server, if any."""

    def __init__(
        self,
        llms: Sequence[LLMDefinition],
        session: Callable[[], aiohttp.ClientSession],
        keys: Mapping[str, str],
        *,
        timeout_s: float = PROBE_TIMEOUT_S,
        ttl_s: float = RESULTS_TTL_S,
    ) -> None:
        self._session = session
        self._timeout = aiohttp.ClientTimeout(total=timeout_s)
        self._ttl = ttl_s
        self._names: dict[str, list[str]] = {}  # api_base -> the local LLMs it serves
        self._keys: dict[str, str] = {}
        for llm in llms:
            if llm.is_local and llm.api_base and "#" not in llm.name:  # (a sample shares its LLM's server)
                base = llm.api_base.rstrip("/")
                self._names.setdefault(base, []).append(llm.name)
                if llm.name in keys:
                    self._keys.setdefault(base, keys[llm.name])
        self._answering: dict[str, bool] = {}
        self._checked_at: float | None = None
        self._lock = asyncio.Lock()

    @property
    def bases(self) -> list[str]:
        return list(self._names)

    async def not_answering(self) -> list[str]:
        """The local LLMs whose server does not answer (now, or a moment ago), in config order."""
        if not self._names:
            return []
        async with self._lock:  # one probe at a time; those who waited read its results
            now = time.monotonic()
            if self._checked_at is None or now - self._checked_at >= self._ttl:
                bases = list(self._names)
                answers = await asyncio.gather(*(self._answers(base) for base in bases))
                self._answering = dict(zip(bases, answers, strict=True))
                self._checked_at = time.monotonic()
        return [name for base, names in self._names.items() if not self._answering[base] for name in names]

    async def _answers(self, base: str) -> bool:
        key = self._keys.get(base)
        headers = {"authorization": f"Bearer {key}"} if key else {}
        try:
            async with self._session().get(
                f"{base}/models", headers=headers, timeout=self._timeout, allow_redirects=False
            ) as response:
                return response.status < 500
        except (aiohttp.ClientError, TimeoutError, OSError):
            return False
