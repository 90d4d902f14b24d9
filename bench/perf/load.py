"""The load client of the performance benchmark: a closed loop of streaming chat requests, timed chunk by chunk.

Used by `bench.perf.run` (in its process, on the core it shares with the fake upstream), not run on its own:

    samples, lags, wall_s = await run_cell(url, model, headers, 32, 64, warmup=8, prefix="r0", mark=f, ramp_s=1.5)

`concurrency` workers each send requests back to back until `requests` are done; every request is
`{"model", "messages": [one user message unique to it, so nothing is a cache hit], "stream": true,
"stream_options": {"include_usage": true}}`. Timestamps (time.perf_counter) per request: sent, response headers,
every chunk with non-empty `delta.content` (the first is the time to first token), `data: [DONE]`. Meanwhile a
ticker sleeps 10 ms again and again and records how late it wakes up: the event loop's lag, which says whether the
client itself is too busy to time anything.

aiohttp reads the stream; each SSE event is decoded with orjson (a few microseconds) so that content chunks are
recognized whatever the server's JSON layout.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

import aiohttp
import orjson

TICK_S = 0.010


@dataclass
class Sample:
    """One request's timeline (perf_counter seconds)."""

    sent: float
    status: int = 0
    headers: float | None = None
    chunks: list[float] = field(default_factory=list)  # arrival of each content chunk
    done: float | None = None
    error: str | None = None

    @property
    def ok(self) -> bool:
        return self.error is None and self.done is not None and bool(self.chunks)


async def one(session: aiohttp.ClientSession, url: str, body: bytes, headers: dict[str, str]) -> Sample:
    sample = Sample(sent=time.perf_counter())
    try:
        async with session.post(url, data=body, headers=headers) as response:
            sample.headers = time.perf_counter()
            sample.status = response.status
            if response.status != 200:
                sample.error = f"HTTP {response.status}: {(await response.read())[:300]!r}"
                return sample
            buffer = b""
            async for data in response.content.iter_any():
                now = time.perf_counter()
                buffer += data.replace(b"\r\n", b"\n") if b"\r" in data else data
                *events, buffer = buffer.split(b"\n\n")
                for event in events:
                    read_event(sample, event, now)
    except (aiohttp.ClientError, TimeoutError, orjson.JSONDecodeError) as exc:
        sample.error = f"{type(exc).__name__}: {exc}"[:300]
    if sample.error is None and not sample.ok:
        sample.error = f"incomplete stream: {len(sample.chunks)} content chunks, [DONE] {sample.done is not None}"
    return sample


def read_event(sample: Sample, event: bytes, now: float) -> None:
    for line in event.split(b"\n"):
        if not line.startswith(b"data:"):
            continue  # SSE comments and other fields
        payload = line[5:].strip()
        if payload == b"[DONE]":
            sample.done = now
            continue
        chunk: dict[str, Any] = orjson.loads(payload)
        if "error" in chunk:
            sample.error = f"error event: {payload[:300]!r}"
        choices = chunk.get("choices")
        if choices and (choices[0].get("delta") or {}).get("content"):
            sample.chunks.append(now)


async def ticker(lags: list[float], stop: asyncio.Event) -> None:
    while not stop.is_set():
        before = time.perf_counter()
        await asyncio.sleep(TICK_S)
        lags.append(time.perf_counter() - before - TICK_S)


async def run_cell(
    url: str,
    model: str,
    headers: dict[str, str],
    concurrency: int,
    requests: int,
    warmup: int,
    prefix: str,
    mark: Callable[[], None],
    ramp_s: float,
    extra: dict[str, Any] | None = None,
) -> tuple[list[Sample], list[float], float]:
    """(each request's sample, the loop lags in s, the cell's wall time in s) of `requests` requests, after `warmup`
    requests (at most `concurrency` at once, on the same connections, not counted); `mark()` is called in between.
    The workers start one after another over `ramp_s` (about one request's time): all at once, they would stay in
    step, and each step would be a burst of `concurrency` requests, then of as many chunks, that the client itself
    would queue. `extra`: more fields for every request's body (e.g. max_tokens)."""
    bodies = [
        orjson.dumps(
            {
                "model": model,
                "messages": [{"role": "user", "content": f"{prefix} request {i}: {time.time_ns()} what now?"}],
                "stream": True,
                "stream_options": {"include_usage": True},
                **(extra or {}),
            }
        )
        for i in range(warmup + requests)
    ]
    headers = {"Content-Type": "application/json", **headers}
    samples: list[Sample] = []
    lags: list[float] = []
    stop = asyncio.Event()

    async def worker(
        session: aiohttp.ClientSession, pending: Iterator[bytes], into: list[Sample], delay: float
    ) -> None:
        await asyncio.sleep(delay)
        for body in pending:
            into.append(await one(session, url, body, headers))

    connector = aiohttp.TCPConnector(limit=0, force_close=False)
    timeout = aiohttp.ClientTimeout(total=600, sock_connect=30)
    async with aiohttp.ClientSession(connector=connector, timeout=timeout, skip_auto_headers=["User-Agent"]) as session:
        warming = iter(bodies[:warmup])
        await asyncio.gather(*(worker(session, warming, [], 0) for _ in range(min(concurrency, warmup))))
        mark()
        tick = asyncio.create_task(ticker(lags, stop))
        measured = iter(bodies[warmup:])
        started = time.perf_counter()
        workers = min(concurrency, requests)
        await asyncio.gather(*(worker(session, measured, samples, i * ramp_s / workers) for i in range(workers)))
        wall = time.perf_counter() - started
        stop.set()
        await tick
    return samples, lags, wall
