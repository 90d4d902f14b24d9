"""Cache-hit benchmark: how fast a cached answer comes back, whole and streamed, from memory and from Redis.

    .venv/bin/python -m bench.cache_hit [--requests 2000] [--warmup 20] [--redis-url redis://127.0.0.1:6379/15]

The service runs as users run it (`mom-service serve`, SQLite usage records, JSON logs) over the fake upstream: a
panel of three members and a concluding LLM that streams a 60-token answer. For each backend (the in-process cache;
then Redis at `--redis-url`, if it answers: that db index is flushed before and after) one answer is warmed (a miss),
`--warmup` hits are sent and not measured, then `--requests` sequential hits whole and `--requests` streamed, from one
keep-alive client.

Measured: the latency at the client (until the last byte), the service's own (`latency_ms` of each request's log
line: from the request's arrival until its last byte was sent) and the engine's (`latency_ms` of the usage record: the
replay alone, after the lookup), p50 and p99. Target, reported and not enforced: service-side p99 < 5 ms.

The run fails (exit 1) when any measured request is not a 200 cache hit. Results are printed as a markdown table and
written to bench/results/cache_hit-<UTC date>.json.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sqlite3
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

from bench.soak import ANSWER, RESULTS_DIR, percentile
from tests.conftest import FAKE_KEY, TOKEN, Service, free_port, llm
from tests.fake_upstream import FakeUpstream

TARGET_SERVICE_P99_MS = 5.0
QUESTION = [{"role": "user", "content": "Benchmark question: what does a cache hit cost?"}]
MEMBERS = ("hit-a", "hit-b", "hit-c")
JUDGE = "hit-judge"


@dataclass
class Run:
    backend: str
    mode: str  # "whole" or "stream"
    requests: int
    hits: int = 0
    failures: list[str] = field(default_factory=list)  # the first few non-hits, as the client saw them
    client_ms: dict[str, float] = field(default_factory=dict)
    service_ms: dict[str, float] = field(default_factory=dict)  # the request log's latency_ms
    engine_ms: dict[str, float] = field(default_factory=dict)  # the usage record's latency_ms

    @property
    def non_hits(self) -> int:
        return self.requests - self.hits


def summary(values: list[float]) -> dict[str, float]:
    if not values:
        return {"p50": 0.0, "p99": 0.0, "max": 0.0, "count": 0}
    return {
        "p50": round(statistics.median(values), 2),
        "p99": round(percentile(values, 0.99), 2),
        "max": round(max(values), 2),
        "count": len(values),
    }


def config(fake: FakeUpstream) -> dict[str, Any]:
    price = {"input_per_million": "1", "output_per_million": "4"}
    return {
        "llm_definitions": [llm(name, fake, pricing=price) for name in (*MEMBERS, JUDGE)],
        "models": [{"name": "hit", "llms_to_query": list(MEMBERS), "concluding_llm": JUDGE}],
    }


def redis_answers(url: str) -> bool:
    import redis

    client = redis.Redis.from_url(url, socket_timeout=2, socket_connect_timeout=2)
    try:
        client.ping()
        client.flushdb()
        return True
    except redis.RedisError:
        return False
    finally:
        client.close()


def flush(url: str) -> None:
    import redis

    client = redis.Redis.from_url(url, socket_timeout=2, socket_connect_timeout=2)
    try:
        client.flushdb()
    finally:
        client.close()


def ask(client: httpx.Client, service: Service, stream: bool, request_id: str) -> tuple[float, str | None]:
    """(client latency in ms, None for a 200 hit, else what the client got)."""
    body: dict[str, Any] = {"model": "hit", "messages": QUESTION}
    if stream:
        body |= {"stream": True, "stream_options": {"include_usage": True}}
    headers = {**service.headers(), "X-Request-ID": request_id}
    url = f"{service.base_url}/chat/completions"
    started = time.perf_counter()
    try:
        response = client.post(url, headers=headers, json=body)
    except httpx.HTTPError as exc:
        return (time.perf_counter() - started) * 1000, f"{type(exc).__name__}: {exc}"[:300]
    elapsed_ms = (time.perf_counter() - started) * 1000
    if response.status_code != 200:
        return elapsed_ms, f"{response.status_code}: {response.text[:300]}"
    if stream:
        frames = response.text.split("\n\n")
        if len(frames) < 3 or frames[-2] != "data: [DONE]":
            return elapsed_ms, f"stream did not end with [DONE]: {frames[-3:]}"[:300]
        last = orjson.loads(frames[-3].removeprefix("data: "))
    else:
        last = response.json()
    cache = last.get("mom", {}).get("cache")
    return elapsed_ms, None if cache == "hit" else f"cache={cache!r}"


def log_lines(service: Service) -> dict[str, dict[str, Any]]:
    """The chat requests' JSON log lines, by the request id the client sent."""
    lines = {}
    for text in service.log().splitlines():
        if not text.startswith("{"):
            continue
        try:
            line = orjson.loads(text)
        except orjson.JSONDecodeError:
            continue
        if line.get("path") == "/v1/chat/completions" and "request_id" in line:
            lines[line["request_id"]] = line
    return lines


def record_latencies(service: Service, internal_ids: set[str], timeout: float = 60.0) -> dict[str, float]:
    """latency_ms of the usage records of those requests, once the writer has written them all."""
    database = service.workdir / "data" / "mom.db"
    deadline = time.monotonic() + timeout
    found: dict[str, float] = {}
    while time.monotonic() < deadline:
        with sqlite3.connect(database) as db:
            found = {
                row[0]: float(row[1])
                for row in db.execute("SELECT id, latency_ms FROM mom_requests WHERE cache_hit = 1")
                if row[0] in internal_ids
            }
        if len(found) == len(internal_ids):
            break
        time.sleep(0.2)
    return found


def measure(fake: FakeUpstream, backend: str, redis_url: str | None, requests: int, warmup: int) -> list[Run]:
    env = {
        "FAKE_KEY": FAKE_KEY,
        "API_TOKEN": TOKEN,
        "MOM_CACHE_ENABLED": "true",
        "REDIS_URL": redis_url or "",
        "LOG_FORMAT": "json",
        "MOM_CIRCUIT_FAILURES": "0",
    }
    runs = [Run(backend, mode, requests) for mode in ("whole", "stream")]
    with tempfile.TemporaryDirectory() as workdir:
        service = Service(Path(workdir), config(fake), env)
        service.start()
        try:
            with httpx.Client(timeout=30) as client:
                _, warm = ask(client, service, False, f"{backend}-warm")
                if warm != "cache='miss'":
                    raise RuntimeError(f"the warm-up request was not a miss: {warm}")
                if redis_url:  # the answer is stored after its last event: wait for it before counting hits
                    deadline = time.monotonic() + 10
                    while ask(client, service, False, f"{backend}-ready-{time.monotonic()}")[1] is not None:
                        if time.monotonic() > deadline:
                            raise RuntimeError("the warmed answer never became a hit")
                        time.sleep(0.05)
                for i in range(warmup):
                    ask(client, service, i % 2 == 1, f"{backend}-warmup-{i}")
                client_ms: dict[str, list[float]] = {}
                ids: dict[str, list[str]] = {}
                for run in runs:
                    stream = run.mode == "stream"
                    for i in range(requests):
                        request_id = f"{backend}-{run.mode}-{i}"
                        elapsed_ms, problem = ask(client, service, stream, request_id)
                        client_ms.setdefault(run.mode, []).append(elapsed_ms)
                        ids.setdefault(run.mode, []).append(request_id)
                        if problem is None:
                            run.hits += 1
                        elif len(run.failures) < 5:
                            run.failures.append(f"{request_id}: {problem}")
            lines = log_lines(service)
            internal = {rid: lines[rid].get("internal_id", rid) for mode in ids for rid in ids[mode] if rid in lines}
            records = record_latencies(service, set(internal.values()))
            for run in runs:
                mine = ids[run.mode]
                run.client_ms = summary(client_ms[run.mode])
                run.service_ms = summary([float(lines[rid]["latency_ms"]) for rid in mine if rid in lines])
                run.engine_ms = summary([records[internal[rid]] for rid in mine if internal.get(rid) in records])
        finally:
            service.stop()
    return runs


def table(runs: list[Run]) -> str:
    head = (
        "| backend | mode | requests | hits | client p50 / p99 (ms) | service p50 / p99 (ms) "
        "| engine p50 / p99 (ms) | service p99 < 5 ms |"
    )
    rows = [head, "| --- | --- | --- | --- | --- | --- | --- | --- |"]
    for run in runs:
        met = "yes" if run.service_ms["p99"] < TARGET_SERVICE_P99_MS else "no"
        rows.append(
            f"| {run.backend} | {run.mode} | {run.requests} | {run.hits} "
            f"| {run.client_ms['p50']} / {run.client_ms['p99']} "
            f"| {run.service_ms['p50']} / {run.service_ms['p99']} "
            f"| {run.engine_ms['p50']} / {run.engine_ms['p99']} | {met} |"
        )
    return "\n".join(rows)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0] if __doc__ else None)
    parser.add_argument("--requests", type=int, default=2000, help="measured hits per backend and mode")
    parser.add_argument("--warmup", type=int, default=20, help="hits sent first and not measured")
    parser.add_argument("--redis-url", default="redis://127.0.0.1:6379/15", help="flushed before and after")
    args = parser.parse_args()
    runs: list[Run] = []
    skipped: list[str] = []
    with FakeUpstream(free_port()) as fake:
        fake.configure(
            {**{name: {"text": f"{name} answers."} for name in MEMBERS}, JUDGE: {"text": ANSWER, "prompt_tokens": 500}}
        )
        runs += measure(fake, "memory", None, args.requests, args.warmup)
        fake.clear_log()
        if redis_answers(args.redis_url):
            try:
                runs += measure(fake, "redis", args.redis_url, args.requests, args.warmup)
            finally:
                flush(args.redis_url)
        else:
            skipped.append(f"redis: no Redis answers at {args.redis_url}")
    print(table(runs))
    for note in skipped:
        print(f"skipped {note}")
    result = {
        "date": datetime.now(UTC).isoformat(),
        "requests": args.requests,
        "warmup": args.warmup,
        "target_service_p99_ms": TARGET_SERVICE_P99_MS,
        "runs": [asdict(run) for run in runs],
        "skipped": skipped,
        "machine": {"python": sys.version.split()[0], "platform": platform.platform(), "cpus": os.cpu_count()},
    }
    RESULTS_DIR.mkdir(exist_ok=True)
    out = RESULTS_DIR / f"cache_hit-{datetime.now(UTC).date().isoformat()}.json"
    out.write_text(json.dumps(result, indent=2))
    print(f"written to {out}")
    failed = [run for run in runs if run.non_hits]
    for run in failed:
        print(f"FAIL: {run.backend} {run.mode}: {run.non_hits} of {run.requests} were not hits", file=sys.stderr)
        for failure in run.failures:
            print(f"  {failure}", file=sys.stderr)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
