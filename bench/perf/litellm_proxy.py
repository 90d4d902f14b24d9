"""LiteLLM's own proxy server as a benchmark target, in a virtual environment of its own.

`ensure_proxy_venv()` builds `bench/.cache/litellm-proxy-venv` once: `litellm[proxy]` at the version pinned in
requirements.txt. If the index lacks companions that extra pins (litellm 1.110.2 pins litellm-proxy,
litellm-proxy-extras and litellm-enterprise at versions no index here serves), it installs the pinned litellm, whose
wheel holds the proxy, plus every other requirement of the extra; `install_note()` says which were left out (they
serve Prisma migrations and licensed features, unused without a database or licence).

`start_proxy()` runs `litellm --config` over the fake upstream, one `openai/<name>` model per name, pinned to one
core. Settings, from LiteLLM's "Production Best Practices" (docs.litellm.ai/docs/proxy/prod) and "Server Tuning"
(docs.litellm.ai/docs/proxy/server_tuning) pages, keeping what applies to one instance without a database:
- its recommended config: `general_settings.disable_spend_logs: true` and `disable_error_logs: true` (nothing is
  written without a DB anyway), `litellm_settings.request_timeout: 600`, `set_verbose: false`, `json_logs: true`;
- `LITELLM_LOG=ERROR` ("turn off FastAPI's default info logs"), no `--detailed_debug`;
- one uvicorn worker (`--num_workers 1`: "one Uvicorn worker per pod, scale horizontally"), on uvloop, which the
  proxy asks uvicorn for and the extra installs;
- `LITELLM_MODE=PRODUCTION` (no `.env` loading), `LITELLM_LOCAL_MODEL_COST_MAP=True` (no cost-map fetch at start),
  `LITELLM_TELEMETRY_DISABLED=true`; no DATABASE_URL, Redis or callbacks: any LITELLM_*/DATABASE_*/REDIS_* variable
  of the caller's environment is dropped;
- master key: the page's first item, and the service authenticates every request too, so pass
  `master_key=MASTER_KEY` and send `Authorization: Bearer MASTER_KEY` for the like-for-like run. Without one (the
  default) the proxy refuses to start unless `general_settings.dangerously_permit_weak_or_unset_master_key: true`
  ("local development only"), which is then set: no auth at all.
Not applied: `alerting`, `proxy_batch_write_at`, `database_connection_pool_limit`, `allow_requests_on_db_unavailable`
(database or Slack only), Redis, `drop_params` (not a production recommendation; the bench sends standard params).
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
import tempfile
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parents[2]
VENV = ROOT / "bench" / ".cache" / "litellm-proxy-venv"
MARKER = VENV / ".installed"
INSTALL_TIMEOUT_S = 1200
MASTER_KEY = "sk-bench-" + "5f0c2d1e9a7b4c38" * 2  # any non-default sk- key; the proxy refuses "sk-1234"


def pinned_litellm() -> str:
    """The litellm version pinned in requirements.txt (`litellm==X`)."""
    text = (ROOT / "requirements.txt").read_text()
    match = re.search(r"^litellm==([^\s#;]+)", text, re.MULTILINE)
    if match is None:
        raise RuntimeError("requirements.txt pins no litellm==<version>")
    return match.group(1)


def _run(args: list[str]) -> str | None:
    """Run an install step; None on success, else the last lines of its output."""
    try:
        done = subprocess.run(args, capture_output=True, text=True, check=False, timeout=INSTALL_TIMEOUT_S)
    except (OSError, subprocess.TimeoutExpired) as exc:
        return f"`{Path(args[0]).name}`: {exc}"
    if done.returncode == 0:
        return None
    lines = [line for line in (done.stdout + done.stderr).splitlines() if not line.startswith("WARNING: Location")]
    return f"`{' '.join(Path(a).name for a in args[:5])}` exited {done.returncode}: " + " | ".join(lines[-6:])


# Prints litellm's `proxy` extra as plain requirements, run by the proxy venv's python once litellm is installed.
_PROXY_EXTRA = """
import importlib.metadata as m
from pip._vendor.packaging.requirements import Requirement
for text in m.requires("litellm") or []:
    req = Requirement(text)
    if req.marker and req.marker.evaluate({"extra": "proxy"}) and not req.marker.evaluate({"extra": ""}):
        print(req.name + (f"[{','.join(sorted(req.extras))}]" if req.extras else "") + str(req.specifier))
"""
_MISSING = re.compile(r"No matching distribution found for ([A-Za-z0-9._-]+)")


def _install_without_unpublished(python: Path, version: str) -> tuple[str | None, list[str]]:
    """Fallback: litellm==version plus its `proxy` extra, less the companions that no index serves.

    The extra pins lockstep companions (litellm-proxy, litellm-proxy-extras, litellm-enterprise) at versions that
    may not be on the index; the proxy code itself ships inside the litellm wheel, those are only needed for
    Prisma/DB and enterprise features, which a no-DB, no-licence proxy doesn't use. Returns (error, left out).
    """
    dropped: list[str] = []
    if error := _run([str(python), "-m", "pip", "install", "--quiet", f"litellm=={version}"]):
        return error, dropped
    listed = subprocess.run([str(python), "-c", _PROXY_EXTRA], capture_output=True, text=True, check=False)
    wanted = listed.stdout.split()
    for _ in range(6):
        error = _run([str(python), "-m", "pip", "install", "--quiet", f"litellm=={version}", *wanted])
        missing = _MISSING.search(error or "")
        if missing is None:
            break
        name = missing.group(1).lower()
        kept = [w for w in wanted if not w.lower().startswith(name + "=")]
        if len(kept) == len(wanted):
            break
        wanted = kept
        dropped.append(name)
    return error, dropped


def ensure_proxy_venv() -> Path | str:
    """The proxy venv's python, installing it first unless complete; a short reason if it cannot be installed.

    Installs `litellm[proxy]==<pinned>`; if pip cannot resolve that (an unpublished companion package), installs
    the pinned litellm and the extra's other requirements instead, and says so in `install_note()`.
    """
    python = VENV / "bin" / "python"
    try:
        version = pinned_litellm()
    except (OSError, RuntimeError) as exc:
        return str(exc)
    spec = f"litellm[proxy]=={version}"
    if MARKER.exists() and MARKER.read_text().splitlines()[:1] == [spec] and python.exists():
        return python
    MARKER.unlink(missing_ok=True)
    if error := _run([sys.executable, "-m", "venv", "--clear", str(VENV)]):
        return error
    dropped: list[str] = []
    if (error := _run([str(python), "-m", "pip", "install", "--quiet", spec])) and _MISSING.search(error):
        error, dropped = _install_without_unpublished(python, version)
    if error:
        return error
    # uvicorn runs on uvloop when importable (the proxy asks for it); the extra normally brings it.
    if _run([str(python), "-c", "import uvloop"]) and (
        error := _run([str(python), "-m", "pip", "install", "-q", "uvloop"])
    ):
        return error
    if error := _run([str(python), "-c", "import litellm.proxy.proxy_server"]):
        return error
    note = f"without unpublished {', '.join(dropped)}" if dropped else "as published"
    try:
        MARKER.write_text(f"{spec}\n{note}\n")
    except OSError as exc:
        return f"cannot write {MARKER}: {exc}"
    return python


def install_note() -> str | None:
    """How the installed venv differs from `litellm[proxy]==<pinned>` (None if it is exactly that)."""
    try:
        lines = MARKER.read_text().splitlines()
    except OSError:
        return None
    return lines[1] if len(lines) > 1 and lines[1] != "as published" else None


class ProxyProcess(subprocess.Popen[bytes]):
    """The proxy's process; `log_path` is its stdout+stderr, `tail()` the end of it."""

    log_path: Path
    config_path: Path

    def tail(self, lines: int = 30) -> str:
        try:
            return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-lines:])
        except OSError as exc:
            return f"(no log: {exc})"


def proxy_config(upstream_base: str, models: list[str], master_key: str | None = None) -> dict[str, object]:
    general: dict[str, object] = {"disable_spend_logs": True, "disable_error_logs": True}
    if master_key:
        general["master_key"] = master_key
    else:
        general["dangerously_permit_weak_or_unset_master_key"] = True
    return {
        "model_list": [
            {
                "model_name": name,
                "litellm_params": {"model": f"openai/{name}", "api_base": upstream_base, "api_key": "bench"},
            }
            for name in models
        ],
        "litellm_settings": {"request_timeout": 600, "set_verbose": False, "json_logs": True},
        "general_settings": general,
    }


def start_proxy(
    python: Path, port: int, upstream_base: str, models: list[str], cpu: int, master_key: str | None = None
) -> ProxyProcess:
    """Start `litellm --config ...` on 127.0.0.1:port, pinned to core `cpu`. The caller polls /health/liveliness."""
    work = Path(tempfile.mkdtemp(prefix="litellm-proxy-"))
    config_path = work / "config.yaml"
    config_path.write_text(yaml.safe_dump(proxy_config(upstream_base, models, master_key), sort_keys=False))
    log_path = work / "proxy.log"
    env = {k: v for k, v in os.environ.items() if not k.startswith(("LITELLM_", "DATABASE_", "REDIS_", "DIRECT_URL"))}
    env.update(
        LITELLM_LOG="ERROR",
        LITELLM_MODE="PRODUCTION",
        LITELLM_LOCAL_MODEL_COST_MAP="True",
        LITELLM_TELEMETRY_DISABLED="true",
        PYTHONUNBUFFERED="1",
    )
    litellm = python.parent / "litellm"
    args = [str(litellm), "--config", str(config_path), "--host", "127.0.0.1", "--port", str(port)]
    args += ["--num_workers", "1"]
    with log_path.open("wb") as log:
        proc = ProxyProcess(
            args,
            stdin=subprocess.DEVNULL,
            stdout=log,
            stderr=subprocess.STDOUT,
            env=env,
            cwd=work,
            preexec_fn=lambda: os.sched_setaffinity(0, {cpu}),
        )
    proc.log_path = log_path
    proc.config_path = config_path
    return proc
