"""Performance benchmark: what the gateway adds over the least a fan-out can cost, next to LiteLLM's proxy.

    .venv/bin/python -m bench.perf.run [--quick] [--rounds 2] [--concurrency 1,8,32,128,256]
        [--targets direct,litellm-proxy,mom-1,mom-3,mom-5,local] [--out bench/results]
        [--fail-rate 0] [--straggler-rate 0] [--straggler-ms 500] [--mom-env NAME=VALUE ...]

Offline, on one machine. The fake upstream (bench.perf.fake) serves members m1..m5 (whole answers after 150, 175,
200, 225, 250 ms) and the concluding LLM `judge` (first token after 100 ms, then 64 tokens 20 ms apart). Targets, each
its own server process on the same fake:

    direct          bench.perf.direct: m1..m3 with aiohttp and asyncio.gather, then the judge's stream passed through
    litellm-proxy   LiteLLM's proxy (its own venv, bench.perf.litellm_proxy): one pass-through call to the judge
    mom-1/3/5       `mom-service serve` (one process, three MoM models over m1, m1..m3, m1..m5, concluded by judge),
                    as deployed by default: bearer token, usage records in SQLite, request logs, circuit breakers,
                    the response cache on (every request is unique: each is a miss, then stored)

The targets run pinned to core 0; this process (the load client, bench.perf.load) and the fake to core 1. In rounds,
for each concurrency, the targets in shuffled order get a warm-up and then a closed loop of max(2c, 16) streamed
requests, each unique (the c streams start spread over one request's time). Merged over rounds per target and
concurrency:

- added time to first token and end to end (p50/p95/p99) over the theoretical minimum: the slowest member plus the
  judge's time to first token (for the proxy: the judge's alone), plus 63 x 20 ms for the end;
- added gap between content chunks over the fake's 20 ms, and stalls (a gap over 20 + 200 ms);
- requests per second; the target's CPU (/proc) per request; its peak RSS (sampled every 50 ms).

Per target: time from start to ready, RSS idle / peak at the largest concurrency / per request in flight / 5 s after
the load; CPU per streamed chunk (at c=32, a 16-token and a 256-token judge: the slope); for mom-*, cache-hit latency
(a second process with the cache on: one miss, then identical requests one after another, whole and streamed).

A cell is invalid when the load core (this process + the fake) was over 85% busy, the client's event loop lagged over
20 ms at p99, other processes took over 10% of either core (/proc/stat), or a request failed; the run is valid only
if every cell is (and the cores could be pinned).
`--quick` runs 1 round at c=1,8,32 with fewer requests. Results: bench/results/perf-<UTC date>.json, .md and .png
(bench.perf.report); the markdown is printed. Exit 0 even when invalid ("INVALID: ..." is printed).

`local` (in the default targets; or `direct-local`, `local-1`, `local-3`): mom-service over a real llama.cpp server
against that server alone, at c=1,8 unless --concurrency says otherwise (bench.perf.local; skipped, saying so, where
llama-cpp-python is not installed: make local-llm). It runs first, in its own processes; results perf-local-*.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import platform
import random
import resource
import shlex
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import urllib.request
from contextlib import ExitStack
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from types import FrameType
from typing import Any

import httpx
import orjson
import uvloop
import yaml

from bench.perf import load
from bench.perf.fake import DEFAULTS
from bench.perf.litellm_proxy import MASTER_KEY, ensure_proxy_venv, start_proxy
from bench.soak import percentile, rss_mb
from mom_service.local_demo.command import stop
from tests.conftest import free_port

ROOT = Path(__file__).resolve().parents[2]
BIN = Path(sys.executable).parent
Process = subprocess.Popen[bytes]
TOKEN = "bench-perf-token-0123456789"
TARGETS = ("direct", "litellm-proxy", "mom-1", "mom-3", "mom-5")
MEMBERS = [f"m{i}" for i in range(1, 6)]
JUDGE, SHORT, LONG = "judge", "judge16", "judge256"  # the short and long judges measure the CPU per chunk
CHUNK_CELL_C = 32
STALL_MS = 200.0
LOAD_CORE_MAX_PCT = 85.0
LOOP_LAG_MAX_MS = 20.0
SETTLE_S = 0.25  # after a cell, before reading the target's CPU: work it deferred (usage records) counts too
IDLE_AFTER_S = 5.0
FOREIGN_MAX_PCT = 10.0  # other processes' share of our cores beyond which a cell is invalid
TICKS = os.sysconf("SC_CLK_TCK")


def fake_models(fail_rate: float, straggler_rate: float, straggler_ms: float) -> dict[str, dict[str, Any]]:
    members = {
        name: DEFAULTS
        | {"ttft_ms": 125 + 25 * i, "tokens": 40, "seed": i}
        | {"fail_rate": fail_rate, "straggler_rate": straggler_rate, "straggler_ms": straggler_ms}
        for i, name in enumerate(MEMBERS, 1)
    }
    judges = {
        JUDGE: DEFAULTS | {"ttft_ms": 100, "token_ms": 20, "tokens": 64},
        SHORT: DEFAULTS | {"ttft_ms": 100, "token_ms": 10, "tokens": 16},
        LONG: DEFAULTS | {"ttft_ms": 100, "token_ms": 10, "tokens": 256},
    }
    return members | judges


@dataclass
class Target:
    name: str
    kind: str  # direct, litellm-proxy, mom
    members: list[str]
    label: str
    process: Process | None = None
    url: str = ""
    skipped: str | None = None
    start_to_ready_ms: float | None = None
    rss_idle_mb: float | None = None
    rss_after_mb: float | None = None
    cpu_us_per_chunk: float | None = None
    cache_hit_ms: dict[str, dict[str, float]] | None = None

    def model(self, judge: str) -> str:
        """The request's `model` for this target concluded by `judge`."""
        if self.kind != "mom":
            return judge
        return self.name if judge == JUDGE else f"{self.name}-{judge}"

    @property
    def headers(self) -> dict[str, str]:
        """Both gateways check a bearer token (as deployed); the reference fan-out has none."""
        if self.kind == "litellm-proxy":
            return {"Authorization": f"Bearer {MASTER_KEY}"}
        return {"Authorization": f"Bearer {TOKEN}"} if self.kind == "mom" else {}


def make_targets(names: list[str]) -> list[Target]:
    targets = []
    for name in names:
        if name == "direct":
            targets.append(Target(name, "direct", MEMBERS[:3], "reference fan-out (aiohttp, 3 members)"))
        elif name == "litellm-proxy":
            targets.append(Target(name, "litellm-proxy", [], "LiteLLM proxy (pass-through to the judge)"))
        else:
            n = int(name.removeprefix("mom-"))
            targets.append(Target(name, "mom", MEMBERS[:n], f"mom-service, {n} member{'s' * (n > 1)}"))
    return targets


@dataclass
class Cell:
    """One measured cell: a target at a concurrency, in one round."""

    samples: list[load.Sample]
    lags: list[float]
    wall_s: float
    cpu_s: float  # the target process'
    rss_peak_mb: float
    load_core_pct: float  # this process + the fake, over the wall time
    foreign: list[str]  # other processes (other users of the machine) that took a share of our cores


class Bench:
    """The processes of one run and the measurements made on them."""

    def __init__(self, args: argparse.Namespace, stack: ExitStack, workdir: Path) -> None:
        self.stack = stack
        self.workdir = workdir
        self.pinned, self.target_cpu, self.load_cpu = split_cores()
        self.fake = fake_models(args.fail_rate, args.straggler_rate, args.straggler_ms)
        self.fake_port = free_port()
        self.fake_process: Process | None = None
        self.upstream = f"http://127.0.0.1:{self.fake_port}/v1"
        self.mom_env = dict(item.split("=", 1) for item in args.mom_env)
        self.stream_members: str | None = args.stream_members

    # ----------------------------------------------------------------------------------------------- processes
    def launch(self, args: list[str], env: dict[str, str] | None, cpu: int | None, name: str) -> Process:
        with (self.workdir / f"{name}.log").open("wb") as log:
            process = subprocess.Popen(args, cwd=ROOT, env=env, stdout=log, stderr=subprocess.STDOUT)
        self.stack.callback(stop, process)
        if cpu is not None:  # at once: the child has not started a thread yet, and its threads inherit this
            os.sched_setaffinity(process.pid, {cpu})
        return process

    def log_tail(self, name: str) -> str:
        lines = (self.workdir / f"{name}.log").read_text(errors="replace").splitlines()
        return " | ".join(lines[-5:])

    def start_fake(self) -> None:
        args = [sys.executable, "-m", "bench.perf.fake", "--port", str(self.fake_port)]
        process = self.launch([*args, "--models", orjson.dumps(self.fake).decode()], None, self.load_cpu, "fake")
        if wait_ready(process, f"http://127.0.0.1:{self.fake_port}/health", 30) is None:
            raise RuntimeError(f"the fake upstream did not start: {self.log_tail('fake')}")
        self.fake_process = process

    def start_direct(self, target: Target) -> None:
        port = free_port()
        args = [sys.executable, "-m", "bench.perf.direct", "--port", str(port), "--upstream", self.upstream]
        target.process = self.launch([*args, "--members", ",".join(target.members)], None, self.target_cpu, "direct")
        target.url = f"http://127.0.0.1:{port}/v1/chat/completions"
        self.ready(target, f"http://127.0.0.1:{port}/health", 30, "direct")

    def start_proxy(self, target: Target) -> None:
        python = ensure_proxy_venv()
        if isinstance(python, str):
            target.skipped = f"LiteLLM's proxy could not be installed: {python}"
            return
        port = free_port()
        started = time.perf_counter()
        proxy = start_proxy(python, port, self.upstream, [JUDGE, SHORT, LONG], self.target_cpu or 0, MASTER_KEY)
        self.stack.callback(shutil.rmtree, proxy.config_path.parent, ignore_errors=True)  # after the stop below
        self.stack.callback(stop, proxy)
        target.process, target.url = proxy, f"http://127.0.0.1:{port}/v1/chat/completions"
        target.start_to_ready_ms = wait_ready(proxy, f"http://127.0.0.1:{port}/health/liveliness", 180, started)
        if target.start_to_ready_ms is None:
            target.skipped = f"LiteLLM's proxy did not become ready: {proxy.tail(5)}"[:800]

    def start_mom(self, targets: list[Target], cache: bool, name: str, timed: bool = True) -> Process | None:
        """One `mom-service serve` for every mom-* target; None (and the targets skipped) if it does not start."""
        folder = self.workdir / name
        folder.mkdir()
        (folder / "config.yaml").write_text(yaml.safe_dump(mom_config(self.upstream, targets, self.stream_members)))
        port = free_port()
        env = {k: v for k, v in os.environ.items() if not k.startswith(("API_TOKEN", "MOM_", "LITELLM_", "OPENAI_"))}
        env |= {
            "MOM_CONFIG": str(folder / "config.yaml"),
            "HOST": "127.0.0.1",
            "PORT": str(port),
            "DATABASE_URL": f"sqlite+aiosqlite:///{folder / 'mom.db'}",
            "API_TOKEN": TOKEN,
            "MOM_CACHE_ENABLED": str(cache).lower(),
        }
        env |= self.mom_env
        process = self.launch([str(BIN / "mom-service"), "serve"], env, self.target_cpu, name)
        process_ready = wait_ready(process, f"http://127.0.0.1:{port}/health/ready", 60)
        for target in targets:
            target.process, target.url = process, f"http://127.0.0.1:{port}/v1/chat/completions"
            if process_ready is None:
                target.skipped = f"mom-service did not become ready: {self.log_tail(name)}"[:800]
            elif timed:
                target.start_to_ready_ms = process_ready
        return process if process_ready is not None else None

    def ready(self, target: Target, url: str, timeout: float, name: str) -> None:
        assert target.process is not None
        target.start_to_ready_ms = wait_ready(target.process, url, timeout)
        if target.start_to_ready_ms is None:
            target.skipped = f"{name} did not become ready: {self.log_tail(name)}"[:800]

    # ----------------------------------------------------------------------------------------------- measuring
    def cell(self, target: Target, judge: str, c: int, requests: int, warmup: int, prefix: str) -> Cell:
        assert target.process is not None and self.fake_process is not None
        pid = target.process.pid
        start: dict[str, float] = {}

        def mark() -> None:  # after the warm-up, before the measured requests
            start.update(target=cpu_s(pid), load=self_cpu_s() + fake_cpu_s(self.fake_port), **cores_busy_s())

        async def measure() -> tuple[list[load.Sample], list[float], float, float]:
            peak = 0.0

            async def sample_rss() -> None:
                nonlocal peak
                while True:
                    peak = max(peak, rss_mb(pid))
                    await asyncio.sleep(0.05)

            sampler = asyncio.create_task(sample_rss())
            url, model, ramp_s = target.url, target.model(judge), ideal(self.fake, target.members, judge)[1] / 1000
            samples, lags, wall = await load.run_cell(
                url, model, target.headers, c, requests, warmup, prefix, mark, ramp_s
            )
            sampler.cancel()
            return samples, lags, wall, peak

        samples, lags, wall, peak = uvloop.run(measure())
        load_s = self_cpu_s() + fake_cpu_s(self.fake_port) - start["load"]
        busy = {core: s - start[core] for core, s in cores_busy_s().items()}
        ours = {f"cpu{self.target_cpu}": cpu_s(pid) - start["target"], f"cpu{self.load_cpu}": load_s}
        time.sleep(SETTLE_S)
        foreign = []
        if self.pinned:
            for core, mine in ours.items():
                if (pct := 100 * (busy[core] - mine) / wall) > FOREIGN_MAX_PCT:
                    foreign.append(f"other processes took {pct:.0f}% of {core} (> {FOREIGN_MAX_PCT:g}%)")
        target_s = cpu_s(pid) - start["target"]
        return Cell(samples, lags, wall, target_s, peak, 100 * load_s / wall, foreign)

    def cache_hits(self, target: Target, hits: int) -> dict[str, dict[str, float]]:
        """Client latency (ms, p50/p99) of identical requests answered from the cache, whole and streamed."""
        body: dict[str, Any] = {
            "model": target.model(JUDGE),
            "messages": [{"role": "user", "content": "Benchmark question: what does a cache hit cost?"}],
        }
        streamed = body | {"stream": True, "stream_options": {"include_usage": True}}
        out = {}
        with httpx.Client(timeout=60, headers=target.headers) as client:
            client.post(target.url, json=body).raise_for_status()  # the miss that fills the cache
            for mode, request in (("whole", body), ("stream", streamed)):
                times = []
                for _ in range(hits):
                    started = time.perf_counter()
                    response = client.post(target.url, json=request)
                    times.append((time.perf_counter() - started) * 1000)
                    if cache_state(response, mode == "stream") != "hit":
                        raise RuntimeError(f"{target.name}: not a cache hit: {response.text[-300:]}")
                out[mode] = {"p50": round(percentile(times, 0.5), 2), "p99": round(percentile(times, 0.99), 2)}
        return out


def mom_config(upstream: str, targets: list[Target], stream_members: str | None = None) -> dict[str, Any]:
    price = {"input_per_million": 1, "output_per_million": 4}
    judges = [JUDGE, SHORT, LONG]
    streaming = {"stream_members": stream_members} if stream_members is not None else {}
    return {
        "llm_definitions": [
            {"name": name, "model": f"openai/{name}", "api_base": upstream, "pricing": price}
            for name in MEMBERS + judges
        ],
        "prompt_definitions": [{"name": "synth", "content": "Combine the panel's answers into one better answer."}],
        "models": [
            {
                "name": t.model(judge),
                "llms_to_query": t.members,
                "concluding_llm": judge,
                "concluding_prompt": "synth",
                **streaming,
            }
            for t in targets
            for judge in judges
        ],
    }


def cache_state(response: httpx.Response, stream: bool) -> str | None:
    if response.status_code != 200:
        return None
    if stream:
        frames = response.text.split("\n\n")
        last = orjson.loads(frames[-3].removeprefix("data: ")) if len(frames) >= 3 else {}
    else:
        last = response.json()
    state: str | None = last.get("mom", {}).get("cache")
    return state


def wait_ready(process: Process, url: str, timeout: float, started: float | None = None) -> float | None:
    """Milliseconds from `started` (default: now) until `url` answered 200; None if the process exited or timed out."""
    started = time.perf_counter() if started is None else started
    deadline = started + timeout
    while time.perf_counter() < deadline and process.poll() is None:
        try:
            if httpx.get(url, timeout=1).status_code == 200:
                return round((time.perf_counter() - started) * 1000, 1)
        except httpx.HTTPError:
            pass
        time.sleep(0.02)
    return None


def split_cores() -> tuple[bool, int | None, int | None]:
    """(pinned, the targets' core, the load's core): the first two cores this process may use, this process moved
    onto the second; (False, None, None) with fewer than two."""
    cores = sorted(os.sched_getaffinity(0))
    if len(cores) < 2:
        return False, None, None
    os.sched_setaffinity(0, {cores[1]})
    return True, cores[0], cores[1]


def cpu_s(pid: int) -> float:
    """The CPU time of every live thread of the process, to the nanosecond (/proc/<pid>/stat counts in 10 ms ticks,
    too coarse for a few requests)."""
    total = 0
    for tid in os.listdir(f"/proc/{pid}/task"):
        try:
            with open(f"/proc/{pid}/task/{tid}/schedstat") as schedstat:
                total += int(schedstat.read().split()[0])
        except (FileNotFoundError, ProcessLookupError):  # the thread has just ended
            pass
    return total / 1e9


def cores_busy_s() -> dict[str, float]:
    """Seconds each core ("cpu0", ...) ran anything (user, system, or stolen by the hypervisor), from /proc/stat."""
    busy = {}
    for line in Path("/proc/stat").read_text().splitlines():
        name, *fields = line.split()
        if name.startswith("cpu") and name != "cpu":
            user, nice, system, _idle, _iowait, _irq, _softirq, steal = (int(f) for f in fields[:8])
            busy[name] = (user + nice + system + steal) / TICKS
    return busy


def self_cpu_s() -> float:
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


def fake_cpu_s(port: int) -> float:
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/_stats", timeout=5) as response:
        return float(orjson.loads(response.read())["cpu_s"])


def ideal(fake: dict[str, dict[str, Any]], members: list[str], judge: str) -> tuple[float, float]:
    """The theoretical minimum (ms) of the time to first token and end to end: the slowest member's whole answer,
    then the judge's first token; then the rest of its tokens."""
    slowest = max((fake[m]["ttft_ms"] + fake[m]["tokens"] * fake[m]["token_ms"] for m in members), default=0.0)
    j = fake[judge]
    ttft = slowest + j["ttft_ms"]
    return ttft, ttft + (j["tokens"] - 1) * j["token_ms"]


def pcts(values: list[float]) -> dict[str, float]:
    return {f"p{q}": round(percentile(values, q / 100), 2) for q in (50, 95, 99)}


def level(cells: list[Cell], ideal_ttft: float, ideal_e2e: float, token_ms: float) -> dict[str, Any]:
    samples = [s for cell in cells for s in cell.samples]
    ok = [s for s in samples if s.ok]
    gaps = [(b - a) * 1000 - token_ms for s in ok for a, b in zip(s.chunks, s.chunks[1:], strict=False)]
    errors = len(samples) - len(ok)
    load_pct = max(cell.load_core_pct for cell in cells)
    lag_ms = max(percentile(cell.lags, 0.99) for cell in cells) * 1000
    reasons = []
    if load_pct > LOAD_CORE_MAX_PCT:
        reasons.append(f"load core {load_pct:.0f}% busy (> {LOAD_CORE_MAX_PCT:g}%)")
    if lag_ms > LOOP_LAG_MAX_MS:
        reasons.append(f"client loop lag p99 {lag_ms:.1f} ms (> {LOOP_LAG_MAX_MS:g} ms)")
    reasons += sorted({why for cell in cells for why in cell.foreign})
    if errors:
        first = next(s.error for s in samples if not s.ok)
        reasons.append(f"{errors} failed requests (first: {first})")
    return {
        "requests": len(samples),
        "errors": errors,
        "rps": round(len(samples) / sum(cell.wall_s for cell in cells), 2),
        "ttft_added_ms": pcts([(s.chunks[0] - s.sent) * 1000 - ideal_ttft for s in ok]),
        "e2e_added_ms": pcts([(s.done - s.sent) * 1000 - ideal_e2e for s in ok if s.done is not None]),
        "gap_added_ms": pcts(gaps),
        "stalls": sum(1 for gap in gaps if gap > STALL_MS),
        "cpu_us_per_request": round(sum(cell.cpu_s for cell in cells) * 1e6 / max(1, len(samples)), 1),
        "rss_peak_mb": round(max(cell.rss_peak_mb for cell in cells), 1),
        "load_core_pct": round(load_pct, 1),
        "loop_lag_p99_ms": round(lag_ms, 2),
        "valid": not reasons,
        "invalid_reasons": reasons,
    }


def cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def run(args: argparse.Namespace, stack: ExitStack) -> dict[str, Any]:
    started_at = datetime.now(UTC)
    workdir = Path(stack.enter_context(tempfile.TemporaryDirectory(prefix="bench-perf-")))
    bench = Bench(args, stack, workdir)
    per_cell = {c: max(c, 4) if args.quick else max(2 * c, 16) for c in args.concurrency}
    warmup = 2 if args.quick else 8
    invalid: list[str] = [] if bench.pinned else ["fewer than 2 cores: the targets and the load are not pinned apart"]
    targets = make_targets(args.targets)
    bench.start_fake()
    moms = [t for t in targets if t.kind == "mom"]
    for target in targets:
        if target.kind == "direct":
            bench.start_direct(target)
        elif target.kind == "litellm-proxy":
            bench.start_proxy(target)
    if moms:
        bench.start_mom(moms, cache=True, name="mom")  # as deployed: the cache on (every request unique: misses)
    live = [t for t in targets if t.skipped is None]
    for target in live:
        assert target.process is not None
        target.rss_idle_mb = round(rss_mb(target.process.pid), 1)

    cells: dict[tuple[str, int], list[Cell]] = {}
    shuffler = random.Random(0)
    for r in range(args.rounds):
        for c in args.concurrency:
            for target in shuffler.sample(live, len(live)):
                print(f"round {r + 1}/{args.rounds} c={c} {target.name}", flush=True)
                prefix = f"r{r}-c{c}-{target.name}"
                cell = bench.cell(target, JUDGE, c, per_cell[c], min(c, warmup), prefix)
                cells.setdefault((target.name, c), []).append(cell)

    chunk_requests = per_cell.get(CHUNK_CELL_C, max(CHUNK_CELL_C, 4) if args.quick else 2 * CHUNK_CELL_C)
    for target in shuffler.sample(live, len(live)):
        print(f"CPU per chunk: {target.name}", flush=True)
        cpu: dict[str, float] = {}
        for judge in (SHORT, LONG):
            cell = bench.cell(target, judge, CHUNK_CELL_C, chunk_requests, warmup, f"chunks-{judge}-{target.name}")
            cpu[judge] = cell.cpu_s / len(cell.samples)
            verdict = level([cell], *ideal(bench.fake, target.members, judge), bench.fake[judge]["token_ms"])
            invalid += [f"{target.name} CPU-per-chunk cell ({judge}): {why}" for why in verdict["invalid_reasons"]]
        chunks = bench.fake[LONG]["tokens"] - bench.fake[SHORT]["tokens"]
        target.cpu_us_per_chunk = round((cpu[LONG] - cpu[SHORT]) * 1e6 / chunks, 1)

    time.sleep(IDLE_AFTER_S)
    for target in live:
        assert target.process is not None
        target.rss_after_mb = round(rss_mb(target.process.pid), 1)

    if moms and any(t.skipped is None for t in moms):
        print("cache hits", flush=True)
        hit_targets = make_targets([t.name for t in moms])
        if bench.start_mom(hit_targets, cache=True, name="mom-cache", timed=False) is None:
            invalid.append(f"cache hits not measured: {hit_targets[0].skipped}")
        for target, hit_target in zip(moms, hit_targets, strict=True):
            if hit_target.skipped is not None or target.skipped is not None:
                continue
            try:
                target.cache_hit_ms = bench.cache_hits(hit_target, 50 if args.quick else 500)
            except (RuntimeError, httpx.HTTPError) as exc:
                invalid.append(f"{target.name} cache hits: {exc}")

    largest = max(args.concurrency)
    out_targets: dict[str, Any] = {}
    for target in targets:
        levels: dict[str, Any] = {}
        ideal_ttft, ideal_e2e = ideal(bench.fake, target.members, JUDGE)
        for c in args.concurrency:
            if (target.name, c) in cells:
                levels[str(c)] = level(cells[target.name, c], ideal_ttft, ideal_e2e, bench.fake[JUDGE]["token_ms"])
                invalid += [f"{target.name} c={c}: {why}" for why in levels[str(c)]["invalid_reasons"]]
        rss_load = levels[str(largest)]["rss_peak_mb"] if str(largest) in levels else None
        per_inflight = None
        if rss_load is not None and target.rss_idle_mb is not None:
            per_inflight = round((rss_load - target.rss_idle_mb) * 1024 / largest, 1)
        out_targets[target.name] = {
            "label": target.label,
            "kind": target.kind,
            "members": len(target.members),
            "skipped": target.skipped,
            "start_to_ready_ms": target.start_to_ready_ms,
            "rss_idle_mb": target.rss_idle_mb,
            "rss_load_mb": rss_load,
            "rss_per_inflight_kb": per_inflight,
            "rss_after_mb": target.rss_after_mb,
            "cpu_us_per_chunk": target.cpu_us_per_chunk,
            "cache_hit_ms": target.cache_hit_ms,
            "levels": levels,
        }
    return {
        "date": started_at.date().isoformat(),
        "started_at": started_at.isoformat(timespec="seconds"),
        "command": shlex.join(["python", "-m", "bench.perf.run", *sys.argv[1:]]),
        "machine": {
            "cpu": cpu_name(),
            "cores": os.cpu_count() or 1,
            "python": sys.version.split()[0],
            "pinned": bench.pinned,
        },
        "config": {
            "rounds": args.rounds,
            "concurrency": args.concurrency,
            "requests_per_cell": {str(c): n for c, n in per_cell.items()},
            "fake": bench.fake,
        },
        "valid": not invalid,
        "invalid_reasons": invalid,
        "targets": out_targets,
    }


def interrupted(signum: int, frame: FrameType | None) -> None:
    raise KeyboardInterrupt  # SIGTERM cleans up as Ctrl-C does


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0] if __doc__ else None)
    parser.add_argument("--quick", action="store_true", help="1 round, c=1,8,32, fewer requests")
    parser.add_argument("--rounds", type=int)
    parser.add_argument("--concurrency", type=lambda s: [int(c) for c in s.split(",")])
    targets = ",".join(TARGETS)
    parser.add_argument("--targets", default=f"{targets},local", type=lambda s: s.split(","), help=f"default {targets}")
    parser.add_argument("--out", type=Path, default=ROOT / "bench" / "results")
    parser.add_argument("--fail-rate", type=float, default=0.0, help="of each member call (HTTP 500)")
    parser.add_argument("--straggler-rate", type=float, default=0.0, help="of member calls answering late")
    parser.add_argument("--straggler-ms", type=float, default=500.0)
    parser.add_argument(
        "--mom-env",
        action="append",
        default=[],
        metavar="NAME=VALUE",
        help="an environment variable for mom-service, e.g. MOM_LEAN_CALLS=false (repeatable)",
    )
    parser.add_argument(
        "--stream-members",
        choices=("auto", "on", "off"),
        help="the MoM models' stream_members (default: the config's default, auto: members asked whole here)",
    )
    args = parser.parse_args()
    from bench.perf.local import TARGETS as LOCAL_TARGETS
    from bench.perf.local import run_local, wanted

    if unknown := set(args.targets) - {*TARGETS, *LOCAL_TARGETS, "local"}:
        parser.error(f"unknown targets {sorted(unknown)}; known: {targets},local,{','.join(LOCAL_TARGETS)}")
    local, args.targets = wanted(args.targets), [t for t in args.targets if t in TARGETS]
    if local:  # the real llama.cpp server: at 1 and 8 streams unless told (it answers one call at a time)
        run_local(local, args.concurrency or [1, 8], args.quick, args.out)
        if not args.targets:
            return 0
    args.rounds = args.rounds or (1 if args.quick else 2)
    args.concurrency = args.concurrency or ([1, 8, 32] if args.quick else [1, 8, 32, 128, 256])
    signal.signal(signal.SIGTERM, interrupted)
    _, hard = resource.getrlimit(resource.RLIMIT_NOFILE)  # thousands of sockets at c=256 (children inherit)
    resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    try:
        with ExitStack() as stack:  # every process and the temporary directory, also on Ctrl-C
            results = run(args, stack)
    except KeyboardInterrupt:
        print("interrupted: every process stopped", file=sys.stderr)
        return 130
    args.out.mkdir(parents=True, exist_ok=True)
    out = args.out / f"perf-{results['date']}.json"
    out.write_text(orjson.dumps(results, option=orjson.OPT_INDENT_2).decode())
    try:
        from bench.perf.report import render
    except ImportError as exc:  # matplotlib missing: the results are in the JSON all the same
        print(f"written: {out} (no report: {exc})")
    else:
        markdown, png = render(results, args.out)
        print(markdown.read_text())
        print(f"written: {out}, {markdown}, {png}")
    if not results["valid"]:
        print("\n" + "!" * 80 + "\nINVALID: " + "\n         ".join(results["invalid_reasons"]) + "\n" + "!" * 80)
    return 0


if __name__ == "__main__":
    sys.exit(main())
