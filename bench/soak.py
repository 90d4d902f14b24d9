"""Soak benchmark: many requests against the real service, watching its memory, latency and CPU.

    .venv/bin/python -m bench.soak [--requests 2000] [--concurrency 20] [--failure-rate 0.1] [--idle 15]

The service runs as users run it (`mom-service serve`, SQLite usage records) over the fake upstream: three members
whose calls fail `--failure-rate` of the time (HTTP 500; each LLM retries once), and a concluding LLM that streams
a 60-token answer. Half the requests stream. A closed loop of `--concurrency` clients sends `--requests` requests.

Measured from /proc (Linux): the service's RSS after a warm-up of 100 requests (the baseline), its peak during the
run, at the end, and after `--idle` seconds without traffic; its CPU time (user + system) per request; client-side
latency p50/p99 for streaming and non-streaming requests. The run fails (exit 1) when a request fails, when RSS grew
by 100 MB or more over the baseline, or when the idle RSS is not back within 50 MB of the baseline.

Results are printed as a table and written to bench/results/soak-<UTC date>.json.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import statistics
import sys
import tempfile
import time
from dataclasses import asdict, dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import httpx
import orjson

from tests.conftest import FAKE_KEY, TOKEN, Service, free_port, llm
from tests.fake_upstream import FakeUpstream

RESULTS_DIR = Path(__file__).resolve().parent / "results"
WARMUP = 100
RSS_GROWTH_LIMIT_MB = 100.0
IDLE_RETURN_LIMIT_MB = 50.0
PAGE_SIZE = os.sysconf("SC_PAGE_SIZE")
TICKS = os.sysconf("SC_CLK_TCK")
ANSWER = " ".join(f"word{i}" for i in range(60))


def rss_mb(pid: int) -> float:
    with open(f"/proc/{pid}/statm") as statm:
        return int(statm.read().split()[1]) * PAGE_SIZE / 2**20


def cpu_s(pid: int) -> float:
    with open(f"/proc/{pid}/stat") as stat:
        fields = stat.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / TICKS  # utime + stime


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(len(ordered) * q))] if ordered else 0.0


@dataclass
class Result:
    requests: int
    concurrency: int
    failure_rate: float
    failed_requests: int = 0
    degraded_answers: int = 0
    rss_baseline_mb: float = 0.0
    rss_peak_mb: float = 0.0
    rss_end_mb: float = 0.0
    rss_idle_mb: float = 0.0
    cpu_ms_per_request: float = 0.0
    wall_s: float = 0.0
    latency_ms: dict[str, dict[str, float]] = field(default_factory=dict)
    failures: list[str] = field(default_factory=list)  # the first few, as the client saw them
    machine: dict[str, Any] = field(default_factory=dict)

    @property
    def growth_mb(self) -> float:
        return self.rss_peak_mb - self.rss_baseline_mb


def config(fake: FakeUpstream) -> dict[str, Any]:
    members = ["soak-a", "soak-b", "soak-c"]
    price = {"input_per_million": "1", "output_per_million": "4"}
    return {
        "llm_definitions": [
            *(llm(name, fake, pricing=price, retries=1, timeout=30) for name in members),
            llm("soak-judge", fake, pricing=price, timeout=60),
        ],
        "models": [{"name": "soak", "llms_to_query": members, "concluding_llm": "soak-judge"}],
    }


FAILURES: list[str] = []  # what the first failed requests got, for the report


async def one(client: httpx.AsyncClient, service: Service, index: int) -> tuple[bool, float, bool, bool]:
    """(streamed, latency s, ok, degraded)"""
    stream = index % 2 == 0
    body: dict[str, Any] = {
        "model": "soak",
        "messages": [{"role": "user", "content": f"Soak question {index}: what do you think?"}],
        "stream": stream,
    }
    url = f"{service.base_url}/chat/completions"
    started = time.monotonic()
    try:
        if stream:
            body["stream_options"] = {"include_usage": True}
            async with client.stream("POST", url, headers=service.headers(), json=body) as response:
                lines = [line async for line in response.aiter_lines() if line.startswith("data: ")]
            last = orjson.loads(lines[-2][len("data: ") :]) if response.status_code == 200 and len(lines) > 1 else {}
            ok = lines[-1:] == ["data: [DONE]"] and "error" not in last and "mom" in last
            degraded = ok and bool(last["mom"]["degraded"])
            if not ok:
                FAILURES.append(f"stream {response.status_code}: {(lines or ['(no data)'])[-2:]}"[:500])
        else:
            response = await client.post(url, headers=service.headers(), json=body)
            ok = response.status_code == 200
            degraded = ok and bool(response.json()["mom"]["degraded"])
            if not ok:
                FAILURES.append(f"whole {response.status_code}: {response.text}"[:500])
    except httpx.HTTPError as exc:
        ok, degraded = False, False
        FAILURES.append(f"{type(exc).__name__}: {exc}"[:500])
    return stream, time.monotonic() - started, ok, degraded


async def load(service: Service, first: int, count: int, concurrency: int, samples: list[float]) -> list[Any]:
    """Send `count` requests from `concurrency` clients; sample the RSS every 0.5 s meanwhile."""
    assert service.process is not None
    pid = service.process.pid
    indexes = iter(range(first, first + count))
    results: list[Any] = []
    done = asyncio.Event()

    async def sampler() -> None:
        while not done.is_set():
            samples.append(rss_mb(pid))
            await asyncio.sleep(0.5)

    async def client_loop(client: httpx.AsyncClient) -> None:
        for index in indexes:
            results.append(await one(client, service, index))

    limits = httpx.Limits(max_connections=concurrency, max_keepalive_connections=concurrency)
    async with httpx.AsyncClient(timeout=120, limits=limits) as client:
        watch = asyncio.create_task(sampler())
        await asyncio.gather(*(client_loop(client) for _ in range(concurrency)))
        done.set()
        await watch
    return results


def run(requests: int, concurrency: int, failure_rate: float, idle_s: float) -> Result:
    result = Result(requests=requests, concurrency=concurrency, failure_rate=failure_rate)
    result.machine = {"python": sys.version.split()[0], "platform": platform.platform(), "cpus": os.cpu_count()}
    with FakeUpstream(free_port()) as fake, tempfile.TemporaryDirectory() as workdir:
        fake.configure(
            {
                **{
                    name: {"fail_rate": failure_rate, "seed": i}
                    for i, name in enumerate(["soak-a", "soak-b", "soak-c"])
                },
                "soak-judge": {"text": ANSWER},
            }
        )
        service = Service(Path(workdir), config(fake), {"FAKE_KEY": FAKE_KEY, "API_TOKEN": TOKEN})
        service.start()
        try:
            assert service.process is not None
            pid = service.process.pid
            samples: list[float] = []
            warm = asyncio.run(load(service, 0, WARMUP, concurrency, samples))
            result.failed_requests += sum(1 for _, _, ok, _ in warm if not ok)
            fake.clear_log()  # the fake keeps a log of every call: keep its memory out of the way
            result.rss_baseline_mb = rss_mb(pid)
            cpu_before = cpu_s(pid)
            started = time.monotonic()
            samples.clear()
            outcomes = asyncio.run(load(service, WARMUP, requests, concurrency, samples))
            result.wall_s = round(time.monotonic() - started, 1)
            result.cpu_ms_per_request = round((cpu_s(pid) - cpu_before) * 1000 / requests, 1)
            result.rss_end_mb = rss_mb(pid)
            result.rss_peak_mb = max([*samples, result.rss_end_mb])
            time.sleep(idle_s)
            result.rss_idle_mb = rss_mb(pid)
            result.failed_requests += sum(1 for _, _, ok, _ in outcomes if not ok)
            result.failures = FAILURES[:5]
            result.degraded_answers = sum(1 for _, _, _, degraded in outcomes if degraded)
            for label, streamed in (("stream", True), ("whole", False)):
                latencies = [latency * 1000 for s, latency, ok, _ in outcomes if s == streamed and ok]
                result.latency_ms[label] = {
                    "p50": round(statistics.median(latencies), 1) if latencies else 0.0,
                    "p99": round(percentile(latencies, 0.99), 1),
                }
        finally:
            service.stop()
    return result


def report(result: Result) -> str:
    rows = [
        ("requests (half streamed)", f"{result.requests} at {result.concurrency} concurrent"),
        ("member call failure rate", f"{result.failure_rate:.0%}"),
        ("failed requests", str(result.failed_requests)),
        ("degraded answers", str(result.degraded_answers)),
        (
            "RSS baseline / peak / end / idle (MB)",
            " / ".join(
                f"{v:.1f}" for v in (result.rss_baseline_mb, result.rss_peak_mb, result.rss_end_mb, result.rss_idle_mb)
            ),
        ),
        ("RSS growth over baseline (MB)", f"{result.growth_mb:.1f}"),
        ("CPU per request (ms, service process)", f"{result.cpu_ms_per_request}"),
        (
            "latency streamed p50 / p99 (ms)",
            f"{result.latency_ms['stream']['p50']} / {result.latency_ms['stream']['p99']}",
        ),
        ("latency whole p50 / p99 (ms)", f"{result.latency_ms['whole']['p50']} / {result.latency_ms['whole']['p99']}"),
        ("wall time (s)", f"{result.wall_s}"),
    ]
    return "\n".join(["| measure | value |", "| --- | --- |", *(f"| {k} | {v} |" for k, v in rows)])


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0] if __doc__ else None)
    parser.add_argument("--requests", type=int, default=2000)
    parser.add_argument("--concurrency", type=int, default=20)
    parser.add_argument("--failure-rate", type=float, default=0.1)
    parser.add_argument("--idle", type=float, default=15.0)
    args = parser.parse_args()
    result = run(args.requests, args.concurrency, args.failure_rate, args.idle)
    print(report(result))
    RESULTS_DIR.mkdir(exist_ok=True)
    out = RESULTS_DIR / f"soak-{datetime.now(UTC).date().isoformat()}.json"
    out.write_text(json.dumps({**asdict(result), "growth_mb": result.growth_mb}, indent=2))
    print(f"written to {out}")
    problems = []
    if result.failed_requests:
        problems.append(f"{result.failed_requests} requests failed")
    if result.growth_mb >= RSS_GROWTH_LIMIT_MB:
        problems.append(f"RSS grew {result.growth_mb:.1f} MB (limit {RSS_GROWTH_LIMIT_MB:g})")
    if result.rss_idle_mb - result.rss_baseline_mb >= IDLE_RETURN_LIMIT_MB:
        problems.append(f"idle RSS {result.rss_idle_mb:.1f} MB is not back near the baseline")
    for failure in result.failures:
        print(f"failed request: {failure}", file=sys.stderr)
    for problem in problems:
        print(f"FAIL: {problem}", file=sys.stderr)
    return 1 if problems else 0


if __name__ == "__main__":
    sys.exit(main())
