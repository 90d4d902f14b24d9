"""deploy/nginx.conf in a real nginx, in front of two live replicas: a chat request goes to a second replica only
when the first one surely spent nothing on it (refused it with 503, or never received it).

The config is the shipped file itself, with only what running here needs changed: the upstream's two `server`
lines point at the replicas' ports, the listen address is a free local port, and the worker user, pid file,
temporary paths and error log suit a process started by this test (as root, outside Docker). nginx is Debian's
package (`make test-deps` installs it); without it these tests skip, and fail when CI=true.

Both replicas share the fake upstream, each with LLMs of its own (`member-1`, `hold-1`, `judge-1` on replica 1,
`-2` on replica 2), so the fake's log says which replica ran a panel.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import socket
import subprocess
from collections.abc import Callable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import pytest

from tests.conftest import ROOT, TOKEN, Service, StartService, free_port, llm, wait_until
from tests.fake_upstream import FakeUpstream

pytestmark = pytest.mark.slow

NGINX_CONF = ROOT / "deploy" / "nginx.conf"
QUESTION = [{"role": "user", "content": "Which replica answers?"}]
CLIENT_TIMEOUT = 20.0  # a request re-run on a replica whose panel hangs would wait for this long, then fail


def nginx_binary() -> str:
    """Debian's nginx; the test is skipped without it (and fails when CI=true)."""
    found = shutil.which("nginx") or ("/usr/sbin/nginx" if os.access("/usr/sbin/nginx", os.X_OK) else None)
    if found is None:
        reason = "nginx is not installed (`make test-deps` installs Debian's package where apt-get can, as root)"
        if os.environ.get("CI") == "true":
            pytest.fail(f"CI=true requires nginx: {reason}")
        pytest.skip(reason)
    return found


def _substitute(pattern: str, replacement: str | Callable[[re.Match[str]], str], text: str, count: int) -> str:
    """`re.subn` over lines that must match exactly `count` times: the shipped file still has what is replaced."""
    result, found = re.subn(pattern, replacement, text, flags=re.MULTILINE)
    assert found == count, f"{pattern!r} matched {found} times in {NGINX_CONF}, expected {count}"
    return result


def local_config(shipped: str, replica_ports: tuple[int, int], port: int, workdir: Path) -> str:
    """The shipped config, to run here: local replicas and port, and a worker user, pid and temp paths of its own."""
    ports = iter(replica_ports)
    text = _substitute(
        r"^(\s*server\s+)mom-replica-\d+:\d+", lambda m: f"{m.group(1)}127.0.0.1:{next(ports)}", shipped, 2
    )
    text = _substitute(r"^(\s*)listen\s+\d+;", rf"\g<1>listen 127.0.0.1:{port};", text, 1)
    # the image's `nginx` user does not exist here: as root, workers run as root (owning the temp paths below)
    user = "user root;" if os.geteuid() == 0 else ""
    text = _substitute(r"^user\s+\S+;", user, text, 1)
    temp = "".join(
        f"\n    {kind}_temp_path {workdir / kind};" for kind in ("client_body", "proxy", "fastcgi", "uwsgi", "scgi")
    )
    return _substitute(r"^http\s*\{", "http {" + temp, text, 1)


@dataclass
class Nginx:
    process: subprocess.Popen[bytes]
    port: int
    log_path: Path

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")

    def chat(self, model: str) -> httpx.Response:
        return httpx.post(
            f"{self.url}/v1/chat/completions",
            headers={"Authorization": f"Bearer {TOKEN}"},
            json={"model": model, "messages": QUESTION},
            timeout=CLIENT_TIMEOUT,
        )


def start_nginx(binary: str, replicas: tuple[Service, Service], workdir: Path) -> Nginx:
    port = free_port()
    conf = workdir / "nginx.conf"
    conf.write_text(local_config(NGINX_CONF.read_text(), (replicas[0].port, replicas[1].port), port, workdir))
    log_path = workdir / "nginx.log"
    options = ["-p", str(workdir), "-c", str(conf), "-e", str(workdir / "error.log")]
    options += ["-g", f"daemon off; pid {workdir / 'nginx.pid'};"]
    check = subprocess.run([binary, "-t", *options], capture_output=True, text=True, timeout=30)
    assert check.returncode == 0, check.stderr
    with log_path.open("wb") as log:
        process = subprocess.Popen([binary, *options], stdout=log, stderr=subprocess.STDOUT)
    nginx = Nginx(process, port, log_path)

    def answers() -> bool:
        assert process.poll() is None, nginx.log()
        try:
            return httpx.get(f"{nginx.url}/lb-health", timeout=1).status_code == 200
        except httpx.HTTPError:
            return False

    wait_until(answers, timeout=15)
    return nginx


def replica_config(fake: FakeUpstream, n: int) -> dict[str, Any]:
    """Replica `n`'s config: the same MoM models as the other's, over LLMs of its own."""
    return {
        "llm_definitions": [llm(f"{name}-{n}", fake) for name in ("member", "hold", "judge")],
        "models": [
            {"name": "mom", "llms_to_query": [f"member-{n}"], "concluding_llm": f"judge-{n}"},
            {"name": "hold", "llms_to_query": [f"hold-{n}"], "concluding_llm": f"judge-{n}"},
        ],
    }


def replica_of(model: str) -> int:
    """Which replica called this LLM (0 or 1), by the suffix of its name."""
    return int(model.rsplit("-", 1)[1]) - 1


StartPair = Callable[[dict[str, str]], tuple[tuple[Service, Service], Nginx]]


@pytest.fixture
def balanced(start_service: StartService, fake: FakeUpstream, tmp_path: Path) -> Iterator[StartPair]:
    """Start two replicas (with this environment) and nginx in front of them; all stopped at the end."""
    binary = nginx_binary()
    started: list[tuple[tuple[Service, Service], Nginx]] = []

    def start(env: dict[str, str]) -> tuple[tuple[Service, Service], Nginx]:
        first, second = (start_service(replica_config(fake, n), env) for n in (1, 2))
        started.append(((first, second), start_nginx(binary, (first, second), tmp_path)))
        return started[-1]

    yield start
    for replicas, nginx in started:
        nginx.process.terminate()
        nginx.process.wait(10)
        for replica in replicas:
            replica.stop()


def open_chat(port: int, model: str) -> socket.socket:
    """Send a chat request on a raw connection and leave it waiting; closing the socket is the client leaving."""
    payload = json.dumps({"model": model, "messages": QUESTION}).encode()
    head = (
        f"POST /v1/chat/completions HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\nAuthorization: Bearer {TOKEN}\r\n"
        f"Content-Type: application/json\r\nContent-Length: {len(payload)}\r\n\r\n"
    )
    connection = socket.create_connection(("127.0.0.1", port), timeout=10)
    connection.sendall(head.encode() + payload)
    return connection


def process_of(service: Service) -> subprocess.Popen[bytes]:
    assert service.process is not None
    return service.process


def the_one_call(fake: FakeUpstream) -> int:
    """Wait for the single upstream call of the request just sent; the replica that made it."""
    (entry,) = fake.wait_for(lambda log: len(log) >= 1, timeout=15)
    return replica_of(entry["model"])


def ran_once(pending: Future[httpx.Response], fake: FakeUpstream, ran: int) -> httpx.Response:
    """The client's answer, once it has come, after checking that the panel ran only on replica `ran` (a second
    run would be on the wire before the answer: wait for whichever comes first)."""
    wait_until(lambda: pending.done() or len(fake.log()) > 1, timeout=CLIENT_TIMEOUT)
    calls = [e["model"] for e in fake.log()]
    assert calls == [f"hold-{ran + 1}"], f"the request was run again on the other replica: {calls}"
    return pending.result(timeout=5)


def test_an_answer_cut_off_by_a_shutdown_is_not_run_again(balanced: StartPair, fake: FakeUpstream) -> None:
    """The replica answering a request is stopped and its grace period ends: the client gets the 500
    `cut_off_by_shutdown`, and the other replica never runs the panel a second time."""
    fake.configure({"hold-1": {"ttft_ms": 60_000}, "hold-2": {"ttft_ms": 60_000}})
    replicas, nginx = balanced({"MOM_SHUTDOWN_GRACE_SECONDS": "1"})
    with ThreadPoolExecutor(1) as pool:
        pending = pool.submit(nginx.chat, "hold")
        ran = the_one_call(fake)
        process_of(replicas[ran]).send_signal(signal.SIGTERM)
        response = ran_once(pending, fake, ran)
    assert response.status_code == 500, response.text
    error = response.json()["error"]
    assert (error["type"], error["code"]) == ("server_error", "cut_off_by_shutdown")
    assert "paid" in error["message"]
    assert process_of(replicas[ran]).wait(15) == 0


def test_requests_refused_by_a_draining_replica_are_answered_by_the_other(
    balanced: StartPair, fake: FakeUpstream
) -> None:
    """While one replica drains (503 `shutting_down` for every new chat request, before any upstream call), nginx
    sends those requests, body and all, to the other replica: every client gets its answer."""
    fake.configure({"hold-1": {"hang": True}, "hold-2": {"hang": True}})
    replicas, nginx = balanced({})  # the default grace period: 20 s
    holder = open_chat(nginx.port, "hold")  # keeps its replica draining until it leaves
    try:
        draining = the_one_call(fake)
        other = 1 - draining
        process_of(replicas[draining]).send_signal(signal.SIGTERM)
        wait_until(lambda: httpx.get(f"{replicas[draining].url}/health/ready", timeout=5).status_code == 503)
        answers = [nginx.chat("mom") for _ in range(6)]
        for response in answers:
            assert response.status_code == 200, response.text
            assert response.json()["choices"][0]["message"]["content"] == f"Answer from judge-{other + 1}."
        members = [e["model"] for e in fake.log() if e["model"].startswith("member-")]
        assert members == [f"member-{other + 1}"] * len(answers)
        # round robin sent some of them to the draining replica first, which refused them
        assert "error=shutting_down" in replicas[draining].log(), replicas[draining].log()
        # other errors pass through as the replica sent them (only a 503 is intercepted)
        refused = httpx.post(f"{nginx.url}/v1/chat/completions", json={"model": "mom", "messages": QUESTION})
        assert refused.status_code == 401
        assert refused.json()["error"]["type"] == "authentication_error"
        assert refused.headers["www-authenticate"] == "Bearer"
    finally:
        holder.close()  # the held answer ends, and with it the drain
    assert process_of(replicas[draining]).wait(20) == 0


def test_a_request_whose_replica_dies_is_not_sent_again(balanced: StartPair, fake: FakeUpstream) -> None:
    """The replica running a request is killed (SIGKILL): the request may have run, and paid for, its panel, so the
    client gets nginx's 502, and the other replica does not run it again."""
    fake.configure({"hold-1": {"hang": True}, "hold-2": {"hang": True}})
    replicas, nginx = balanced({})
    with ThreadPoolExecutor(1) as pool:
        pending = pool.submit(nginx.chat, "hold")
        ran = the_one_call(fake)
        process_of(replicas[ran]).kill()
        response = ran_once(pending, fake, ran)
    assert response.status_code == 502, response.text  # nginx's own: the replica went away mid-request
    # new requests go to the replica still there: those that round robin tried on the dead one first were
    # refused a connection, so nothing of them was sent, and nginx sent them on
    for _ in range(3):
        answer = nginx.chat("mom")
        assert answer.status_code == 200, answer.text
        assert answer.json()["choices"][0]["message"]["content"] == f"Answer from judge-{2 - ran}."
    assert "Connection refused" in nginx.log(), nginx.log()
