"""Fixtures: free ports, the fake upstream process, live service processes started as users start them."""

from __future__ import annotations

import importlib.util
import os
import socket
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import orjson
import pytest
import redis
import tiktoken
import yaml

from tests.fake_upstream import FakeUpstream

ROOT = Path(__file__).resolve().parent.parent
TOKEN = "test-token-123456"
FAKE_KEY = "sk-fake-upstream-key-abcdef123456"


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


class Service:
    """The service as a user runs it (`mom-service serve`), in its own process and working directory."""

    def __init__(
        self, workdir: Path, config: dict[str, Any] | None, env: dict[str, str], *, patch: str | None = None
    ) -> None:
        self.workdir = workdir
        self.patch = patch  # a stand-in installed first (tests/patched_service.py), None for the service as shipped
        self.port = free_port()
        self.log_path = workdir / "service.log"
        self.env = env
        if config is not None:
            (workdir / "config.yaml").write_text(yaml.safe_dump(config))
        self.process: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    @property
    def base_url(self) -> str:
        return f"{self.url}/v1"

    def start(self, timeout: float = 30.0) -> None:
        env = {k: v for k, v in os.environ.items() if not k.startswith(("API_TOKEN", "MOM_", "LITELLM_", "OPENAI_"))}
        env.update({"PORT": str(self.port), "HOST": "127.0.0.1", "PYTHONUNBUFFERED": "1"})
        if self.patch is not None:  # the launcher lives in the tests package
            env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(ROOT), env.get("PYTHONPATH")]))
        env.update(self.env)
        with self.log_path.open("wb") as log:
            launcher = ["-m", "mom_service.cli"] if self.patch is None else ["-m", "tests.patched_service", self.patch]
            self.process = subprocess.Popen(
                [sys.executable, *launcher, "serve"],
                cwd=self.workdir,
                env=env,
                stdout=log,
                stderr=subprocess.STDOUT,
            )
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise RuntimeError(f"service exited with {self.process.returncode}:\n{self.log()}")
            try:
                if httpx.get(f"{self.url}/health", timeout=1).status_code == 200:
                    return
            except httpx.HTTPError:
                pass
            time.sleep(0.1)
        self.stop()
        raise RuntimeError(f"service did not start in {timeout} s:\n{self.log()}")

    def stop(self) -> None:
        if self.process is not None and self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(10)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait(5)

    def log(self) -> str:
        return self.log_path.read_text(errors="replace") if self.log_path.exists() else ""

    def headers(self, token: str = TOKEN) -> dict[str, str]:
        return {"Authorization": f"Bearer {token}"}

    def chat(self, model: str = "mom", messages: list[dict[str, Any]] | None = None, **extra: Any) -> httpx.Response:
        """POST a chat completion with the test token (a short question unless `messages` is given)."""
        return httpx.post(
            f"{self.base_url}/chat/completions",
            headers=self.headers(),
            json={"model": model, "messages": messages or [{"role": "user", "content": "A question."}], **extra},
            timeout=30,
        )

    def sse(self, body: dict[str, Any]) -> Iterator[tuple[float, str]]:
        """POST a streaming chat request and yield (arrival time, `data:` payload) as each SSE frame arrives.

        Stopping the iteration closes the connection, as a client leaving mid-stream does.
        """
        with (
            httpx.Client(timeout=30) as client,
            client.stream("POST", f"{self.base_url}/chat/completions", headers=self.headers(), json=body) as response,
        ):
            assert response.status_code == 200, response.read()
            assert response.headers["content-type"].startswith("text/event-stream")
            for payload in sse_payloads(response):
                yield time.monotonic(), payload


def sse_frames(response: httpx.Response) -> Iterator[str]:
    """Each SSE frame of a streamed response (its lines, without the blank line that ends it), as it arrives."""
    buffer = ""
    for text in response.iter_text():
        buffer += text
        while "\n\n" in buffer:
            frame, buffer = buffer.split("\n\n", 1)
            yield frame


def sse_payloads(response: httpx.Response) -> Iterator[str]:
    """The `data:` payload of each SSE frame of a streamed response, as each frame arrives."""
    for frame in sse_frames(response):
        assert frame.startswith("data: "), frame
        yield frame[len("data: ") :]


def answer_of(response: httpx.Response, stream: bool) -> tuple[dict[str, Any], str]:
    """(the body with the `mom` breakdown, the answer's content) of a chat response read whole: a
    `chat.completion`, or for a stream (asked with include_usage) its last chunk and the joined content deltas."""
    if not stream:
        body: dict[str, Any] = response.json()
        return body, body["choices"][0]["message"]["content"]
    chunks = [orjson.loads(f.removeprefix("data: ")) for f in response.text.split("\n\n")[:-2] if f]
    content = "".join(c["choices"][0]["delta"].get("content") or "" for c in chunks if c["choices"])
    return chunks[-1], content


REDIS_HOST, REDIS_PORT = "127.0.0.1", 6379


def empty_redis_db(db: int) -> Iterator[redis.Redis]:
    """For a fixture: a client of the machine's Redis db index `db`, emptied before and after; the test is skipped
    where no Redis answers, and fails when CI=true."""
    client = redis.Redis(host=REDIS_HOST, port=REDIS_PORT, db=db, socket_timeout=2, socket_connect_timeout=2)
    try:
        client.ping()
    except redis.RedisError as exc:
        client.close()
        reason = f"no Redis answers at {REDIS_HOST}:{REDIS_PORT} ({type(exc).__name__}: {exc})"
        if os.environ.get("CI") == "true":
            pytest.fail(f"CI=true requires Redis: {reason}")
        pytest.skip(reason)
    client.flushdb()
    try:
        yield client
    finally:
        client.flushdb()
        client.close()


def cl100k() -> tiktoken.Encoding:
    """OpenAI's cl100k_base tokenizer (LiteLLM's for a model it does not know), read from the copy LiteLLM ships:
    for counting tokens in a test independently of the service's own counting code, without a download."""
    spec = importlib.util.find_spec("litellm")
    assert spec is not None and spec.origin is not None
    os.environ["TIKTOKEN_CACHE_DIR"] = str(Path(spec.origin).parent / "litellm_core_utils" / "tokenizers")
    return tiktoken.get_encoding("cl100k_base")


def wait_until(check: Callable[[], bool], timeout: float = 10.0) -> None:
    """Poll `check` until it holds; fail after `timeout` seconds."""
    deadline = time.monotonic() + timeout
    while not check():
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.05)


def llm(name: str, fake: FakeUpstream, **extra: Any) -> dict[str, Any]:
    """An LLM definition served by the fake upstream under the model name `name`."""
    return {"name": name, "model": f"openai/{name}", "api_base": fake.base_url, "api_key_env": "FAKE_KEY"} | extra


# USD per million tokens, as config.yaml gives them
PRICES: dict[str, dict[str, str]] = {
    "alpha": {
        "input_per_million": "1.25",
        "output_per_million": "2.5",
        "reasoning_per_million": "7.5",
        "cached_input_per_million": "0.3",
    },
    "beta": {"input_per_million": "3", "output_per_million": "15"},
    "gamma": {"input_per_million": "0.15", "output_per_million": "0.6"},
    "judge": {"input_per_million": "5", "output_per_million": "20"},
}


def panel_config(fake: FakeUpstream) -> dict[str, Any]:
    """The standard test panel: three members and a judge, in several MoM models."""
    members = ["alpha", "beta", "gamma"]
    return {
        "llm_definitions": [
            # who sees images: alpha says so, beta says not, gamma leaves it to LiteLLM (which does not know it)
            llm("alpha", fake, pricing=PRICES["alpha"], multimodal=True),
            llm("beta", fake, pricing=PRICES["beta"], multimodal=False),
            llm("gamma", fake, pricing=PRICES["gamma"]),
            llm("judge", fake, pricing=PRICES["judge"], multimodal=False),
            llm("seer", fake, pricing=PRICES["judge"], multimodal=True),
            llm("sloth", fake, timeout=1),  # no pricing, not in LiteLLM's cost map: its cost is unknown
            # a model name in LiteLLM's OpenAI catalog: LiteLLM forwards `user` only to those
            llm("catalog", fake, model="openai/gpt-4o-mini"),
        ],
        "prompt_definitions": [{"name": "synth", "content": "SYNTH-PROMPT: combine the panel's answers."}],
        "models": [
            {"name": "mom", "llms_to_query": members, "concluding_llm": "judge", "concluding_prompt": "synth"},
            {
                "name": "mom-think",
                "llms_to_query": members,
                "concluding_llm": "judge",
                "concluding_prompt": "synth",
                "include_thinking_context": True,
            },
            {
                "name": "mom-reason",
                "llms_to_query": members,
                "concluding_llm": "judge",
                "concluding_prompt": "synth",
                "include_thinking_context": True,
                "thinking_format": "reasoning_content",
            },
            {
                "name": "mom-slow-member",
                "llms_to_query": ["alpha", "sloth"],
                "concluding_llm": "judge",
                "concluding_prompt": "synth",
            },
            {"name": "mom-catalog", "llms_to_query": ["catalog"], "concluding_llm": "judge"},
            {"name": "mom-vision-judge", "llms_to_query": members, "concluding_llm": "seer"},
            {"name": "mom-blind", "llms_to_query": ["beta", "gamma"], "concluding_llm": "judge"},
        ],
    }


@pytest.fixture(scope="session")
def fake_server() -> Iterator[FakeUpstream]:
    server = FakeUpstream(free_port())
    server.start()
    yield server
    server.stop()


@pytest.fixture
def fake(fake_server: FakeUpstream) -> FakeUpstream:
    """The fake upstream, reset for this test."""
    fake_server.reset()
    return fake_server


StartService = Callable[..., Service]


@pytest.fixture(scope="session")
def started_services() -> Iterator[list[tuple[Service, bool]]]:
    """Every service started in the session, and whether it is shared by every module; all stopped at its end."""
    started: list[tuple[Service, bool]] = []
    yield started
    for service, _ in started:
        service.stop()


@pytest.fixture(scope="module", autouse=True)
def stop_module_services(started_services: list[tuple[Service, bool]]) -> Iterator[None]:
    """The services a test module started (its own fixtures' and its tests'), stopped when the module ends: a
    process each (about 270 MB), they would otherwise add up over the whole suite."""
    before = len(started_services)
    yield
    for service, shared in started_services[before:]:
        if not shared:
            service.stop()


@pytest.fixture(scope="session")
def start_service(
    tmp_path_factory: pytest.TempPathFactory, started_services: list[tuple[Service, bool]]
) -> StartService:
    """Start a service process with a config and environment; stopped when the test module that started it ends
    (`shared`: at the end of the session)."""

    def start(
        config: dict[str, Any] | None,
        env: dict[str, str] | None = None,
        *,
        token: str | None = TOKEN,
        patch: str | None = None,
        shared: bool = False,
    ) -> Service:
        # The shared services see one test's requests after another's: circuit breakers and the response cache
        # are off unless a test turns them on (test_circuit_breaker.py, test_cache.py), so that no test depends
        # on the ones before it (the same question must reach the fake upstream every time).
        environment = {"FAKE_KEY": FAKE_KEY, "MOM_CIRCUIT_FAILURES": "0", "MOM_CACHE_ENABLED": "false"}
        if token is not None:
            environment["API_TOKEN"] = token
        environment.update(env or {})
        service = Service(tmp_path_factory.mktemp("service"), config, environment, patch=patch)
        started_services.append((service, shared))
        service.start()
        return service

    return start


@dataclass(frozen=True)
class CallPath:
    """One of the two ways an upstream call is made (providers/caller.py)."""

    name: str  # as /health/detailed reports an OpenAI-compatible LLM's `client`
    env: dict[str, str]  # what selects it

    @property
    def litellm(self) -> bool:
        return self.name == "litellm"


# The lean path for OpenAI-compatible servers (the default) and LiteLLM (MOM_LEAN_CALLS=false). Tests that take
# `service` or `call_path` run through both.
CALL_PATHS = (CallPath("lean", {}), CallPath("litellm", {"MOM_LEAN_CALLS": "false"}))


@pytest.fixture(scope="session", params=CALL_PATHS, ids=lambda path: path.name)
def call_path(request: pytest.FixtureRequest) -> CallPath:
    """One call path (a test using it runs once per path)."""
    path: CallPath = request.param
    return path


@pytest.fixture(scope="session")
def service(fake_server: FakeUpstream, start_service: StartService, call_path: CallPath) -> Service:
    """One live service over the standard test panel, shared by the API tests (one per call path)."""
    return start_service(panel_config(fake_server), call_path.env, shared=True)
