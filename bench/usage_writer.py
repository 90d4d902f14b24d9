"""Benchmark of the usage records: the writer's throughput, and answer latency while the database is locked.

    .venv/bin/python -m bench.usage_writer [--records N] [--postgres-url URL] [--skip-lock]

Part 1 (writer throughput): N realistic request outcomes (three members and a concluding call each, with usage
and Decimal costs) are queued in a `UsageWriter` over SQLite (a temporary file) and PostgreSQL (a database
created for the run and dropped after it); the writer is started and timed until its queue is empty; the row
counts and the cost sum are checked.

Part 2 (SQLite lock): the real service (a subprocess, over the fake upstream) answers a closed-loop load of K
clients in three phases: the database free, the database held by another connection's `BEGIN EXCLUSIVE`, and
after the release. Answers must not wait for the database: the run fails if phase 2's median latency is more
than 1.5x phase 1's, if any request fails, or if the usage API never counts every answer.

Results are printed as markdown tables and written to bench/results/usage_writer-<UTC date>.json.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import random
import sqlite3
import sys
import tempfile
import threading
import time
import uuid
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from datetime import UTC, datetime
from decimal import Decimal
from pathlib import Path
from typing import Any

import asyncpg  # type: ignore[import-untyped]
import httpx
from sqlalchemy import func, select
from sqlalchemy.engine import URL, make_url

from mom_service.engine.events import Breakdown, CallReport, RequestOutcome, Usage
from mom_service.usage.money import to_pico
from mom_service.usage.records import UsageWriter, calls_table, create_engine, migrate, requests_table
from tests.conftest import FAKE_KEY, TOKEN, Service, free_port, panel_config
from tests.fake_upstream import FakeUpstream

RESULTS_DIR = Path(__file__).resolve().parent / "results"
DEFAULT_POSTGRES_URL = "postgresql+asyncpg://postgres@127.0.0.1:5432/test"
LOCAL_HOSTS = frozenset({"127.0.0.1", "localhost", "::1"})
CALLS_PER_REQUEST = 4  # three members and the concluding call
P50_LIMIT = 1.5  # phase 2's median may be at most this many times phase 1's


# ------------------------------------------------------------------------------------------------ reporting


def markdown_table(headers: Sequence[str], rows: Sequence[Sequence[object]]) -> str:
    lines = ["| " + " | ".join(headers) + " |", "|" + "|".join("---" for _ in headers) + "|"]
    lines += ["| " + " | ".join(str(cell) for cell in row) + " |" for row in rows]
    return "\n".join(lines)


def percentile(values: Sequence[float], fraction: float) -> float:
    """Linear interpolation between closest ranks (numpy's default); NaN for no values."""
    if not values:
        return float("nan")
    ordered = sorted(values)
    position = (len(ordered) - 1) * fraction
    low = int(position)
    high = min(low + 1, len(ordered) - 1)
    return ordered[low] + (ordered[high] - ordered[low]) * (position - low)


# ---------------------------------------------------------------------------------------- writer throughput

# name, model, USD per million tokens: input, cached input, output
MEMBERS: tuple[tuple[str, str, Decimal, Decimal, Decimal], ...] = (
    ("alpha", "openai/gpt-4.1", Decimal("2"), Decimal("0.5"), Decimal("8")),
    ("beta", "anthropic/claude-sonnet-4-5", Decimal("3"), Decimal("0.3"), Decimal("15")),
    ("gamma", "gemini/gemini-2.5-flash", Decimal("0.3"), Decimal("0.075"), Decimal("2.5")),
)
JUDGE: tuple[str, str, Decimal, Decimal, Decimal] = (
    "judge",
    "openai/gpt-4.1",
    Decimal("2"),
    Decimal("0.5"),
    Decimal("8"),
)
MOM_MODELS = ("mom", "mom-think", "mom-fast")
MILLION = Decimal(1_000_000)


def _call(
    rng: random.Random, spec: tuple[str, str, Decimal, Decimal, Decimal], role: str, prompt_tokens: int
) -> CallReport:
    name, model, input_price, cached_price, output_price = spec
    report = CallReport(name=name, model=model, role="concluding" if role == "concluding" else "member")
    report.latency_ms = round(rng.uniform(400, 9000), 1)
    report.ttft_ms = round(rng.uniform(150, 1500), 1)
    if role == "member" and rng.random() < 0.03:  # an occasional failed member: a row, no usage, no cost
        report.status = "error"
        report.error = f"RateLimitError: {model} is over its rate limit, retry after 20 s"
        report.cost = Decimal(0)
        return report
    completion = rng.randint(50, 1200)
    reasoning = rng.randint(0, completion // 2) if rng.random() < 0.3 else 0
    cached = rng.randint(0, prompt_tokens) if rng.random() < 0.2 else 0
    report.usage = Usage(prompt_tokens, completion, reasoning, cached)
    report.cost = ((prompt_tokens - cached) * input_price + cached * cached_price + completion * output_price) / MILLION
    report.text = "x" * 40
    return report


def make_outcomes(count: int, seed: int = 7) -> list[RequestOutcome]:
    """Realistic finished requests spread over the last day: three members and a concluding call each."""
    rng = random.Random(seed)
    now = time.time()
    outcomes = []
    for _ in range(count):
        prompt = rng.randint(20, 4000)
        members = [_call(rng, spec, "member", prompt) for spec in MEMBERS]
        concluding = _call(rng, JUDGE, "concluding", prompt + sum(rng.randint(50, 1200) for _ in members))
        latency = max(m.latency_ms or 0.0 for m in members) + (concluding.latency_ms or 0.0)
        outcomes.append(
            RequestOutcome(
                request_id=str(uuid.UUID(int=rng.getrandbits(128), version=4)),
                mom_model=rng.choice(MOM_MODELS),
                stream=rng.random() < 0.6,
                status="ok",
                error_code=None,
                started_at=now - rng.uniform(0, 86_400),
                latency_ms=round(latency, 1),
                ttft_ms=round(latency - (concluding.latency_ms or 0.0) + (concluding.ttft_ms or 0.0), 1),
                breakdown=Breakdown(members=members, concluding=concluding),
            )
        )
    return outcomes


@dataclass
class WriterResult:
    backend: str
    records: int
    seconds: float
    records_per_s: float
    calls_rows_per_s: float
    submit_seconds: float
    request_rows: int
    call_rows: int
    cost_pico_sum: int
    expected_cost_pico_sum: int
    dropped: int
    ok: bool


async def measure_writer(backend: str, url: str, outcomes: Sequence[RequestOutcome]) -> WriterResult:
    engine = create_engine(url)
    try:
        await migrate(engine)
        writer = UsageWriter(engine, max_queue=len(outcomes) + 1)  # every record fits: none is dropped
        submit_started = time.perf_counter()
        for outcome in outcomes:
            writer.submit(outcome)
        submit_seconds = time.perf_counter() - submit_started
        started = time.perf_counter()
        writer.start()
        while writer.depth > 0:
            await asyncio.sleep(0.002)
        seconds = time.perf_counter() - started
        await writer.close()
        async with engine.connect() as conn:
            request_rows = int((await conn.execute(select(func.count()).select_from(requests_table))).scalar_one())
            call_rows = int((await conn.execute(select(func.count()).select_from(calls_table))).scalar_one())
            cost = int(
                (await conn.execute(select(func.coalesce(func.sum(requests_table.c.cost_pico), 0)))).scalar_one()
            )
    finally:
        await engine.dispose()
    expected_cost = sum(to_pico(o.breakdown.cost) or 0 for o in outcomes)
    records = len(outcomes)
    return WriterResult(
        backend=backend,
        records=records,
        seconds=round(seconds, 3),
        records_per_s=round(records / seconds),
        calls_rows_per_s=round(call_rows / seconds),
        submit_seconds=round(submit_seconds, 3),
        request_rows=request_rows,
        call_rows=call_rows,
        cost_pico_sum=cost,
        expected_cost_pico_sum=expected_cost,
        dropped=writer.dropped,
        ok=request_rows == records and call_rows == records * CALLS_PER_REQUEST and cost == expected_cost,
    )


def _asyncpg_dsn(url: URL) -> str:
    return url.set(drivername="postgresql").render_as_string(hide_password=False)


async def measure_postgres(admin_url: str, outcomes: Sequence[RequestOutcome]) -> WriterResult | str:
    """The PostgreSQL run in a fresh database; the reason it was skipped if the server does not answer."""
    admin = make_url(admin_url)
    name = f"mom_bench_{os.getpid()}"
    try:
        conn = await asyncpg.connect(_asyncpg_dsn(admin), timeout=5)
    except (TimeoutError, OSError, asyncpg.PostgresError) as exc:
        return f"PostgreSQL at {admin.render_as_string(hide_password=True)} did not answer: {exc!r}"
    try:
        await conn.execute(f'CREATE DATABASE "{name}"')
        try:
            return await measure_writer("postgresql", admin.set(database=name).render_as_string(False), outcomes)
        finally:
            await conn.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
    finally:
        await conn.close()


async def writer_throughput(records: int, postgres_url: str) -> tuple[list[WriterResult], list[str]]:
    outcomes = make_outcomes(records)
    results: list[WriterResult] = []
    notes: list[str] = []
    with tempfile.TemporaryDirectory(prefix="mom-bench-") as folder:
        results.append(await measure_writer("sqlite", f"sqlite+aiosqlite:///{folder}/usage.db", outcomes))
    postgres = await measure_postgres(postgres_url, outcomes)
    if isinstance(postgres, str):
        notes.append(f"PostgreSQL skipped: {postgres}")
    else:
        results.append(postgres)
    return results, notes


# ------------------------------------------------------------------------------------ latency under a lock


@dataclass
class Phase:
    name: str
    seconds: float = 0.0
    latencies_ms: list[float] = field(default_factory=list)
    errors: list[str] = field(default_factory=list)

    def summary(self) -> dict[str, Any]:
        lat = self.latencies_ms
        return {
            "phase": self.name,
            "seconds": round(self.seconds, 2),
            "requests": len(lat) + len(self.errors),
            "ok": len(lat),
            "errors": len(self.errors),
            "requests_per_s": round(len(lat) / self.seconds, 1) if self.seconds else 0.0,
            "p50_ms": round(percentile(lat, 0.50), 1),
            "p95_ms": round(percentile(lat, 0.95), 1),
            "p99_ms": round(percentile(lat, 0.99), 1),
            "max_ms": round(max(lat, default=float("nan")), 1),
            "first_errors": self.errors[:5],
        }


class SqliteLock:
    """Another connection holding `BEGIN EXCLUSIVE` on the file, in a thread, until released."""

    def __init__(self, path: Path, max_hold_s: float) -> None:
        self.path = path
        self.max_hold_s = max_hold_s
        self.acquired = threading.Event()
        self.release = threading.Event()
        self.error: BaseException | None = None
        self.held_s = 0.0
        self._thread = threading.Thread(target=self._hold, name="sqlite-lock", daemon=True)

    def _hold(self) -> None:
        try:
            conn = sqlite3.connect(self.path, timeout=30, isolation_level=None)
            try:
                conn.execute("BEGIN EXCLUSIVE")
                started = time.perf_counter()
                self.acquired.set()
                self.release.wait(self.max_hold_s)
                conn.execute("COMMIT")
                self.held_s = time.perf_counter() - started
            finally:
                conn.close()
        except BaseException as exc:
            self.error = exc
            self.acquired.set()

    def start(self) -> None:
        self._thread.start()
        if not self.acquired.wait(35) or self.error is not None:
            raise RuntimeError(f"could not lock {self.path}: {self.error!r}")

    def stop(self) -> None:
        self.release.set()
        self._thread.join(10)


def _body(n: int) -> dict[str, Any]:
    return {"model": "mom", "messages": [{"role": "user", "content": f"Benchmark question number {n}?"}]}


async def _ask(client: httpx.AsyncClient, service: Service, n: int) -> tuple[float, str | None]:
    """One non-streaming request: (latency ms, error or None)."""
    started = time.perf_counter()
    try:
        response = await client.post(f"{service.base_url}/chat/completions", headers=service.headers(), json=_body(n))
    except httpx.HTTPError as exc:
        return (time.perf_counter() - started) * 1000, f"{type(exc).__name__}: {exc}"
    latency = (time.perf_counter() - started) * 1000
    if response.status_code != 200:
        return latency, f"HTTP {response.status_code}: {response.text[:200]}"
    return latency, None


async def run_phase(client: httpx.AsyncClient, service: Service, name: str, clients: int, seconds: float) -> Phase:
    """A closed loop: each client sends its next request as soon as the last one is answered, until the end."""
    phase = Phase(name)
    counter = iter(range(10**9))
    started = time.perf_counter()
    deadline = started + seconds

    async def loop() -> None:
        while time.perf_counter() < deadline:
            latency, error = await _ask(client, service, next(counter))
            if error is None:
                phase.latencies_ms.append(latency)
            else:
                phase.errors.append(error)

    await asyncio.gather(*(loop() for _ in range(clients)))
    phase.seconds = time.perf_counter() - started
    return phase


async def usage_requests(client: httpx.AsyncClient, service: Service) -> int:
    response = await client.get(
        f"{service.base_url}/metrics/usage", params={"start": time.time() - 3600}, headers=service.headers()
    )
    response.raise_for_status()
    return int(response.json()["totals"]["requests"])


async def wait_counted(client: httpx.AsyncClient, service: Service, target: int, since: float) -> float | None:
    """Seconds from `since` until the usage API counts at least `target` requests; None if it never does."""
    deadline = since + 90
    while time.perf_counter() < deadline:
        if await usage_requests(client, service) >= target:
            return round(time.perf_counter() - since, 2)
        await asyncio.sleep(0.05)
    return None


async def lock_phases(
    service: Service, fake: FakeUpstream, db_path: Path, clients: int, seconds: float
) -> dict[str, Any]:
    limits = httpx.Limits(max_connections=clients + 4, max_keepalive_connections=clients + 4)
    async with httpx.AsyncClient(timeout=60, limits=limits, trust_env=False) as client:
        warm = await run_phase(client, service, "warm-up", clients, 3.0)
        if warm.errors:
            raise RuntimeError(f"warm-up failed: {warm.errors[:3]}")
        await asyncio.to_thread(fake.clear_log)

        free = await run_phase(client, service, "1: database free", clients, seconds)
        await asyncio.to_thread(fake.clear_log)
        answered_before_lock = len(warm.latencies_ms) + len(free.latencies_ms)

        lock = SqliteLock(db_path, max_hold_s=seconds + 60)
        await asyncio.to_thread(lock.start)
        try:
            locked = await run_phase(client, service, "2: BEGIN EXCLUSIVE held", clients, seconds)
            visible_while_locked = await usage_requests(client, service)  # WAL: readers are not blocked
        finally:
            await asyncio.to_thread(lock.stop)
        released_at = time.perf_counter()
        if lock.error is not None:
            raise RuntimeError(f"the lock thread failed: {lock.error!r}")
        answered_before_release = answered_before_lock + len(locked.latencies_ms)
        held_written = asyncio.create_task(wait_counted(client, service, answered_before_release, released_at))
        await asyncio.to_thread(fake.clear_log)

        after = await run_phase(client, service, "3: after release", clients, seconds)
        held_written_s = await held_written
        await asyncio.to_thread(fake.clear_log)
        phases = [free, locked, after]
        answered = len(warm.latencies_ms) + sum(len(p.latencies_ms) for p in phases)

        await wait_counted(client, service, answered, time.perf_counter())
        counted = await usage_requests(client, service)

    return {
        "phases": [p.summary() for p in phases],
        "warm_up_answers": len(warm.latencies_ms),
        "answered_before_lock": answered_before_lock,
        "usage_requests_while_locked": visible_while_locked,
        "lock_held_s": round(lock.held_s, 2),
        "answers_total": answered,
        "usage_requests_final": counted,
        "usage_caught_up": counted == answered,
        "answered_before_release": answered_before_release,
        "seconds_from_release_to_held_records_counted": held_written_s,
    }


def latency_under_lock(clients: int, seconds: float, member_ms: int, judge_ms: int) -> dict[str, Any]:
    fake = FakeUpstream(free_port())
    fake.start()
    service: Service | None = None
    try:
        fake.configure(
            {**{m: {"ttft_ms": member_ms} for m in ("alpha", "beta", "gamma")}, "judge": {"ttft_ms": judge_ms}}
        )
        with tempfile.TemporaryDirectory(prefix="mom-bench-service-") as folder:
            workdir = Path(folder)
            db_path = workdir / "mom.db"
            env = {"API_TOKEN": TOKEN, "FAKE_KEY": FAKE_KEY, "DATABASE_URL": f"sqlite+aiosqlite:///{db_path}"}
            service = Service(workdir, panel_config(fake), env)
            service.start()
            try:
                result = asyncio.run(lock_phases(service, fake, db_path, clients, seconds))
            except BaseException:
                print("service log (last 40 lines):\n" + "\n".join(service.log().splitlines()[-40:]), file=sys.stderr)
                raise
            finally:
                service.stop()
            log = service.log()
            result["service_log_write_failures"] = log.count("usage database write failed")
            result["service_log_dropped"] = log.count("usage queue full")
    finally:
        fake.stop()
    result.update(clients=clients, phase_seconds=seconds, member_ttft_ms=member_ms, judge_ttft_ms=judge_ms)
    return result


# ----------------------------------------------------------------------------------------------------- main


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m bench.usage_writer", description=__doc__.split("\n\n")[0])
    parser.add_argument("--records", type=int, default=20_000, help="records for the throughput part (20000)")
    parser.add_argument("--postgres-url", default=DEFAULT_POSTGRES_URL, help="an existing database to connect to")
    parser.add_argument("--skip-lock", action="store_true", help="skip the latency-under-a-lock part")
    parser.add_argument("--clients", type=int, default=8, help="concurrent clients in the lock part (8)")
    parser.add_argument("--phase-seconds", type=float, default=10.0, help="length of each lock phase (10)")
    args = parser.parse_args(argv)
    host = make_url(args.postgres_url).host
    if host not in LOCAL_HOSTS:
        parser.error(f"--postgres-url must point at this machine (127.0.0.1), not {host!r}")
    if args.records < 1 or args.clients < 1 or args.phase_seconds <= 0:
        parser.error("--records, --clients and --phase-seconds must be positive")
    return args


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    failures: list[str] = []
    report: dict[str, Any] = {
        "benchmark": "usage_writer",
        "when": datetime.now(UTC).isoformat(timespec="seconds"),
        "machine": {
            "python": platform.python_version(),
            "sqlite": sqlite3.sqlite_version,
            "platform": platform.platform(),
            "cpus": os.cpu_count(),
        },
        "args": vars(args) | {"postgres_url": make_url(args.postgres_url).render_as_string(hide_password=True)},
    }

    print(f"## Usage writer throughput ({args.records} records, 4 calls each, default batch size)\n")
    results, notes = asyncio.run(writer_throughput(args.records, args.postgres_url))
    rows = [[r.backend, r.records, f"{r.seconds:.2f}", r.records_per_s, r.calls_rows_per_s] for r in results]
    print(markdown_table(["backend", "records", "seconds", "records/s", "calls rows/s"], rows))
    for note in notes:
        print(f"\n{note}")
    for r in results:
        if not r.ok:
            failures.append(
                f"{r.backend}: {r.request_rows} request rows, {r.call_rows} call rows, cost {r.cost_pico_sum} pico "
                f"(expected {r.records}, {r.records * CALLS_PER_REQUEST}, {r.expected_cost_pico_sum})"
            )
    report["writer"] = {"results": [asdict(r) for r in results], "notes": notes}

    if not args.skip_lock:
        print(f"\n## Answer latency while the SQLite file is locked ({args.clients} clients, non-streaming)\n")
        lock = latency_under_lock(args.clients, args.phase_seconds, member_ms=20, judge_ms=20)
        headers = ["phase", "seconds", "requests", "req/s", "p50 ms", "p95 ms", "p99 ms", "max ms", "errors"]
        keys = ["phase", "seconds", "requests", "requests_per_s", "p50_ms", "p95_ms", "p99_ms", "max_ms", "errors"]
        print(markdown_table(headers, [[p[k] for k in keys] for p in lock["phases"]]))
        print()
        print(
            markdown_table(
                [
                    "answered before the lock",
                    "counted at the end of the lock",
                    "answered before the release",
                    "held records counted after release (s)",
                    "answered in all (incl. warm-up)",
                    "counted at the end",
                ],
                [
                    [
                        lock["answered_before_lock"],
                        lock["usage_requests_while_locked"],
                        lock["answered_before_release"],
                        lock["seconds_from_release_to_held_records_counted"],
                        lock["answers_total"],
                        lock["usage_requests_final"],
                    ]
                ],
            )
        )
        free, locked = lock["phases"][0], lock["phases"][1]
        ratio = locked["p50_ms"] / free["p50_ms"]
        lock["p50_ratio_locked_to_free"] = round(ratio, 2)
        print(f"\nphase 2 p50 / phase 1 p50 = {ratio:.2f} (limit {P50_LIMIT})")
        if ratio > P50_LIMIT:
            failures.append(f"phase 2 p50 is {ratio:.2f}x phase 1's (limit {P50_LIMIT}x)")
        errors = sum(p["errors"] for p in lock["phases"])
        if errors:
            failures.append(f"{errors} requests failed: {[p['first_errors'] for p in lock['phases']]}")
        if lock["usage_requests_while_locked"] > lock["answered_before_lock"]:
            failures.append("records answered during the lock were written while it was held: the lock did not hold")
        if not lock["usage_caught_up"]:
            failures.append(
                f"usage API counts {lock['usage_requests_final']} requests, {lock['answers_total']} answered"
            )
        report["lock"] = lock

    report["failures"] = failures
    RESULTS_DIR.mkdir(parents=True, exist_ok=True)
    path = RESULTS_DIR / f"usage_writer-{datetime.now(UTC):%Y-%m-%d}.json"
    path.write_text(json.dumps(report, indent=2) + "\n")
    print(f"\nresults: {path}")
    for failure in failures:
        print(f"FAIL: {failure}", file=sys.stderr)
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
