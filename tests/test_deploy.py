"""The Docker deployment: Dockerfile, .dockerignore, docker-compose.yml and deploy/nginx.conf say what
docs/deployment.md promises, and the image's start command works as the image runs it.

There is no Docker engine in CI, so the image is not built. Instead the files are read as Docker reads them, and
the image's CMD runs outside a container the way the container runs it: the Dockerfile's ENV (its /opt/venv mapped
to this checkout's .venv, its WORKDIR to an empty temporary directory, so the demo config runs), as the image's
non-root uid, then health, a chat request and SIGTERM.
"""

from __future__ import annotations

import fnmatch
import json
import os
import re
import shlex
import shutil
import signal
import sqlite3
import stat
import subprocess
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import pytest
import uvicorn
import yaml

from mom_service.settings import Settings
from tests.conftest import ROOT, TOKEN, free_port

DOCKERFILE = ROOT / "Dockerfile"
DOCKERIGNORE = ROOT / ".dockerignore"
COMPOSE = ROOT / "docker-compose.yml"
NGINX_CONF = ROOT / "deploy" / "nginx.conf"
VENV = ROOT / ".venv"
IMAGE_VENV = "/opt/venv"
# PATH and LANG of the python:3.11-slim base image, under the Dockerfile's own ENV
BASE_IMAGE_ENV = {"PATH": "/usr/local/bin:/usr/local/sbin:/usr/sbin:/usr/bin:/sbin:/bin", "LANG": "C.UTF-8"}
REPLICAS = ("mom-replica-1", "mom-replica-2")
CAP_DAC_READ_SEARCH = 1 << 2

GRACE_S = float(Settings.model_fields["mom_shutdown_grace_seconds"].default)
MAX_BODY_BYTES = int(Settings.model_fields["mom_max_body_bytes"].default)


# ------------------------------------------------------------------------------------------ reading the files


@dataclass
class Stage:
    base: str
    name: str | None
    instructions: list[tuple[str, str]] = field(default_factory=list)

    def args(self, keyword: str) -> list[str]:
        return [args for kw, args in self.instructions if kw == keyword]

    def env(self) -> dict[str, str]:
        """The stage's ENV, `$VAR`/`${VAR}` expanded as Docker does (from earlier ENV, else the base image's)."""
        env: dict[str, str] = {}
        for args in self.args("ENV"):
            tokens = shlex.split(args)
            pairs = [t.split("=", 1) for t in tokens] if "=" in tokens[0] else [[tokens[0], " ".join(tokens[1:])]]
            for key, value in pairs:
                env[key] = re.sub(
                    r"\$\{?(\w+)\}?", lambda m: env.get(m.group(1), BASE_IMAGE_ENV.get(m.group(1), "")), value
                )
        return env


def dockerfile_stages(text: str) -> list[Stage]:
    """The Dockerfile's stages, each a list of (KEYWORD, arguments) with line continuations joined."""
    logical: list[str] = []
    current = ""
    for line in text.splitlines():
        if line.strip().startswith("#") or (not line.strip() and not current):
            continue
        if line.rstrip().endswith("\\"):
            current += line.rstrip()[:-1] + " "
            continue
        logical.append(current + line)
        current = ""
    stages: list[Stage] = []
    for line in logical:
        keyword, _, args = line.strip().partition(" ")
        keyword, args = keyword.upper(), " ".join(args.split())
        if keyword == "FROM":
            words = args.split()
            stages.append(Stage(words[0], words[2] if len(words) == 3 and words[1].upper() == "AS" else None))
        else:
            assert stages, f"{keyword} before the first FROM"
            stages[-1].instructions.append((keyword, args))
    return stages


def exec_form(args: str) -> list[str]:
    value = json.loads(args)
    assert isinstance(value, list) and all(isinstance(v, str) for v in value), f"not exec form: {args}"
    return value


@pytest.fixture(scope="module")
def stages() -> list[Stage]:
    return dockerfile_stages(DOCKERFILE.read_text())


@pytest.fixture(scope="module")
def final(stages: list[Stage]) -> Stage:
    return stages[-1]


def healthcheck_command(stage: Stage) -> list[str]:
    (args,) = stage.args("HEALTHCHECK")
    match = re.fullmatch(r"((?:--[a-z-]+=\S+\s+)*)CMD\s+(\[.*\])", args)
    assert match, f"HEALTHCHECK is not `[--options] CMD [exec form]`: {args}"
    return exec_form(match.group(2))


@pytest.fixture(scope="module")
def compose() -> dict[str, Any]:
    document: dict[str, Any] = yaml.safe_load(COMPOSE.read_text())  # merges the x-mom-service anchors
    return document


def seconds(duration: str) -> float:
    """A Compose duration such as `30s`, `1m30s`."""
    units = {"h": 3600, "m": 60, "s": 1, "ms": 0.001}
    parts = re.findall(r"(\d+(?:\.\d+)?)(ms|h|m|s)", duration)
    assert parts and "".join(n + u for n, u in parts) == duration, duration
    return sum(float(n) * units[u] for n, u in parts)


def python_health_url(command: list[str]) -> str:
    """The URL path a `python -c "...urlopen(...)"` healthcheck asks for."""
    assert command[:2] == ["python", "-c"], command
    code = command[2]
    assert "urllib.request.urlopen(" in code and "127.0.0.1" in code, code
    paths: list[str] = re.findall(r"['\"](/[\w/.-]*)['\"]", code)
    assert len(paths) == 1, code
    return paths[0]


def run_option(stage: Stage, command: str, option: str) -> int:
    """The number given to `option` of `command` in the stage's RUN instructions (such as useradd's --uid)."""
    (run,) = [r for r in stage.args("RUN") if re.search(rf"\b{command}\b", r)]
    match = re.search(rf"\b{command}\b[^&;]*\s{option}[ =](\d+)", run)
    assert match, f"no {command} {option} in RUN {run}"
    return int(match.group(1))


def dockerignore_patterns() -> list[str]:
    lines = (line.strip() for line in DOCKERIGNORE.read_text().splitlines())
    return [line for line in lines if line and not line.startswith("#")]


def ignored(path: str, patterns: list[str]) -> bool:
    """Whether .dockerignore keeps `path` (relative to the context) or one of its parents out of the context."""
    parts = Path(path).parts
    candidates = ["/".join(parts[: i + 1]) for i in range(len(parts))]
    result = False
    for pattern in patterns:
        negate = pattern.startswith("!")
        pattern = pattern.lstrip("!").rstrip("/")
        for candidate in candidates:
            names = [candidate, Path(candidate).name] if pattern.startswith("**/") else [candidate]
            if any(fnmatch.fnmatch(name, pattern.removeprefix("**/")) for name in names):
                result = not negate
    return result


# ------------------------------------------------------------------------------------------------- Dockerfile


def test_dockerfile_is_multi_stage_on_a_pinned_slim_python(stages: list[Stage]) -> None:
    assert len(stages) == 2
    builder, final = stages
    for stage in stages:
        assert stage.base == "python:3.11-slim"  # a tag, never latest
    assert builder.name == "builder"
    # the builder makes the virtualenv, installs the pinned requirements, then the package without dependencies
    runs = builder.args("RUN")
    assert any(f"venv {IMAGE_VENV}" in r for r in runs), runs
    assert any("pip install" in r and "-r requirements.txt" in r and "--no-cache-dir" in r for r in runs), runs
    assert any(r.endswith("pip install --no-cache-dir --no-deps .") for r in runs), runs
    # the final stage takes the virtualenv only, and installs nothing: no compilers, no pip cache, no apt
    assert f"--from=builder {IMAGE_VENV} {IMAGE_VENV}" in final.args("COPY")
    for run in final.args("RUN"):
        assert "pip " not in run and "apt" not in run, run


def test_dockerfile_runs_the_make_run_command_as_a_fixed_non_root_user(final: Stage) -> None:
    uid, gid = run_option(final, "useradd", "--uid"), run_option(final, "groupadd", "--gid")
    assert uid == gid == 10001
    assert re.search(r"\buseradd\b.*\smom$", next(r for r in final.args("RUN") if "useradd" in r))
    # numeric, so that Kubernetes' runAsNonRoot can verify it; set last, just before the CMD
    assert final.instructions[-2:][0] == ("USER", f"{uid}:{gid}") and final.instructions[-1][0] == "CMD"
    assert final.args("WORKDIR") == ["/app"]
    assert any("chown -R mom:mom /app" in r for r in final.args("RUN"))
    # CMD is exactly what `make run` runs
    (cmd,) = final.args("CMD")
    recipe = re.search(r"^run:.*\n\t(.+)$", (ROOT / "Makefile").read_text(), re.MULTILINE)
    assert recipe, "no `run` target in the Makefile"
    make_run = shlex.split(recipe.group(1))
    assert exec_form(cmd) == [Path(make_run[0]).name, *make_run[1:]] == ["mom-service", "serve"]


def test_dockerfile_environment_ports_volume_and_healthcheck(final: Stage) -> None:
    env = final.env()
    assert env["PATH"].startswith(f"{IMAGE_VENV}/bin:")
    assert env["HOST"] == "0.0.0.0" and env["PORT"] == "8000"
    assert env["PYTHONUNBUFFERED"] == "1"
    assert env["LITELLM_LOCAL_MODEL_COST_MAP"] == "True"
    # usage records in the volume; the config is ./config.yaml (mounted), never a MOM_CONFIG that may be missing
    assert env["DATABASE_URL"] == "sqlite+aiosqlite:////app/data/mom.db"
    assert final.args("VOLUME") == ['["/app/data"]']
    assert "MOM_CONFIG" not in env
    assert final.args("EXPOSE") == [env["PORT"]]
    # liveness on /health, with the image's own python (no curl in the slim image)
    command = healthcheck_command(final)
    assert python_health_url(command) == "/health"


def test_no_secret_reaches_an_image_layer(stages: list[Stage]) -> None:
    patterns = dockerignore_patterns()
    for required in (".env", ".env.*", ".venv/", ".git/", "tests/", "bench/", "data/", "*.db", "config.yaml"):
        assert required in patterns, f".dockerignore lacks {required}"
    for stage in stages:
        for keyword, args in stage.instructions:
            if keyword in ("ENV", "ARG"):
                assert not re.search(r"KEY|TOKEN|SECRET|PASSWORD", args, re.IGNORECASE), args
            if keyword in ("COPY", "ADD") and "--from=" not in args:
                *sources, _ = shlex.split(args)
                for source in sources:
                    assert source not in (".", "./", "*"), f"{keyword} {args}: copies the whole context"
                    assert not Path(source).name.startswith(".env"), f"{keyword} {args}"
                    assert source != "config.yaml", f"{keyword} {args}: the config is mounted, not baked in"
                    # and what is copied exists and is not kept out of the build context
                    assert (ROOT / source).exists(), f"{keyword} {args}: {source} does not exist"
                    assert not ignored(source, patterns), f"{keyword} {args}: .dockerignore excludes {source}"


def test_hadolint_passes() -> None:
    binary = VENV / "bin" / "hadolint"
    if not binary.exists():
        message = f"hadolint is not installed at {binary} (make install-dev installs it, see requirements-dev.txt)"
        if os.environ.get("CI") == "true":
            pytest.fail(message)
        pytest.skip(message)
    result = subprocess.run(
        [str(binary), "--no-color", "Dockerfile"], cwd=ROOT, capture_output=True, text=True, timeout=60
    )
    assert result.returncode == 0 and not result.stdout.strip(), result.stdout + result.stderr


# --------------------------------------------------------------------------------------------- docker-compose


def test_compose_single_service(compose: dict[str, Any], final: Stage) -> None:
    services = compose["services"]
    service = services["mom-service"]
    assert "profiles" not in service  # `docker compose up` starts it
    assert service["image"] == "mom-service:latest" and service["build"] == "."
    assert service["ports"] == ["8000:8000"]
    assert service["env_file"] == [{"path": ".env", "required": False}]  # works without a .env
    config_mount, data_mount = service["volumes"]
    assert config_mount == {
        "type": "bind",
        "source": "./config.yaml",
        "target": "/app/config.yaml",  # ./config.yaml in the image's WORKDIR, the default config path
        "read_only": True,
        "bind": {"create_host_path": False},
    }
    assert config_mount["target"] == f"{final.args('WORKDIR')[0]}/config.yaml"
    assert data_mount == "mom-data:/app/data"
    assert "mom-data" in compose["volumes"]
    assert service["restart"] == "unless-stopped"
    assert service["init"] is True
    # Docker waits longer than the service drains before it sends SIGKILL
    assert seconds(service["stop_grace_period"]) == 30 > GRACE_S
    healthcheck = service["healthcheck"]
    assert healthcheck["test"][0] == "CMD"
    assert healthcheck["test"][1:] == healthcheck_command(final)  # the image's own healthcheck
    assert python_health_url(healthcheck["test"][1:]) == "/health"
    for key in ("interval", "timeout", "start_period"):
        assert seconds(healthcheck[key]) > 0
    assert healthcheck["retries"] >= 1


def test_compose_replicas_profile(compose: dict[str, Any]) -> None:
    services = compose["services"]
    assert set(services) == {"mom-service", "postgres", "redis", *REPLICAS, "lb"}
    for name in ("postgres", "redis", *REPLICAS, "lb"):
        assert services[name]["profiles"] == ["replicas"], name
        assert services[name]["restart"] == "unless-stopped", name
        assert "healthcheck" in services[name], name
    assert services["postgres"]["image"] == "postgres:16-alpine"
    assert "pg_isready" in " ".join(services["postgres"]["healthcheck"]["test"])
    assert "pg-data" in compose["volumes"]
    assert services["redis"]["image"] == "redis:7-alpine"
    assert services["redis"]["healthcheck"]["test"] == ["CMD", "redis-cli", "ping"]
    single = services["mom-service"]
    for name in REPLICAS:
        replica = services[name]
        for key in ("image", "build", "env_file", "healthcheck", "stop_grace_period", "init"):
            assert replica[key] == single[key], (name, key)  # the same service, from the x-mom-service anchor
        assert "ports" not in replica  # reached through the load balancer only
        assert replica["volumes"] == single["volumes"][:1]  # the config; records go to PostgreSQL
        database_url = replica["environment"]["DATABASE_URL"]
        assert re.fullmatch(r"postgresql\+asyncpg://mom:\$\{POSTGRES_PASSWORD:-mom\}@postgres:5432/mom", database_url)
        assert replica["environment"]["REDIS_URL"] == "redis://redis:6379/0"
        assert replica["depends_on"] == {
            "postgres": {"condition": "service_healthy"},
            "redis": {"condition": "service_healthy"},
        }
    lb = services["lb"]
    assert lb["image"] == "nginx:1.27-alpine"
    assert lb["ports"] == ["8080:8080"]
    assert lb["volumes"] == ["./deploy/nginx.conf:/etc/nginx/nginx.conf:ro"]
    assert lb["depends_on"] == {name: {"condition": "service_healthy"} for name in REPLICAS}


def test_load_balancer_config(compose: dict[str, Any], final: Stage) -> None:
    conf = NGINX_CONF.read_text()
    directives = re.sub(r"#.*", "", conf)
    (upstream,) = re.findall(r"upstream\s+mom_replicas\s*\{([^}]*)\}", directives)
    assert re.search(r"zone\s+\w+\s+\d+k;", upstream)  # one round robin and failure count for all workers
    assert re.search(r"^user\s+nginx;", directives, re.MULTILINE)  # the image's worker user owns its temp dirs
    servers = re.findall(r"server\s+([\w.-]+):(\d+)([^;]*);", upstream)
    port = final.args("EXPOSE")[0]
    assert [(host, p) for host, p, _ in servers] == [(name, port) for name in REPLICAS]
    for _, _, options in servers:
        assert re.search(r"max_fails=\d+", options) and re.search(r"fail_timeout=\d+s", options), options
    published = compose["services"]["lb"]["ports"][0].split(":")[1]
    assert re.search(rf"listen\s+{published};", directives)
    assert re.search(r"proxy_buffering\s+off;", directives)  # SSE chunks go out as they come
    assert re.search(r"proxy_read_timeout\s+300s;", directives)
    (body,) = re.findall(r"client_max_body_size\s+(\d+)m;", directives)
    assert int(body) * 1024 * 1024 >= MAX_BODY_BYTES  # the service's own limit answers 413, in OpenAI's shape
    # A chat POST goes to the other replica only when the first spent nothing on it (see test_load_balancer.py):
    # never re-sent once it reached a replica (no `non_idempotent` with `error` or `timeout`), a 503 refusal handed
    # to a named location that retries 503s only.
    locations = nginx_locations(directives)
    main = locations["/"]
    assert main["proxy_next_upstream"] == ["error"]
    assert main["proxy_intercept_errors"] == ["on"]
    ((status, equals, named),) = (e.split() for e in main["error_page"])
    assert (status, equals) == ("503", "=") and named.startswith("@")
    other = locations[named]
    assert other["proxy_pass"] == main["proxy_pass"] == ["http://mom_replicas"]
    assert other["proxy_next_upstream"] == ["http_503 non_idempotent"]
    assert "proxy_intercept_errors" not in other  # the last 503 reaches the client as the replica sent it
    for streaming in (main, other):
        assert streaming["proxy_buffering"] == ["off"]
        assert streaming["proxy_read_timeout"] == ["300s"]
    assert locations["/health"]["proxy_next_upstream"] == ["error timeout"]  # GETs
    retry = re.findall(r"proxy_next_upstream\s+([^;]*);", directives)
    assert all("error" not in r.split() and "timeout" not in r.split() for r in retry if "non_idempotent" in r)
    # idle upstream connections close at nginx first: a POST on one the replica just closed would not be re-sent
    (keepalive_timeout,) = re.findall(r"keepalive_timeout\s+(\d+)s;", upstream)
    assert int(keepalive_timeout) < uvicorn.Config(app=None).timeout_keep_alive
    assert re.search(r"location\s+=\s+/lb-health", directives)
    assert "/lb-health" in " ".join(compose["services"]["lb"]["healthcheck"]["test"])


def nginx_locations(directives: str) -> dict[str, dict[str, list[str]]]:
    """Each `location` block of an nginx config (comments removed), by its name or path: directive -> arguments."""
    locations: dict[str, dict[str, list[str]]] = {}
    for spec, body in re.findall(r"location\s+([^{]+?)\s*\{([^}]*)\}", directives):
        parsed: dict[str, list[str]] = {}
        for name, arguments in re.findall(r"(\w+)\s+([^;]*);", body):
            parsed.setdefault(name, []).append(" ".join(arguments.split()))
        locations[spec.split()[-1]] = parsed
    return locations


def test_env_example_has_no_secrets() -> None:
    values = {}
    for line in (ROOT / ".env.example").read_text().splitlines():
        if line and not line.startswith("#"):
            key, _, value = line.partition("=")
            values[key] = value
    assert values == {"API_TOKEN": ""}  # empty: the service refuses with 503 until a real token is set


# ------------------------------------------------------------------------------------- the image's start command


@dataclass
class ImageUser:
    """How to start a process as the image's USER here: argv prefix and Popen arguments, and what it is."""

    prefix: list[str]
    popen: dict[str, Any]
    uid: int
    gid: int
    note: str


def _blocked_for_others(paths: list[Path]) -> list[str]:
    """Which of these paths, or the directories above them, a uid that owns none of them cannot reach and use."""
    problems: list[str] = []
    for path in paths:
        for step in [*reversed(path.parents), path]:
            mode = os.stat(step).st_mode
            needed = 0o005 if stat.S_ISDIR(mode) or step == path else stat.S_IXOTH
            if mode & needed != needed:
                problem = f"{step} (mode {stat.filemode(mode)})"
                if problem not in problems:
                    problems.append(problem)
    return problems


def _unreadable_tree(top: Path) -> list[str]:
    problems = []
    for directory, dirnames, filenames in os.walk(top):
        for name in dirnames:
            mode = os.lstat(os.path.join(directory, name)).st_mode
            if stat.S_ISDIR(mode) and (mode & 0o005) != 0o005:
                problems.append(os.path.join(directory, name))
        for name in filenames:
            mode = os.lstat(os.path.join(directory, name)).st_mode
            if stat.S_ISREG(mode) and not mode & stat.S_IROTH:
                problems.append(os.path.join(directory, name))
    return problems


@pytest.fixture(scope="module")
def image_user(final: Stage) -> ImageUser:
    """The image's USER, or as close as this machine allows (see the notes)."""
    uid, gid = run_option(final, "useradd", "--uid"), run_option(final, "groupadd", "--gid")
    if os.geteuid() != 0:
        # Already unprivileged: what matters (no root) holds, only the uid differs.
        return ImageUser([], {}, os.geteuid(), os.getegid(), f"the current non-root user (uid {os.geteuid()})")
    # The virtualenv's own files, as pip installed them, must be readable by anyone, as they are in the image.
    unreadable = _unreadable_tree(VENV) + _unreadable_tree(ROOT / "mom_service")
    if unreadable:
        pytest.skip(f"{len(unreadable)} files of the virtualenv are not readable by uid {uid}: {unreadable[:5]}")
    interpreter = (VENV / "bin" / "python").resolve()
    blocked = _blocked_for_others([VENV, ROOT / "mom_service", interpreter])
    if not blocked:
        popen = {"user": uid, "group": gid, "extra_groups": []}
        return ImageUser([], popen, uid, gid, f"uid {uid}, no capabilities")
    # The interpreter behind .venv is somewhere uid 10001 may not go (such as a pyenv under /root, mode 0700),
    # which the image's /opt/venv is not. Give the process the right to read and search (never to write) so that
    # it can load Python; everything else is as in the image.
    setpriv = shutil.which("setpriv")
    if setpriv is None:
        pytest.skip(f"uid {uid} cannot reach {interpreter}: {blocked}, and setpriv is not installed")
    prefix = [
        setpriv,
        f"--reuid={uid}",
        f"--regid={gid}",
        "--clear-groups",
        "--inh-caps=-all,+dac_read_search",
        "--ambient-caps=+dac_read_search",
        "--bounding-set=-all,+dac_read_search",
        "--",
    ]
    return ImageUser(prefix, {}, uid, gid, f"uid {uid}, CAP_DAC_READ_SEARCH only (to reach {blocked[0]})")


@pytest.fixture
def app_dir(image_user: ImageUser) -> Iterator[Path]:
    """An empty directory standing for the image's WORKDIR (no config.yaml: the demo runs), owned by its user."""
    user = image_user
    directory = Path(tempfile.mkdtemp(prefix="mom-app-"))  # not under pytest's tmp_path: that is 0700 root
    os.chown(directory, user.uid, user.gid)
    yield directory
    shutil.rmtree(directory, ignore_errors=True)


def container_env(final: Stage, app: Path, port: int) -> dict[str, str]:
    """The image's environment, its paths mapped here: /opt/venv to .venv, the WORKDIR to `app`."""
    (workdir,) = final.args("WORKDIR")

    def here(value: str) -> str:
        value = re.sub(re.escape(IMAGE_VENV) + r"(?=/|:|$)", str(VENV), value)
        return re.sub(re.escape(workdir) + r"(?=/|:|$)", str(app), value)

    env = dict(BASE_IMAGE_ENV) | final.env()
    env = {key: here(value) for key, value in env.items()}
    env["HOME"] = str(app)  # the user's home is the WORKDIR (useradd --home-dir /app)
    env.update({"HOST": "127.0.0.1", "PORT": str(port), "API_TOKEN": TOKEN})  # loopback only, a free port
    return env


def _status(pid: int) -> dict[str, str]:
    lines = Path(f"/proc/{pid}/status").read_text().splitlines()
    return {key: value.strip() for key, _, value in (line.partition(":") for line in lines)}


def test_image_command_serves_the_demo_as_the_image_user_and_stops_cleanly(
    final: Stage, image_user: ImageUser, app_dir: Path
) -> None:
    user = image_user
    port = free_port()
    env = container_env(final, app_dir, port)
    # the exact CMD, found on the image's PATH: the virtualenv's console script
    argv = exec_form(final.args("CMD")[0])
    executable = shutil.which(argv[0], path=env["PATH"])
    assert executable == str(VENV / "bin" / "mom-service")
    database = Path(env["DATABASE_URL"].removeprefix("sqlite+aiosqlite:///"))
    assert database == app_dir / "data" / "mom.db"

    log_path = app_dir / "service.log"  # the parent's file: the service does not write it itself

    def log_text() -> str:
        return f"[running as {user.note}]\n{log_path.read_text(errors='replace')}"

    with log_path.open("wb") as log:
        process = subprocess.Popen(
            [*user.prefix, executable, *argv[1:]],
            cwd=app_dir,
            env=env,
            stdout=log,
            stderr=subprocess.STDOUT,
            **user.popen,
        )
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 60
        while True:
            assert process.poll() is None, f"exited with {process.returncode}:\n{log_text()}"
            assert time.monotonic() < deadline, f"no /health in 60 s:\n{log_text()}"
            try:
                if httpx.get(f"{url}/health", timeout=1).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            time.sleep(0.2)

        status = _status(process.pid)
        assert status["Uid"].split() == [str(user.uid)] * 4 and status["Gid"].split() == [str(user.gid)] * 4
        if user.prefix:
            assert int(status["CapEff"], 16) == CAP_DAC_READ_SEARCH, status["CapEff"]
        elif user.popen:
            assert int(status["CapEff"], 16) == 0 and status["Groups"] == ""
        # no config mounted: the demo runs, as with `make run`
        assert "DEMO config" in log_path.read_text().splitlines()[0], log_text()

        assert httpx.get(f"{url}/health/ready", timeout=10).status_code == 200, log_text()
        response = httpx.post(
            f"{url}/v1/chat/completions",
            headers={"Authorization": f"Bearer {TOKEN}"},
            json={"model": "mom", "messages": [{"role": "user", "content": "hello"}]},
            timeout=30,
        )
        assert response.status_code == 200, response.text
        assert "demo synthesis" in response.json()["choices"][0]["message"]["content"]

        # the image's HEALTHCHECK, run as its user with its environment, sees the service alive
        health = healthcheck_command(final)
        health_argv = [str(shutil.which(health[0], path=env["PATH"])), *health[1:]]
        assert health_argv[0] == str(VENV / "bin" / "python")
        check = subprocess.run([*user.prefix, *health_argv], env=env, capture_output=True, timeout=30, **user.popen)
        assert check.returncode == 0, check.stderr

        process.send_signal(signal.SIGTERM)  # `docker stop`
        assert process.wait(timeout=GRACE_S + 10) == 0, log_text()
    finally:
        if process.poll() is None:
            process.kill()
            process.wait(10)

    output = log_text()
    for problem in ("Traceback", "Permission denied", "Read-only file system"):
        assert problem not in output, output
    # the usage records are in the volume's place, written by the image's user, none lost on the way out
    assert database.stat().st_uid == user.uid
    with sqlite3.connect(database) as db:
        assert db.execute("SELECT count(*) FROM mom_requests").fetchone() == (1,)
    # and the healthcheck notices when the service is gone
    check = subprocess.run([*user.prefix, *health_argv], env=env, capture_output=True, timeout=30, **user.popen)
    assert check.returncode != 0
